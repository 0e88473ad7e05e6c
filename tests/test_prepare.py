"""`budget_lab.data.prepare` / `encoders` / the `data` CLI: images -> shards, skips, resume."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from budget_lab.data.encoders import (
    PixelEncoder,
    TextEncoder,
    VaeEncoder,
    load_image_encoder,
    load_text_encoder,
    minilm_path,
)
from budget_lab.data.loader import ShardLoader, load_manifest
from budget_lab.data.prepare import prepare_dataset
from budget_lab.errors import ConfigError, DataError


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and oversubscribed CPUs make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """The offline MiniLM text encoder, loaded once, padding to 8 tokens."""
    return load_text_encoder("minilm", max_tokens=8)


def _all_samples(out: Path, resolution: int | None = None, split: str = "train") -> dict:
    """Every sample of a split, in manifest order, as one batch."""
    manifest = load_manifest(out)
    count = manifest.split(resolution, split).count
    loader = ShardLoader(out, split=split, resolution=resolution, batch_size=count, shuffle=False)
    return next(iter(loader))


def _expected_crop(path: Path, res: int) -> np.ndarray:
    """The centre square of an image, resized to res with LANCZOS, as uint8 (H, W, 3)."""
    with Image.open(path) as im:
        w, h = im.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return np.array(im.convert("RGB").resize((res, res), Image.Resampling.LANCZOS, box=box))


class CountingPixel(PixelEncoder):
    """The pixel encoder, counting its calls and raising on call number `fail_at`."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().encode(images)


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


