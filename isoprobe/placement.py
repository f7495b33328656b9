"""One model split over several devices by accelerate: ``isoprobe inspect --device-map auto``.

``from_pretrained(device_map=..., max_memory=..., offload_folder=...)`` (HuggingFace accelerate)
places each block of layers on a GPU, the CPU or the disk (weights loaded into memory only for the
block's forward) and moves activations between them. A :class:`~isoprobe.hooks.Probe` needs
nothing more: its hooks see each site's activation on the device where the block ran and form
the Gram there, so the records are those of the model on one device (to the rounding of the
devices' kernels); the memory the Probe adds is one site's items and Grams at a time, on that
site's device.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEVICE_MAPS", "describe", "dispatch_options", "input_device", "parse_max_memory"]

#: accelerate's automatic placements
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` as accelerate's ``max_memory`` (GPU indices as ints)."""
    if text is None:
        return None
    limits: dict[int | str, str] = {}
    for part in text.split(","):
        device, eq, size = part.strip().partition("=")
        if not eq or not device.strip() or not size.strip():
            raise ValueError(f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
        device = device.strip()
        limits[int(device) if device.isdigit() else device] = size.strip()
    return limits


def dispatch_options(
    device_map: str | None, max_memory: str | None, offload_folder: str | None, dtype: str = "float32"
) -> dict[str, Any] | None:
    """The ``from_pretrained`` keywords that split a model (``None`` without ``device_map``), the
    weights in ``dtype`` (``"float32"``, ``"bfloat16"``, ...);
    ``ValueError`` for a placement option given without ``--device-map`` or an unknown map."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("--max-memory and --offload-folder place a split model: give --device-map auto too")
        return None
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}; got {device_map!r}")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ValueError("--device-map needs accelerate: pip install accelerate") from None
    options: dict[str, Any] = {"device_map": device_map, "dtype": getattr(torch, dtype)}
    if max_memory is not None:
        options["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        options["offload_folder"] = offload_folder
    return options


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the inputs of a model split by accelerate go: the device of its first block (the CPU
    for a block offloaded to the disk); accelerate moves them on from there."""
    placement = getattr(model, "hf_device_map", None) or {}
    first = next(iter(placement.values()), "cpu")
    if isinstance(first, int):
        return torch.device("cuda", first)
    return torch.device("cpu" if first == "disk" else first)


def describe(model: torch.nn.Module) -> str:
    """``"accelerate placed 5 blocks: 3 on cpu, 2 on disk"``: how many blocks landed on each device."""
    placement = getattr(model, "hf_device_map", None) or {}
    if not placement:  # it fitted on the first device
        return f"accelerate placed the whole model on {next(model.parameters()).device}"
    counts: dict[str, int] = {}
    for device in placement.values():
        name = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[name] = counts.get(name, 0) + 1
    blocks = "the whole model" if list(placement) == [""] else f"{len(placement)} blocks"
    return f"accelerate placed {blocks}: " + ", ".join(f"{n} on {d}" for d, n in counts.items())
