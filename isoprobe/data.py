"""Named image data sources: ``load_images(name)`` → ``(X, labels, description)``.

``X`` is a float32 tensor ``(N, C, H, W)`` with values in ``[0, 1]``, ``labels`` an int64 tensor
``(N,)``, ``description`` a sentence saying which data was used (reproductions record it).

| name | source | needs |
|---|---|---|
| ``synthetic`` | built in: 10 classes of smooth 1×28×28 patterns, shifted, rescaled and noised | nothing |
| ``digits`` | ``sklearn.datasets.load_digits`` (1797 images, 1×8×8) | scikit-learn |
| ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` | ``datasets.load_dataset`` (train split) | the hub or its local cache |
| a path ``*.npz`` | arrays ``x``/``X``/``images`` (N×H×W, N×H×W×C or N×C×H×W; uint8 or floats in [0, 1]) and ``y``/``labels`` | numpy |
| a path to a folder | ``FOLDER/CLASS/*.png`` (any format PIL reads), classes in sorted order, one image size | Pillow |

Hub data never hangs: with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, only the local cache
is read; otherwise the hub endpoint is probed with a short TCP timeout first. Either way a
data set that cannot be had raises :class:`DataUnavailable` with what to do instead
(``--data synthetic``).
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch

__all__ = ["DataUnavailable", "IMAGE_SOURCES", "ImageBatch", "is_image_source", "load_images"]

# name -> (hub repository, image column, label column)
_HUB = {
    "mnist": ("ylecun/mnist", "image", "label"),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "image", "label"),
    "cifar10": ("uoft-cs/cifar10", "img", "label"),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
}
IMAGE_SOURCES = ("synthetic", "digits", *_HUB)

_SYNTHETIC_SIZE = 2000
_SYNTHETIC_CLASSES = 10
_PROBE_TIMEOUT_S = 3.0


class DataUnavailable(RuntimeError):
    """A named data set cannot be loaded here; the message says what to use instead."""


class ImageBatch(NamedTuple):
    X: torch.Tensor
    labels: torch.Tensor
    description: str


def _subset(n_total: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=limit, replace=False))


def _synthetic(limit: int | None, seed: int) -> ImageBatch:
    """Ten fixed classes of smooth blob patterns; samples are shifted, rescaled, noised copies."""
    size = 28
    proto_gen = torch.Generator().manual_seed(20230528)  # the classes are part of the data set
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    protos = torch.zeros(_SYNTHETIC_CLASSES, size, size, dtype=torch.float64)
    for c in range(_SYNTHETIC_CLASSES):
        for _ in range(3):
            cy, cx = (4 + 20 * torch.rand(2, generator=proto_gen, dtype=torch.float64)).tolist()
            width = 2.0 + 3.0 * torch.rand((), generator=proto_gen, dtype=torch.float64).item()
            protos[c] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        protos[c] /= protos[c].max()
    n = _SYNTHETIC_SIZE if limit is None else limit
    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.randperm(n, generator=gen) % _SYNTHETIC_CLASSES
    shifts = torch.randint(-2, 3, (n, 2), generator=gen)
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    imgs = torch.stack([torch.roll(protos[y], tuple(s.tolist()), dims=(0, 1)) for y, s in zip(labels, shifts)])
    imgs = imgs * scale + 0.1 * torch.randn(n, size, size, generator=gen, dtype=torch.float64)
    X = imgs.clamp(0, 1).to(torch.float32).unsqueeze(1)
    desc = (
        f"synthetic: {n} built-in class-structured 1x{size}x{size} images "
        f"({_SYNTHETIC_CLASSES} classes, seed {seed}; no download)"
    )
    return ImageBatch(X, labels.to(torch.int64), desc)


def _digits(limit: int | None, seed: int) -> ImageBatch:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataUnavailable(
            "'digits' needs scikit-learn: pip install scikit-learn (or use --data synthetic)"
        ) from exc
    bunch = load_digits()
    idx = _subset(len(bunch.target), limit, seed)
    X = torch.from_numpy(bunch.images[idx] / 16.0).to(torch.float32).unsqueeze(1)
    desc = f"digits: {len(idx)} of scikit-learn's 1797 8x8 handwritten digits"
    return ImageBatch(X, torch.from_numpy(bunch.target[idx]).to(torch.int64), desc)


def _offline() -> bool:
    if any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return False


def _hub_reachable() -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub(name: str, limit: int | None, seed: int) -> ImageBatch:
    repo, image_col, label_col = _HUB[name]
    offline = _offline()
    if not offline and not _hub_reachable():
        raise DataUnavailable(
            f"cannot reach the Hugging Face hub to load {name!r} ({repo}); if it is in the local cache, "
            "set HF_DATASETS_OFFLINE=1 to read it from there, else use --data synthetic"
        )
    try:
        import datasets

        ds = datasets.load_dataset(repo, split="train")
    except ImportError as exc:
        raise DataUnavailable(f"{name!r} needs the `datasets` package (or use --data synthetic)") from exc
    except Exception as exc:  # the hub client raises many types; all mean "not here"
        where = "the local cache (offline mode)" if offline else "the hub"
        raise DataUnavailable(
            f"could not load {name!r} ({repo}) from {where}: {type(exc).__name__}: {exc}; use --data synthetic"
        ) from exc
    idx = _subset(len(ds), limit, seed)
    sub = ds.select(idx.tolist())
    arr = np.stack([np.asarray(img, dtype=np.float32) for img in sub[image_col]]) / 255.0
    X = torch.from_numpy(arr)
    X = X.unsqueeze(1) if X.ndim == 3 else X.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(sub[label_col], dtype=torch.int64)
    desc = f"{name}: {len(idx)} images of the {repo} train split ({len(ds)} in all), {tuple(X.shape[1:])}"
    return ImageBatch(X, labels, desc)


_NPZ_IMAGES = ("x", "X", "images", "x_train")
_NPZ_LABELS = ("y", "labels", "targets", "y_train")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_source(name: str) -> bool:
    """Is ``name`` a source :func:`load_images` knows: a name of the table or an existing local path."""
    return name in IMAGE_SOURCES or _local_path(name) is not None


def _local_path(name: str):
    from pathlib import Path

    p = Path(name).expanduser()
    return p if (p.suffix == ".npz" and p.is_file()) or p.is_dir() else None


def _as_images(arr: np.ndarray, where: str) -> torch.Tensor:
    """``(N, C, H, W)`` float32 in [0, 1] from uint8 or [0, 1] float arrays, channels first or last."""
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise DataUnavailable(f"{where}: float images must lie in [0, 1] (or be uint8 in 0..255)")
        arr = arr.astype(np.float32)
    else:
        raise DataUnavailable(f"{where}: images must be uint8 or float, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    elif arr.ndim != 4:
        raise DataUnavailable(
            f"{where}: images must be shaped (N, H, W), (N, H, W, C) or (N, C, H, W), got {arr.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(arr))


def _local(path, limit: int | None, seed: int) -> ImageBatch:
    """Images of a local ``.npz`` file or ``FOLDER/CLASS/IMAGE`` tree (module docstring)."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            xk = next((k for k in _NPZ_IMAGES if k in z.files), None)
            yk = next((k for k in _NPZ_LABELS if k in z.files), None)
            if xk is None or yk is None:
                raise DataUnavailable(
                    f"{path}: needs an image array ({'/'.join(_NPZ_IMAGES)}) and a label array "
                    f"({'/'.join(_NPZ_LABELS)}); found {', '.join(z.files) or 'none'}"
                )
            x, y = z[xk], z[yk]
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataUnavailable(f"{path}: labels must be {len(x)} integers, got {y.dtype} {y.shape}")
        idx = _subset(len(x), limit, seed)
        X, labels, total = _as_images(x[idx], str(path)), torch.from_numpy(y[idx].astype(np.int64)), len(x)
    else:
        from PIL import Image

        classes = sorted(d.name for d in path.iterdir() if d.is_dir())
        files = [
            (f, c)
            for c, name in enumerate(classes)
            for f in sorted((path / name).iterdir())
            if f.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not files:
            raise DataUnavailable(f"{path}: no images found; expected {path}/CLASS/IMAGE.png (one folder per class)")
        idx = _subset(len(files), limit, seed)
        imgs = []
        for i in idx:
            with Image.open(files[i][0]) as im:
                imgs.append(np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")))
        if len({a.shape for a in imgs}) != 1:
            raise DataUnavailable(f"{path}: images differ in size or channels; resize them to one size first")
        X, total = _as_images(np.stack(imgs), str(path)), len(files)
        labels = torch.tensor([files[i][1] for i in idx], dtype=torch.int64)
    desc = f"{path}: {len(idx)} of {total} local images, {tuple(X.shape[1:])}"
    return ImageBatch(X, labels, desc)


def load_images(name: str, limit: int | None = None, seed: int = 0) -> ImageBatch:
    """``(X, labels, description)`` of the named image set (module docstring), values in [0, 1].

    ``limit`` takes a seeded random subset of that many images (all if ``None``; the synthetic
    set then has 2000). Raises ``ValueError`` for an unknown name and :class:`DataUnavailable`
    when the data cannot be had here.
    """
    if not is_image_source(name):
        raise ValueError(
            f"unknown image data {name!r}; valid names: {', '.join(IMAGE_SOURCES)}, "
            "or a path to a .npz file or an image folder"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if name not in IMAGE_SOURCES:
        return _local(_local_path(name), limit, seed)
    if name == "synthetic":
        return _synthetic(limit, seed)
    if name == "digits":
        return _digits(limit, seed)
    return _hub(name, limit, seed)
