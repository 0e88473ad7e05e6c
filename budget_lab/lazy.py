"""Packages whose public names load from their modules on first use.

    __getattr__, __dir__ = lazy_exports(__name__, {"Ledger": "budget_lab.ledger.store", ...})

A package's `__init__` that imported every module would make importing any one module of it pay
for all of them (importing `budget_lab.ledger.calibration` would load SQLAlchemy through the
store; `budget_lab.launch.cluster` would load submitit through the job wrapper). With these, the
package's names stay `from budget_lab.ledger import Ledger` for its users, and a module of it
costs only what it imports itself. Type checkers read the names from an `if TYPE_CHECKING:`
import block beside the call.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`: each name of `exports` (name ->
    the module that defines it) is imported on first use and then cached in the package."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
