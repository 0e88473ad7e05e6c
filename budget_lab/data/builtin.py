"""The built-in data: synthetic captioned shapes, prepared as 32 px pixels + MiniLM captions.

    data = ensure_builtin_data(Path("workspace/data/synth-latents"))           # the main job's
    data = ensure_builtin_data(tmp / "latents", n=160, max_tokens=16)          # a test's or bench's

One recipe for every place that needs a real data set without downloading one: the sweep's
default data, the tests' and the benchmarks' small sets. Made once: a folder that is already
prepared is returned as it is. The images are kept beside it (`<name>-images`).
"""

from __future__ import annotations

from pathlib import Path

from budget_lab.data.prepare import prepare_dataset
from budget_lab.data.synth import synth_dataset
from budget_lab.rundir import is_prepared_data

__all__ = ["ensure_builtin_data"]


def ensure_builtin_data(
    path: Path,
    n: int = 2500,
    *,
    val_fraction: float = 0.1,
    max_tokens: int = 77,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """`n` synthetic captioned shapes in `path` as 32 px pixel latents + MiniLM caption tokens
    (`max_tokens`: the caption length in tokens), `val_fraction` of them
    held out as the validation split (the FID/KID reference). With the defaults: the main job's
    2,500 (250 held out), a few tens of seconds on a laptop CPU."""
    path = Path(path)
    if is_prepared_data(path):
        return path
    images = path.parent / (path.name + "-images")
    if progress:
        print(f"preparing the built-in synthetic data ({n} captioned images) in {path} ...")
    synth_dataset(images, n=n, res=32, seed=seed, val_fraction=val_fraction, progress=progress)
    prepare_dataset(
        images,
        path,
        resolutions=(32,),
        vae="pixel",
        text_encoder="minilm",
        max_tokens=max_tokens,
        progress=progress,
    )
    return path
