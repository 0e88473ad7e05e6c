"""Shared pytest fixtures."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

# The real local Slurm fixture (`slurm_cluster`), for tests marked `slurm`.
pytest_plugins = ["tests.slurm_cluster"]

# ------------------------------------------------------------------------------------------
# Data preparation and loading (tests/test_prepare.py, tests/test_loader.py). All offline:
# the tiny models are built from configs and saved locally, then loaded back through the same
# from_pretrained code path real users take with hub ids.
# ------------------------------------------------------------------------------------------

_DATA_WORDS = ("red", "green", "blue", "small", "large", "circle", "square", "above", "below")


def _data_write_captioned_images(
    folder: Path, n: int, size: tuple[int, int] = (40, 48), seed: int = 0, start: int = 0
) -> list[Path]:
    """Write `n` random-noise RGB PNGs ``img_XXXX.png`` with a ``.txt`` caption each."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img_{i:04d}.png"
        pixels = np_rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(path)
        words = " ".join(rng.choice(_DATA_WORDS) for _ in range(rng.randint(2, 6)))
        path.with_suffix(".txt").write_text(f"image {i} {words}", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def data_write_images():
    """The `_data_write_captioned_images` helper, for tests that need their own image folders."""
    return _data_write_captioned_images


@pytest.fixture(scope="session")
def data_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 captioned 40x48 PNGs (random noise, distinct captions) in one folder. Read-only."""
    folder = tmp_path_factory.mktemp("data_images")
    _data_write_captioned_images(folder, 12)
    return folder


@pytest.fixture(scope="session")
def data_tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 44k-parameter AutoencoderKL (4 latent channels, downsample 2) saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("data_tiny_vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP text encoder (width 32, 2 layers) + a byte-level CLIP tokenizer, saved locally.

    The tokenizer's vocabulary is the 256 byte-level symbols, alone and word-final, with no
    merges: every word becomes one token per byte. Built offline, saved with save_pretrained.
    """
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = CLIPTextModel(config)
    path = tmp_path_factory.mktemp("data_tiny_clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_loader_shards(tmp_path_factory: pytest.TempPathFactory, data_tiny_clip_dir: Path) -> Path:
    """Prepared shards for loader tests: 60 train samples at 32 px in 8 shards (7 x 8 + 4),
    pixel latents (3, 32, 32), tiny-CLIP caption embeddings (8 x 32). Read-only: copy to modify.
    """
    from budget_lab.data.prepare import prepare_dataset

    images = tmp_path_factory.mktemp("data_loader_images")
    _data_write_captioned_images(images, 60, size=(32, 32), seed=1)
    out = tmp_path_factory.mktemp("data_loader_shards") / "shards"
    prepare_dataset(
        images,
        out,
        resolutions=(32,),
        vae="pixel",
        text_encoder=str(data_tiny_clip_dir),
        max_tokens=8,
        shard_size=8,
        batch_size=16,
        progress=False,
    )
    return out


# ------------------------------------------------------------------------------------------
# Training (tests/test_train.py, tests/test_eval_run.py): the built-in synthetic shapes, prepared
# for real (pixels + the offline MiniLM text encoder), small enough for a 2-core CPU.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 synthetic 32 px images (144 train, 16 val) prepared as pixel latents + MiniLM tokens."""
    from budget_lab.data.builtin import ensure_builtin_data

    root = tmp_path_factory.mktemp("train_data")
    return ensure_builtin_data(root / "latents", n=160, max_tokens=16, progress=False)


# ------------------------------------------------------------------------------------------
# CLIP score (tests/test_clip_score.py, tests/test_eval_run.py): a tiny random CLIP, offline.
# ------------------------------------------------------------------------------------------


def _tiny_clip_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary without merges: letters and digits, alone and word-final."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return vocab


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP (hidden 32, 2 layers, 32 px images, patch 8) with its processor, saved."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = _tiny_clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    common = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **common,
            "num_attention_heads": 4,
            "vocab_size": len(vocab),
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**common, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    return path
