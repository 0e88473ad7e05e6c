"""The exceptions budget-lab raises for user mistakes.

A `UserError` is a mistake the user can fix (a bad value, a missing file, an unknown preset): the
CLI prints its message, without a traceback, and exits with status 2. Its message says what was
wrong, what is valid, and what to do. Everything else is a bug or an environment failure and
keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "TrainingError", "check"]


class UserError(Exception):
    """A mistake the user can fix; the message says how."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value is invalid (names the field, the value and the valid range)."""


class DataError(UserError):
    """A dataset, shard or manifest is missing, corrupt or does not match the run."""


class TrainingError(UserError):
    """A run cannot go on (non-finite loss, no data); what was saved is kept."""

    exit_code = 1


def check(ok: bool, name: str, value: object, valid: str) -> None:
    """Unless `ok`: raise a ConfigError naming the field, its bad value and what is valid."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {valid}")
