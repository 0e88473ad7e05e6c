"""`budget_lab.data.loader`: order, epochs, rank split, exact resume, and broken data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from budget_lab.data.loader import (
    ShardLoader,
    load_manifest,
    validate_shards,
)
from budget_lab.errors import ConfigError, DataError

N_SAMPLES = 60  # data_loader_shards: 60 samples in shards of 8, 8, 8, 8, 8, 8, 8, 4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and oversubscribed CPUs make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shards_copy(data_loader_shards: Path, tmp_path: Path) -> Path:
    """A writable copy of the loader test shards."""
    return Path(shutil.copytree(data_loader_shards, tmp_path / "shards"))


def _take(loader: ShardLoader, n: int) -> list[dict]:
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and x["text"] == y["text"]
        for name in ("latents", "captions", "caption_mask"):
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_manifest_and_batch_format(data_loader_shards: Path):
    manifest = load_manifest(data_loader_shards)
    assert manifest.complete and list(manifest.resolutions) == [32]
    split = manifest.split(None, "train")
    assert split.count == N_SAMPLES and [s.count for s in split.shards] == [8] * 7 + [4]
    assert manifest.text_encoder.width == 32 and manifest.text_encoder.max_tokens == 8
    assert manifest.image_encoder.name == "pixel"

    loader = ShardLoader(data_loader_shards, batch_size=4)
    assert loader.batches_per_epoch == 15 and loader.samples_per_epoch == 60
    assert loader.latent_shape == (3, 32, 32) and loader.caption_shape == (8, 32)
    batch = _take(loader, 1)[0]
    assert batch["latents"].shape == (4, 3, 32, 32) and batch["latents"].dtype == torch.float32
    assert batch["captions"].shape == (4, 8, 32) and batch["captions"].dtype == torch.float32
    assert batch["caption_mask"].shape == (4, 8) and batch["caption_mask"].dtype == torch.bool
    assert len(batch["text"]) == 4 and all(t.startswith("image ") for t in batch["text"])
    assert batch["latents"].min() >= -1 and batch["latents"].max() <= 1


def test_order_is_deterministic_per_seed_and_changes_per_epoch(data_loader_shards: Path):
    def two_epochs(seed: int) -> list[str]:
        return _keys(_take(ShardLoader(data_loader_shards, batch_size=4, seed=seed), 30))

    first = two_epochs(0)
    assert first == two_epochs(0)
    epoch0, epoch1 = first[:60], first[60:]
    assert sorted(epoch0) == sorted(epoch1) == [f"{i:08d}" for i in range(N_SAMPLES)]
    assert epoch0 != epoch1
    assert two_epochs(1)[:60] != epoch0
    unshuffled = _keys(_take(ShardLoader(data_loader_shards, batch_size=4, shuffle=False), 30))
    assert unshuffled[:60] == unshuffled[60:] == [f"{i:08d}" for i in range(N_SAMPLES)]


@pytest.mark.parametrize(("world_size", "num_workers", "covered"), [(3, 0, 60), (2, 2, 56)])
def test_ranks_see_disjoint_parts_of_each_epoch(
    data_loader_shards: Path, world_size: int, num_workers: int, covered: int
):
    per_rank = []
    for rank in range(world_size):
        loader = ShardLoader(
            data_loader_shards, batch_size=4, seed=5, num_workers=num_workers,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        assert loader.samples_per_epoch * world_size == covered
        keys = _keys(_take(loader, 2 * loader.batches_per_epoch))
        per_rank.append((keys[: len(keys) // 2], keys[len(keys) // 2 :]))
    for epoch in range(2):
        seen = [set(rank_keys[epoch]) for rank_keys in per_rank]
        assert sum(len(s) for s in seen) == covered  # no sample twice within a rank's epoch
        assert len(set().union(*seen)) == covered  # ...nor on two ranks
    if covered < N_SAMPLES:  # the left-out remainder is not always the same samples
        assert set().union(*(r[0] for r in per_rank)) != set().union(*(r[1] for r in per_rank))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resume_is_exact(data_loader_shards: Path, num_workers: int):
    def make() -> ShardLoader:
        return ShardLoader(data_loader_shards, batch_size=4, seed=7, num_workers=num_workers)

    per_epoch = make().batches_per_epoch
    total = 2 * per_epoch + 3
    reference = _take(make(), total)
    for consumed in (3, per_epoch, per_epoch + 5):
        interrupted = make()
        _take(interrupted, consumed)
        state = interrupted.state_dict()
        assert (state["epoch"], state["batch"]) == divmod(consumed, per_epoch)
        json.dumps(state)  # small and serialisable
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.epoch == consumed // per_epoch
        _assert_same_batches(_take(resumed, total - consumed), reference[consumed:])


def test_resume_with_other_settings(data_loader_shards: Path):
    loader = ShardLoader(data_loader_shards, batch_size=4, num_workers=0)
    _take(loader, 6)
    state = loader.state_dict()
    other = ShardLoader(data_loader_shards, batch_size=6, num_workers=0)
    with pytest.raises(ConfigError, match=r"global_batch=4 \(now 6\)"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match="approximately"):
        other.load_state_dict(state, strict=False)
    assert (other.epoch, other.state_dict()["batch"]) == (0, 4)  # 6/15 of an epoch of 10
    with pytest.raises(ConfigError, match="not a ShardLoader state"):
        other.load_state_dict({"epoch": 1})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_a_data_error_naming_it(shards_copy: Path, num_workers: int):
    shard = shards_copy / "32" / "train-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    loader = ShardLoader(shards_copy, batch_size=4, num_workers=num_workers)
    with pytest.raises(DataError) as err:
        _take(loader, loader.batches_per_epoch)
    message = str(err.value)
    assert str(shard.resolve()) in message and "re-run `budget-lab data prepare`" in message
    assert "Traceback" not in message
    with pytest.raises(DataError, match="sha256"):
        ShardLoader(shards_copy, batch_size=4, verify=True)
    report = validate_shards(shards_copy, raise_on_error=False)
    assert not report.ok and len(report.problems) == 1 and "train-000003.tar" in report.problems[0]


def test_garbage_and_missing_shards(shards_copy: Path):
    garbage = shards_copy / "32" / "train-000001.tar"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(DataError, match="train-000001.tar"):
        _take(ShardLoader(shards_copy, batch_size=4, shuffle=False), 15)
    (shards_copy / "32" / "train-000005.tar").unlink()
    with pytest.raises(DataError, match="train-000005.tar"):
        ShardLoader(shards_copy, batch_size=4)


def test_sample_shape_must_match_the_manifest(shards_copy: Path):
    path = shards_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["resolutions"]["32"]["latent_shape"] = [4, 32, 32]
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=r"latent.npy has shape \(3, 32, 32\), the manifest says \(4, 32, 32\)"
    ):
        _take(ShardLoader(shards_copy, batch_size=4), 1)


def test_expect_checks_the_data_against_the_model(data_loader_shards: Path):
    ok = {"latent_shape": (3, 32, 32), "caption_dim": 32, "max_tokens": 8, "image_encoder": "pixel"}
    ShardLoader(data_loader_shards, batch_size=4, expect=ok)
    with pytest.raises(DataError) as err:
        ShardLoader(data_loader_shards, batch_size=4, expect={"latent_shape": (4, 32, 32)})
    assert "latent_shape" in str(err.value) and "(3, 32, 32)" in str(err.value)
    assert str(data_loader_shards.resolve() / "32") in str(err.value)
    with pytest.raises(DataError, match=r"caption_dim is 32 in the data but the model expects 768"):
        ShardLoader(data_loader_shards, batch_size=4, expect={"caption_dim": 768})
    with pytest.raises(DataError, match="text_encoder"):
        ShardLoader(data_loader_shards, batch_size=4, expect={"text_encoder": "minilm"})
    with pytest.raises(ConfigError, match="unknown field"):
        ShardLoader(data_loader_shards, batch_size=4, expect={"latent_size": 32})


def test_unusable_data_folders(data_loader_shards: Path, shards_copy: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        ShardLoader(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        ShardLoader(tmp_path / "empty")
    with pytest.raises(DataError, match=r"fewer than the global batch 64 \(batch_size 32 x"):
        ShardLoader(data_loader_shards, batch_size=32, num_workers=2, world_size=2)
    with pytest.raises(ConfigError, match=r"lanes=3 does not fit: it must be a multiple of"):
        ShardLoader(data_loader_shards, batch_size=4, world_size=2, lanes=3)
    with pytest.raises(ConfigError, match="resolution=64 is not prepared"):
        ShardLoader(data_loader_shards, resolution=64)
    with pytest.raises(ConfigError, match="split='val'"):
        ShardLoader(data_loader_shards, split="val")
    with pytest.raises(ConfigError, match="rank=2"):
        ShardLoader(data_loader_shards, rank=2, world_size=2)
    path = shards_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["complete"] = False
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="did not finish"):
        ShardLoader(shards_copy)
