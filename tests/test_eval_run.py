"""`budget-lab eval` on a real (tiny) run: samples, real Inception FID, files written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from budget_lab.cli import main as cli_main
from budget_lab.config import compose_run
from budget_lab.eval.evaluate import paired_differences
from budget_lab.rundir import RunDir
from budget_lab.train import Trainer

FEATURES_FILE = RunDir(".").eval_features.name


def test_eval_trained_and_untrained(train_data_dir, tiny_clip_dir, tmp_path, capsys):
    cfg = compose_run(
        "nano",
        [
            f"data.path={train_data_dir}",
            "phases.0.steps=3",
            "phases.0.warmup_steps=0",
            "phases.0.batch_size=8",
            "phases.1.steps=2",
            "phases.1.batch_size=8",
            "eval.grid_size=0",
            "eval.fid_samples=16",
            "eval.sampler_steps=2",
            "eval.batch_size=8",
        ],
    )
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run()
    assert cli_main(["eval", str(run), "--untrained"]) == 0
    assert cli_main(["eval", str(run), "--clip-model", str(tiny_clip_dir)]) == 0
    trained = json.loads((run / "eval.json").read_text())
    untrained = json.loads((run / "eval-untrained.json").read_text())
    for r in (trained, untrained):
        assert r["fid"] > 0 and r["num_samples"] == 16 and r["num_reference"] == 16
        assert r["sampler_steps"] == 2
    assert trained["weights"].startswith("EMA of step-000000005.pt")
    assert trained["fid"] != untrained["fid"]
    assert 0 <= trained["clip_score"] <= 100 and trained["clip_model"] == str(tiny_clip_dir)
    assert untrained["clip_score"] is None  # no CLIP model configured
    assert (run / "samples" / "eval-trained.png").is_file()
    # the reference statistics are cached beside the data and reused
    assert list(train_data_dir.glob("fid-ref-32-val-16.npz"))
    assert list(train_data_dir.glob("fid-ref-32-val-16-features.npy"))
    # every score is a measurement: an interval around it, its N, KID with its spread, and
    # (built-in data) the text alignment with its interval
    for r in (trained, untrained):
        lo, hi = r["fid_ci95"]
        assert lo < r["fid"] < hi and r["fid_se"] > 0 and r["fid_method"].startswith("jackknife")
        assert r["kid_std"] > 0 and r["kid_subset_size"] == 8
        a_lo, a_hi = r["alignment_ci95"]
        assert 0 <= a_lo <= r["alignment"] <= a_hi <= 1
        assert set(r["alignment_attributes"]) >= {"color", "shape", "background"}
    out = capsys.readouterr().out
    assert '"fid"' in out
    # the final evaluation keeps its features: a paired comparison with another run that sampled
    # the same captions with the same noise (a copy scored with other weights here)
    feats = np.load(run / FEATURES_FILE)
    assert feats.shape == (16, 2048) and trained["features"] == FEATURES_FILE
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert cli_main(["eval", str(other), "--raw"]) == 0  # raw weights: eval-trained-raw.json
    (other / "eval.json").write_text((other / "eval-trained-raw.json").read_text())
    assert not (other / "eval-trained-raw.json").read_text().count(FEATURES_FILE)
    np.save(other / FEATURES_FILE, np.load(run / FEATURES_FILE)[::-1].copy())  # rows unpaired
    pairs = paired_differences({"ema": run, "raw": other, "gone": tmp_path / "missing"})
    assert list(pairs) == [("ema", "raw")]
    diff = pairs[("ema", "raw")]
    assert diff.n == 16 and diff.lo < diff.value < diff.hi and diff.method.startswith("paired")
    # the same rows in another order: the same FID, a zero difference
    assert diff.value == pytest.approx(0.0, abs=1e-6)
