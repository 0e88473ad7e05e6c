"""The `budget-lab` command line: help that teaches, `model info`, and user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from budget_lab.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("model", "data", "train", "eval"):
        assert command in out
    assert "budget-lab data synth" in out  # the help shows the pipeline


def test_model_info_json_matches_the_paper(capsys):
    assert main(["model", "info", "MicroDiT-XL/2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == 1_165_442_320
    assert (
        info["latent_size"] == 32
        and info["flops"]["tokens"] == 256
        and info["flops"]["kept_tokens"] == 64
    )
    assert info["flops"]["training"] < 0.45 * info["flops_unmasked"]["training"]
    assert len(info["layers"]) == 6 + 28


def test_model_info_table_and_overrides(capsys):
    assert (
        main(
            [
                "model",
                "info",
                "nano",
                "--set",
                "num_experts=0",
                "--res",
                "64",
                "--mask-ratio",
                "0.5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "64 px -> 64x64x3 latents" in out and "moe" not in out.split("blocks")[-1]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["model", "info", "nano", "--set", "patch_size=3"], "patch_size=3"),
        (["model", "info", "nano", "--set", "bogus=1"], "unknown model field"),
        (["model", "info", "nano", "--mask-ratio", "1.0"], "--mask-ratio 1.0"),
        (["model", "info", "MicroDiT-XL/2", "--res", "100"], "--res 100"),
    ],
)
def test_model_info_user_mistakes(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unknown_preset_is_an_argparse_error():
    proc = subprocess.run(
        [sys.executable, "-m", "budget_lab", "model", "info", "MicroDiT-XXL/2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        "invalid choice" in proc.stderr
        and "MicroDiT-XL/2" in proc.stderr
        and "Traceback" not in proc.stderr
    )
