"""isoprobe.data: the built-in synthetic set, scikit-learn digits, and hub sets failing fast offline."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import isoprobe.data as data
from isoprobe.data import DataUnavailable, load_images


def test_synthetic_shape_range_and_determinism():
    X, y, desc = load_images("synthetic", limit=200, seed=3)
    assert X.shape == (200, 1, 28, 28) and X.dtype == torch.float32
    assert X.min() >= 0 and X.max() <= 1
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert "synthetic" in desc and "no download" in desc
    X2, y2, _ = load_images("synthetic", limit=200, seed=3)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    X3, _, _ = load_images("synthetic", limit=200, seed=4)
    assert not torch.equal(X, X3)
    assert len(load_images("synthetic").X) == 2000


def test_synthetic_is_class_structured():
    """Nearest class mean, fitted on one seed's images, classifies another seed's images."""
    Xa, ya, _ = load_images("synthetic", limit=500, seed=0)
    Xb, yb, _ = load_images("synthetic", limit=500, seed=1)
    means = torch.stack([Xa[ya == c].flatten(1).mean(0) for c in range(10)])
    pred = torch.cdist(Xb.flatten(1), means).argmin(1)
    assert (pred == yb).float().mean().item() > 0.8  # chance is 0.1


def test_digits():
    pytest.importorskip("sklearn")
    X, y, desc = load_images("digits", limit=100, seed=0)
    assert X.shape == (100, 1, 8, 8) and X.dtype == torch.float32
    assert X.min() >= 0 and X.max() <= 1 and X.max() > 0.9
    assert "digits" in desc
    assert len(load_images("digits").X) == 1797


def test_hub_unreachable_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_offline", lambda: False)
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailable, match="--data synthetic") as info:
        load_images("mnist", limit=10)
    assert "HF_DATASETS_OFFLINE=1" in str(info.value)
    assert time.perf_counter() - t0 < 2


def test_offline_hub_without_cache_fails_fast(tmp_path):
    """In a fresh interpreter with the offline switches set before any import (as the CI sets them)
    and an empty cache, however this test run itself was launched."""
    script = (
        "import time\n"
        "from isoprobe.data import DataUnavailable, load_images\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    load_images('cifar10', limit=10)\n"
        "except DataUnavailable as error:\n"
        "    print('--data synthetic' in str(error), time.perf_counter() - t0)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    says_synthetic, seconds = result.stdout.split()
    assert says_synthetic == "True" and float(seconds) < 20


@pytest.mark.parametrize("name, limit, match", [("imagenet", None, "valid names"), ("synthetic", 0, "limit")])
def test_bad_arguments(name, limit, match):
    with pytest.raises(ValueError, match=match):
        load_images(name, limit=limit)


def test_subset_is_a_seeded_sample_without_replacement():
    idx = data._subset(50, 20, seed=1)
    assert len(np.unique(idx)) == 20 and idx.max() < 50
    assert np.array_equal(idx, data._subset(50, 20, seed=1))