def test_pixel_minilm_round_trip(data_image_folder: Path, tmp_path: Path, minilm: TextEncoder):
    out = tmp_path / "out"
    manifest = prepare_dataset(
        data_image_folder, out, resolutions=(32,), vae="pixel", text_encoder=minilm,
        max_tokens=8, shard_size=5, batch_size=4, progress=False,
    )  # fmt: skip
    assert manifest["complete"] is True
    assert manifest["kind"] == "budget-lab-shards" and manifest["version"] == 1
    assert manifest["image_encoder"]["name"] == "pixel"
    assert manifest["image_encoder"]["channels"] == 3
    assert manifest["image_encoder"]["downsample"] == 1
    assert manifest["text_encoder"] == {
        "name": "minilm",
        "width": 384,
        "max_tokens": 8,
        "dtype": "float16",
    }
    info = manifest["resolutions"]["32"]
    assert info["latent_shape"] == [3, 32, 32]
    shards = info["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert [s["count"] for s in shards] == [5, 5, 2]
    assert all(len(s["sha256"]) == 64 for s in shards)
    assert info["count"] == 12 and sum(info["skipped"].values()) == 0
    assert sorted(p.name for p in (out / "32").iterdir()) == [s["name"] for s in shards]

    batch = _all_samples(out)
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (12, 3, 32, 32)
    assert batch["captions"].shape == (12, 8, 384) and batch["caption_mask"].dtype == torch.bool
    images = sorted(data_image_folder.glob("*.png"))
    assert batch["keys"] == [f"{i:08d}" for i in range(12)]
    pixels = PixelEncoder().decode(batch["latents"])  # [0, 1]
    for i, path in enumerate(images):
        decoded = (pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(decoded, _expected_crop(path, 32))
        assert batch["text"][i] == path.with_suffix(".txt").read_text()

    # The caption embeddings are MiniLM's last hidden state, computed here independently.
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    tokens = tokenizer(
        batch["text"], padding="max_length", truncation=True, max_length=8, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].bool()
    assert torch.equal(batch["caption_mask"], mask)
    assert 0 < mask.sum() < mask.numel()  # some captions are padded, some positions are real
    torch.testing.assert_close(batch["captions"][mask], hidden[mask], atol=2e-3, rtol=2e-3)
    assert not batch["captions"][~mask].any()  # padded positions are zeros

    # Sample metadata names the source file and its original size.
    import tarfile

    with tarfile.open(out / "32" / "train-000000.tar") as tar:
        meta = json.loads(tar.extractfile("00000000.json").read())
    assert meta == {
        "key": "img_0000.png",
        "source": str(images[0]),
        "orig_size": [40, 48],
        "index": 0,
    }


def test_tiny_vae_and_clip_through_from_pretrained(
    data_image_folder: Path, data_tiny_vae_dir: Path, data_tiny_clip_dir: Path, tmp_path: Path
):
    out = tmp_path / "out"
    manifest = prepare_dataset(
        data_image_folder, out, resolutions=(32, 16), vae=str(data_tiny_vae_dir),
        text_encoder=str(data_tiny_clip_dir), max_tokens=12, shard_size=8, batch_size=5,
        progress=False,
    )  # fmt: skip
    ie = manifest["image_encoder"]
    assert ie["name"] == str(data_tiny_vae_dir.resolve())
    assert (ie["channels"], ie["downsample"], ie["scaling_factor"]) == (
        4,
        2,
        pytest.approx(0.18215),
    )
    assert ie["latent_sampling"] == "mean"
    assert manifest["text_encoder"]["width"] == 32 and manifest["text_encoder"]["max_tokens"] == 12
    assert manifest["resolutions"]["16"]["latent_shape"] == [4, 8, 8]
    assert manifest["resolutions"]["32"]["latent_shape"] == [4, 16, 16]

    with pytest.raises(ConfigError, match="several resolutions"):
        ShardLoader(out, batch_size=4)
    vae = VaeEncoder.from_pretrained(str(data_tiny_vae_dir))
    clip = TextEncoder.from_pretrained(str(data_tiny_clip_dir), max_tokens=12)
    images = sorted(data_image_folder.glob("*.png"))
    for res in (16, 32):
        batch = _all_samples(out, resolution=res)
        assert batch["latents"].shape == (12, 4, res // 2, res // 2)
        crops = torch.stack(
            [
                torch.from_numpy(_expected_crop(p, res)).permute(2, 0, 1).float() / 127.5 - 1
                for p in images
            ]
        )
        torch.testing.assert_close(batch["latents"], vae.encode(crops), atol=5e-3, rtol=5e-3)
        decoded = vae.decode(batch["latents"][:2])
        assert decoded.shape == (2, 3, res, res) and 0 <= decoded.min() and decoded.max() <= 1
    text = clip.encode(batch["text"])
    torch.testing.assert_close(batch["captions"], text.embeddings.float(), atol=2e-3, rtol=2e-3)
    assert torch.equal(batch["caption_mask"], text.mask)
    assert text.mask.sum(1).min() > 2  # real tokens: bos, the caption's bytes, eos


def test_vae_from_a_pipeline_folder(data_tiny_vae_dir: Path, tmp_path: Path):
    shutil.copytree(data_tiny_vae_dir, tmp_path / "pipe" / "vae")
    encoder = load_image_encoder(str(tmp_path / "pipe"))
    assert encoder.channels == 4 and encoder.latent_shape(32) == (4, 16, 16)
    with pytest.raises(ConfigError, match="multiple of 2"):
        encoder.check_resolution(33)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_unloadable_models_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load, name in ((load_image_encoder, "budget-lab-tests/no-such-vae"),
                       (load_text_encoder, "budget-lab-tests/no-such-text-encoder")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load(name)
        message = str(err.value)
        assert name in message
        assert "download it once with network" in message and "pass a local path" in message
    with pytest.raises(ConfigError, match="no such folder"):
        load_image_encoder(str(tmp_path / "missing-vae"))
    with pytest.raises(ConfigError, match="no such folder"):
        load_text_encoder("./missing-text-encoder")
    with pytest.raises(ConfigError, match="exceeds the 512 positions"):
        load_text_encoder("minilm", max_tokens=600)


# ------------------------------------------------------------------------------------------
# Skips, sources, splits
# ------------------------------------------------------------------------------------------


def test_bad_images_are_skipped_and_counted(
    data_write_images, tmp_path: Path, minilm: TextEncoder, capsys: pytest.CaptureFixture
):
    src = tmp_path / "src"
    good = data_write_images(src, 4)
    (src / "corrupt.png").write_bytes(b"this is not an image")
    (src / "corrupt.txt").write_text("a corrupt image")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(png, format="PNG")
    (src / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (src / "truncated.txt").write_text("a truncated image")
    Image.new("RGB", (20, 24), (1, 2, 3)).save(src / "small.png")
    (src / "small.txt").write_text("a small image")
    Image.new("RGB", (40, 40), (4, 5, 6)).save(src / "nocaption.png")
    Image.new("RGB", (40, 40), (7, 8, 9)).save(src / "empty.png")
    (src / "empty.txt").write_text("")
    (src / "sub").mkdir()
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(src / "sub" / "transparent.png")
    (src / "sub" / "transparent.txt").write_text("transparent")

    out = tmp_path / "out"
    manifest = prepare_dataset(
        src, out, resolutions=(16, 32), text_encoder=minilm, max_tokens=8, shard_size=4,
        batch_size=3, progress=True,
    )  # fmt: skip
    r32, r16 = manifest["resolutions"]["32"], manifest["resolutions"]["16"]
    assert r32["skipped"] == {"unreadable": 2, "too_small": 1, "no_caption": 1, "no_image": 0}
    assert r16["skipped"] == {"unreadable": 2, "too_small": 0, "no_caption": 1, "no_image": 0}
    assert r32["count"] == len(good) + 2 and r16["count"] == len(good) + 3
    assert manifest["inputs"] == {"train": 10}
    err = capsys.readouterr().err
    assert "32 px: 6 train samples" in err
    assert "skipped: 2 unreadable, 1 too_small, 1 no_caption" in err

    batch = _all_samples(out, resolution=32)
    by_text = dict(zip(batch["text"], batch["latents"], strict=True))
    assert "" in by_text  # an empty caption file is a valid caption
    transparent = PixelEncoder().decode(by_text["transparent"][None])[0]
    assert torch.allclose(transparent, torch.ones_like(transparent), atol=1e-3)  # over white
    assert "a small image" in _all_samples(out, resolution=16)["text"]


def _write_tar(path: Path, samples: list[tuple[str, bytes | None, str | None]]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as tar:
        for key, png, caption in samples:
            sample: dict = {"__key__": key}
            if png is not None:
                sample["png"] = png
            if caption is not None:
                sample["txt"] = caption
            tar.write(sample)


def _png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tar_sources_and_splits(tmp_path: Path, minilm: TextEncoder):
    src = tmp_path / "tars"
    src.mkdir()
    _write_tar(
        src / "train-000000.tar", [(f"{i:04d}", _png((i, 0, 0)), f"train {i}") for i in range(5)]
    )
    _write_tar(
        src / "train-000001.tar", [(f"{i:04d}", _png((i, 0, 0)), f"train {i}") for i in range(5, 8)]
    )
    _write_tar(
        src / "val-000000.tar",
        [("a", _png((0, 9, 0)), "val a"), ("b", _png((0, 0, 9)), None), ("c", None, "no image")],
    )
    kwargs = dict(
        resolutions=(32,), text_encoder=minilm, max_tokens=8, shard_size=3, progress=False
    )

    manifest = prepare_dataset(src, tmp_path / "out", **kwargs)
    splits = manifest["resolutions"]["32"]["splits"]
    assert splits["train"]["count"] == 8 and len(splits["train"]["shards"]) == 3
    assert splits["val"]["count"] == 1
    assert splits["val"]["skipped"] == {
        "unreadable": 0,
        "too_small": 0,
        "no_caption": 1,
        "no_image": 1,
    }
    val = _all_samples(tmp_path / "out", split="val")
    assert val["text"] == ["val a"]
    train = _all_samples(tmp_path / "out")
    assert train["text"] == [f"train {i}" for i in range(8)]

    pattern = str(src / "train-{000000..000001}.tar")
    manifest = prepare_dataset(pattern, tmp_path / "pattern", **kwargs)
    assert list(manifest["resolutions"]["32"]["splits"]) == ["train"]
    assert manifest["resolutions"]["32"]["count"] == 8
    single = prepare_dataset(src / "val-000000.tar", tmp_path / "single", **kwargs)
    assert list(single["resolutions"]["32"]["splits"]) == ["val"]

    _write_tar(src / "extra.tar", [("x", _png((1, 1, 1)), "x")])
    with pytest.raises(DataError, match="extra.tar"):
        prepare_dataset(src, tmp_path / "mixed", **kwargs)


def test_split_subfolders(data_write_images, tmp_path: Path, minilm: TextEncoder):
    data_write_images(tmp_path / "src" / "train", 3)
    data_write_images(tmp_path / "src" / "val", 2, start=100)
    data_write_images(tmp_path / "src" / "ignored", 2, start=200)
    manifest = prepare_dataset(
        tmp_path / "src", tmp_path / "out", text_encoder=minilm, max_tokens=8, progress=False
    )
    splits = manifest["resolutions"]["32"]["splits"]
    assert {name: s["count"] for name, s in splits.items()} == {"train": 3, "val": 2}


def test_missing_or_empty_source_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="no such file or folder"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no inputs"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------


def test_resume_after_interruption_redoes_nothing_finished(
    data_image_folder: Path, tmp_path: Path, minilm: TextEncoder
):
    kwargs = dict(
        resolutions=(32,),
        text_encoder=minilm,
        max_tokens=8,
        shard_size=4,
        batch_size=2,
        progress=False,
    )
    reference = prepare_dataset(
        data_image_folder, tmp_path / "reference", vae=CountingPixel(), **kwargs
    )

    out = tmp_path / "out"
    crashing = CountingPixel(fail_at=3)  # 2 calls per shard: crashes in the second shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(data_image_folder, out, vae=crashing, **kwargs)
    partial = json.loads((out / "manifest.json").read_text())
    assert partial["complete"] is False
    assert [s["name"] for s in partial["resolutions"]["32"]["splits"]["train"]["shards"]] == [
        "train-000000.tar"
    ]
    assert sorted(p.name for p in (out / "32").iterdir()) == [
        "train-000000.tar"
    ]  # no .partial left
    first = out / "32" / "train-000000.tar"
    first_mtime = first.stat().st_mtime_ns

    resumed = CountingPixel()
    manifest = prepare_dataset(data_image_folder, out, vae=resumed, **kwargs)
    assert resumed.calls == 4  # shards 1 and 2 only
    assert first.stat().st_mtime_ns == first_mtime
    assert manifest["complete"] is True
    assert manifest["resolutions"] == reference["resolutions"]
    for shard in manifest["resolutions"]["32"]["splits"]["train"]["shards"]:
        assert (out / "32" / shard["name"]).read_bytes() == (
            tmp_path / "reference" / "32" / shard["name"]
        ).read_bytes()

    again = CountingPixel()
    prepare_dataset(data_image_folder, out, vae=again, **kwargs)
    assert again.calls == 0  # a finished run has nothing to redo

    (out / "32" / "train-000001.tar").write_bytes(b"\0" * 1024)  # damaged after the run
    repair = CountingPixel()
    manifest = prepare_dataset(data_image_folder, out, vae=repair, **kwargs)
    assert repair.calls == 2
    assert manifest["resolutions"] == reference["resolutions"]


def test_repair_of_one_resolution_gives_the_same_bytes(
    data_write_images, tmp_path: Path, minilm: TextEncoder
):
    src = tmp_path / "src"
    data_write_images(src, 5)
    data_write_images(src, 2, size=(20, 24), start=50)  # kept at 16 px, too small at 32 px
    kwargs = dict(
        resolutions=(16, 32),
        text_encoder=minilm,
        max_tokens=8,
        shard_size=4,
        batch_size=4,
        progress=False,
    )
    out = tmp_path / "out"
    first = CountingPixel()
    prepare_dataset(src, out, vae=first, **kwargs)
    assert first.calls == 4  # 2 shards x 2 resolutions, one batch each
    originals = {p: p.read_bytes() for p in out.glob("*/*.tar")}
    damaged = out / "32" / "train-000001.tar"
    damaged.write_bytes(originals[damaged][:1000])
    repair = CountingPixel()
    manifest = prepare_dataset(src, out, vae=repair, **kwargs)
    assert repair.calls == 1  # only shard 1 at 32 px
    assert {p: p.read_bytes() for p in out.glob("*/*.tar")} == originals
    assert manifest["resolutions"]["32"]["skipped"]["too_small"] == 2


def test_rerun_with_other_arguments_is_a_config_error(
    data_image_folder: Path, tmp_path: Path, minilm: TextEncoder
):
    out = tmp_path / "out"
    prepare_dataset(
        data_image_folder, out, text_encoder=minilm, max_tokens=8, shard_size=6, progress=False
    )
    with pytest.raises(ConfigError, match=r"resolutions: \[32\] there, \[16\] now"):
        prepare_dataset(
            data_image_folder,
            out,
            resolutions=(16,),
            text_encoder=minilm,
            max_tokens=8,
            shard_size=6,
            progress=False,
        )
    with pytest.raises(ConfigError, match="shard_size"):
        prepare_dataset(
            data_image_folder, out, text_encoder=minilm, max_tokens=8, shard_size=4, progress=False
        )
    with pytest.raises(ConfigError, match="new --out"):
        prepare_dataset(
            data_image_folder,
            out,
            vae=CountingPixel(),
            text_encoder="minilm",
            max_tokens=16,
            shard_size=6,
            progress=False,
        )
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_dataset(
            data_image_folder,
            tmp_path / "occupied",
            text_encoder=minilm,
            max_tokens=8,
            progress=False,
        )


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def test_cli_prepare_missing_images_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    from budget_lab.cli import main

    missing = tmp_path / "no-such-folder"
    code = main(["data", "prepare", "--images", str(missing), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert str(missing) in captured.err and "no such file or folder" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()


def test_cli_synth_prepare_verify(tmp_path: Path, capsys: pytest.CaptureFixture):
    from budget_lab.cli import main

    synth, out = tmp_path / "synth", tmp_path / "latents"
    assert (
        main(
            ["data", "synth", "--out", str(synth), "--n", "12", "--res", "16", "--shard-size", "5"]
        )
        == 0
    )
    code = main(
        ["data", "prepare", "--images", str(synth), "--out", str(out), "--vae", "pixel",
         "--text-encoder", "minilm", "--max-tokens", "8", "--shard-size", "4"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"manifest: {out / 'manifest.json'}" in captured.out
    manifest = load_manifest(out)
    assert list(manifest.resolutions) == [16]  # the synthetic set's own resolution by default
    assert manifest.split(16, "train").count + manifest.split(16, "val").count == 12

    assert main(["data", "verify", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out
    shard = manifest.split(16, "train").shards[1].path
    shard.write_bytes(shard.read_bytes()[:-600])
    assert main(["data", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "sha256" in err and "re-run `budget-lab data prepare`" in err
