"""Probe in training code: a HuggingFace ``TrainerCallback`` and a TensorBoard helper.

    from isoprobe.integrations import ProbeCallback, tensorboard_writer
    callback = ProbeCallback(sites="norm", every=50, writer=tensorboard_writer("runs/iso"))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    callback.history   # one row per (recorded step, mode, site, call, point): mean/std of the isometry gap

``every`` counts the Trainer's optimizer steps (``state.global_step``, the step every record
carries: 0 for the forwards of the first step, on the initial weights); every training forward
of a recorded step is probed (with gradient accumulation, several). Evaluation forwards during
training are not probed unless ``probe_eval=True``; then they are recorded at the current step
with ``mode="eval"``, in rows of their own (TensorBoard tags under ``{prefix}/eval``).
TensorBoard is optional: :func:`tensorboard_writer` says how to install it when it is missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import TrainerCallback

from isoprobe.hooks import Probe, View
from isoprobe.records import Record, site_label, summarize

__all__ = ["ProbeCallback", "log_summary", "tensorboard_writer"]


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...


def tensorboard_writer(log_dir: str | Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``; needs ``tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "the TensorBoard helper needs the tensorboard package: pip install tensorboard "
            "(or pass any object with add_scalar(tag, value, step) as the writer)"
        ) from error
    return SummaryWriter(str(log_dir))


def log_summary(
    writer: ScalarWriter,
    rows: Sequence[dict[str, Any]],
    step: int,
    prefix: str = "isoprobe",
) -> int:
    """Write summary rows (:func:`records.summarize`, ``probe.summary()``) as scalars.

    Tags: ``{prefix}/isometry/{key}`` (mean isometry; ``key`` is the row's ``"site:point"``, or
    ``"site@k:point"`` for a module's k-th call in a forward), ``{prefix}/gap/{key}`` (mean gap,
    left out when infinite) and ``{prefix}/theorem1_violations/{site}`` (``site@k`` likewise). Returns the
    number of scalars written.
    """
    written = 0
    for row in rows:
        site = site_label(row["site"], row.get("call", 0))
        key = f"{site}:{row['point']}"
        if row["isometry_mean"] is not None:
            writer.add_scalar(f"{prefix}/isometry/{key}", row["isometry_mean"], step)
            written += 1
        if row["gap_mean"] is not None and math.isfinite(row["gap_mean"]):
            writer.add_scalar(f"{prefix}/gap/{key}", row["gap_mean"], step)
            written += 1
        if row["theorem1_checked"]:
            writer.add_scalar(f"{prefix}/theorem1_violations/{site}", row["theorem1_violations"], step)
            written += 1
    return written


class ProbeCallback(TrainerCallback):
    """Probe the model while a HuggingFace ``Trainer`` trains it.

    On train begin a :class:`~isoprobe.hooks.Probe` (``sites``, ``view``, ``every``,
    ``gram_dtype``, ``probe_eval``) is attached to the model, its step the Trainer's
    ``global_step``; after every optimizer step its new records are popped (the probe keeps none
    between steps, so memory stays bounded however long the run), summarised per (step, mode,
    site, call, point) (:func:`records.summarize`) and appended to ``history`` (``global_step``:
    the records' step; ``mode``), and written to ``writer`` if one is given; on train end the
    hooks are removed. Call :meth:`close` yourself if training stops with an exception.
    """

    def __init__(
        self,
        sites: str | Sequence[str] | None = None,
        view: View = "auto",
        every: int = 50,
        gram_dtype: torch.dtype = torch.float64,
        writer: ScalarWriter | None = None,
        probe_eval: bool = False,
    ) -> None:
        self.probe_options = dict(sites=sites, view=view, every=every, gram_dtype=gram_dtype, probe_eval=probe_eval)
        self.writer = writer
        self.history: list[dict[str, Any]] = []
        self.probe: Probe | None = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise ValueError("ProbeCallback needs the model: the Trainer passes it to on_train_begin")
        self.close()
        self.probe = Probe(model, step=lambda: state.global_step, **self.probe_options).attach()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._collect()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._collect()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._collect()
        self.close()

    def close(self) -> None:
        """Remove the probe's hooks (idempotent)."""
        if self.probe is not None:
            self.probe.detach()
            self.probe = None

    def _collect(self) -> None:
        if self.probe is None:
            return
        groups: dict[tuple[int, str | None], list[Record]] = {}
        for r in self.probe.pop_records():
            groups.setdefault((r.step, r.mode), []).append(r)
        for (step, mode), records in groups.items():
            rows = summarize(records)
            self.history += [{"global_step": step, "mode": mode, **row} for row in rows]
            if self.writer is not None:
                log_summary(self.writer, rows, step, "isoprobe/eval" if mode == "eval" else "isoprobe")
