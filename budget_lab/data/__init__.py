"""Datasets: the built-in synthetic captioned image set (`synth`)."""

from budget_lab.data.synth import render_sample, synth_dataset

__all__ = ["render_sample", "synth_dataset"]
