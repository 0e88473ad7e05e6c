"""Data: the built-in synthetic captioned image set, encoders, preparation into webdataset shards,
and the streaming loader the trainer reads them with."""

from budget_lab.data.loader import Manifest, ShardLoader, load_manifest, validate_shards
from budget_lab.data.prepare import prepare_dataset
from budget_lab.data.synth import render_sample, synth_dataset

__all__ = [
    "render_sample",
    "synth_dataset",
    "prepare_dataset",
    "Manifest",
    "ShardLoader",
    "load_manifest",
    "validate_shards",
]
