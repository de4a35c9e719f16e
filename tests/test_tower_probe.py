"""benchmarks/tower_probe.py: its linear probe reads labels that the features hold, and not labels they do not."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tower_probe", ROOT / "benchmarks" / "tower_probe.py")
tower_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tower_probe)


def _features(labels, generator):
    """One-hot labels in the first 10 of 32 noisy feature columns."""
    x = 0.1 * torch.randn(len(labels), 32, generator=generator)
    x[torch.arange(len(labels)), labels] += 1.0
    return x


def test_linear_probe_reads_labels_the_features_hold_and_not_others():
    g = torch.Generator().manual_seed(0)
    y, y_test = torch.randint(10, (600,), generator=g), torch.randint(10, (200,), generator=g)
    x, x_test = _features(y, g), _features(y_test, g)
    assert tower_probe.linear_probe(x, y, x_test, y_test, steps=2000) > 0.97
    unrelated = torch.randint(10, (600,), generator=g)  # labels the features do not hold
    unrelated_test = torch.randint(10, (200,), generator=g)
    assert tower_probe.linear_probe(x, unrelated, x_test, unrelated_test, steps=2000) < 0.25
