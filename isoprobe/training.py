"""Batched ensemble training: many small models trained as one computation on the device.

The training figures (Joudaki et al. Figs. 2 and 7, Meterez et al. Figs. 4 and 6) train
*G variants × R runs* of small networks. One after another, each model underuses a GPU; here
they train together.

**Groups.** An :class:`Ensemble` holds ``G`` named groups of ``R`` models each. The models of
a group share their code (same module tree, same ``repr``, same parameter names and shapes)
and differ only in their tensors, which are stacked along a new leading axis
(:func:`torch.func.stack_module_state`). A group's forward is one
``vmap(functional_call(base, stacked))``: every matrix product of the ``R`` models becomes
one batched product. Variants whose code differs (another activation, another depth) are
separate groups; all groups share one loss, one backward and one optimizer step.

**Exactness.** The loss is ``Σ_m L_m``, the sum over models of each model's mean
cross-entropy. The models share no parameter, so ``∂(Σ_m L_m)/∂θ_m = ∂L_m/∂θ_m``: one
backward gives every model exactly its own gradient, and SGD on the stacked tensors (with
momentum and weight decay, which act entry by entry) is SGD on each model. A diverged model
(NaN loss) poisons only its own parameters. tests/test_training.py checks the losses and
gradients against training each model separately, in float64.

**Data order.** Run ``r`` (its *global* index, see ``run_ids``) visits the training set in
the order ``randperm`` seeded by ``(seed, r, epoch)``, in minibatches of ``batch_size``; the
last incomplete minibatch of an epoch is dropped (fixed shapes; batch norm needs full
batches). Every group's model ``r`` sees run ``r``'s minibatches (common random numbers:
variants differ only in what they vary), and a run trained alone, or on another rank
(:mod:`isoprobe.distributed`), sees exactly the same data.

**Checkpoints.** With ``checkpoint=PATH``, :func:`train` saves after every epoch, atomically
(``torch.save`` of the stacked state, the optimizer state, the epoch and the per-epoch logs);
the previous checkpoint is kept as ``PATH.prev``. Started again with the same setup, it resumes
after the last finished epoch and reproduces the uninterrupted run exactly: the data order is
a function of ``(seed, run, epoch)`` and nothing else is random. Within an epoch, at most every
``save_every_s`` seconds (and once the initialisation is measured), the state so far is saved
to ``PATH.partial`` (the weights, the optimizer, the minibatches done, the running loss and the
rows measured): an interrupted first epoch keeps its steps too, and the run resumes after its
last saved step with the same numbers. ``PATH.partial`` is removed when the epoch is saved whole.

**Logs.** Epoch 0 is the initialisation: its loss is the mean loss of the untrained models over
epoch 1's minibatches (forward only). Epoch ``e ≥ 1`` reports the mean minibatch loss seen by
SGD during epoch ``e``. ``measure(ens, step, epoch)`` (every ``every`` steps, and at step 0)
and ``evaluate(ens, step, epoch)`` (at initialisation and after every epoch) return rows (plain
dicts) kept in the epoch's log, so a resumed run has them too. They run with the buffers
restored afterwards (:meth:`Ensemble.frozen_buffers`), so measuring never changes training; a
``measure`` hook sees the gradients of the step just taken in ``.grad`` of the stacked
parameters.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from isoprobe import distributed

__all__ = ["EpochLog", "Ensemble", "TrainConfig", "TrainResult", "epoch_order", "train"]

Hook = Callable[["Ensemble", int, int], list[dict]]
_FORMAT = 1


def _signature(model: nn.Module) -> tuple:
    tensors = [(k, tuple(v.shape), v.dtype) for k, v in (*model.named_parameters(), *model.named_buffers())]
    return type(model), repr(model), tuple(tensors)


class Ensemble:
    """``G`` named groups of ``R`` models each, stacked per group (module docstring).

    Parameters
    ----------
    groups: ``{name: [model_0, ..., model_{R-1}]}``; model ``r`` of every group belongs to run
        ``run_ids[r]``. Within a group the models must have the same code (module tree and
        ``repr``) and the same parameter and buffer names, shapes and dtypes.
    run_ids: global run indices of the ``R`` models (default ``0..R-1``); they seed the data
        order of :func:`train`.
    device: where the stacked tensors live (default: where the models are).
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[nn.Module]],
        run_ids: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not groups:
            raise ValueError("an Ensemble needs at least one group of models")
        sizes = {len(models) for models in groups.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(
                f"every group needs the same number (>= 1) of models, one per run; got "
                f"{ {name: len(models) for name, models in groups.items()} }"
            )
        self.runs = sizes.pop()
        self.run_ids = list(range(self.runs)) if run_ids is None else [int(r) for r in run_ids]
        if len(self.run_ids) != self.runs or len(set(self.run_ids)) != self.runs:
            raise ValueError(f"run_ids must be {self.runs} distinct integers, got {run_ids!r}")
        self.names = [str(name) for name in groups]
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._base: dict[str, nn.Module] = {}
        for name, models in zip(self.names, groups.values()):
            models = list(models)
            for m in models:
                if not isinstance(m, nn.Module):
                    raise TypeError(f"group {name!r}: expected torch.nn.Module, got {type(m).__name__}")
            sig = _signature(models[0])
            for i, m in enumerate(models[1:], 1):
                if _signature(m) != sig:
                    raise ValueError(
                        f"group {name!r}: model {i} differs from model 0 in its code or its tensors' "
                        "names/shapes/dtypes; models that differ (another activation, depth, ...) "
                        "belong in separate groups"
                    )
            if next(models[0].parameters(), None) is None:
                raise ValueError(f"group {name!r}: the models have no parameters to train")
            params, buffers = stack_module_state(models)
            self.params[name] = {k: v.detach().to(device).requires_grad_(True) for k, v in params.items()}
            self.buffers[name] = {k: v.detach().to(device) for k, v in buffers.items()}
            self._base[name] = copy.deepcopy(models[0]).to("meta")

    # -- views
    @property
    def device(self) -> torch.device:
        return next(iter(self.params[self.names[0]].values())).device

    def parameters(self) -> list[torch.Tensor]:
        """Every stacked parameter (leading axis: run), for a ``torch.optim`` optimizer."""
        return [p for name in self.names for p in self.params[name].values()]

    def member(self, group: str, run: int) -> nn.Module:
        """An ordinary ``nn.Module`` with the current tensors of model ``run`` of ``group``.

        A copy (its own tensors, detached): hooks and the :class:`~isoprobe.hooks.Probe` work on it.
        ``run`` is the position ``0..R-1`` in this ensemble, not the global run id.
        """
        if group not in self._base:
            raise KeyError(f"no group {group!r}; groups: {', '.join(self.names)}")
        if not 0 <= run < self.runs:
            raise IndexError(f"run must lie in 0..{self.runs - 1}, got {run}")
        module = copy.deepcopy(self._base[group]).to_empty(device=self.device)
        own = dict(module.named_parameters())
        own.update(dict(module.named_buffers()))
        with torch.no_grad():
            for stacked in (self.params[group], self.buffers[group]):
                for k, v in stacked.items():
                    own[k].copy_(v[run])
        return module

    # -- computation
    def forward(self, x: torch.Tensor, shared: bool = False) -> dict[str, torch.Tensor]:
        """Outputs ``{group: (R, n, ...)}``.

        ``x``: ``(R, n, ...)``, run ``r``'s batch for model ``r`` of every group, or, with
        ``shared=True``, one batch ``(n, ...)`` for all models.
        """
        if not shared and (x.ndim < 1 or x.shape[0] != self.runs):
            raise ValueError(f"x must be shaped (runs={self.runs}, n, ...) (or pass shared=True), got {tuple(x.shape)}")
        out = {}
        for name in self.names:
            base = self._base[name]

            def one(p: dict, b: dict, xb: torch.Tensor, base: nn.Module = base) -> torch.Tensor:
                return functional_call(base, (p, b), (xb,))

            batched = vmap(one, in_dims=(0, 0, None if shared else 0), randomness="different")
            out[name] = batched(self.params[name], self.buffers[name], x)
        return out

    __call__ = forward

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of every model on its run's batch: ``(G, R)``.

        ``x``: ``(R, n, ...)``; ``y``: ``(R, n)`` integer classes.
        """
        if y.shape != x.shape[:2]:
            raise ValueError(f"labels must be shaped {tuple(x.shape[:2])} (runs, n), got {tuple(y.shape)}")
        out = []
        for logits in self.forward(x).values():
            if logits.ndim != 3:
                raise ValueError(f"models must return logits shaped (n, classes), got {tuple(logits.shape[1:])}")
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            out.append(ce.view(y.shape).mean(1))
        return torch.stack(out)

    @contextlib.contextmanager
    def frozen_buffers(self) -> Iterator[None]:
        """Restore every buffer on exit: forwards inside (evaluation, measurements) leave no trace
        in running statistics (a batch norm's ``running_mean`` in training mode)."""
        saved = {g: {k: v.clone() for k, v in b.items()} for g, b in self.buffers.items()}
        try:
            yield
        finally:
            with torch.no_grad():
                for g, b in self.buffers.items():
                    for k, v in b.items():
                        v.copy_(saved[g][k])

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "run_ids": list(self.run_ids),
            "params": {g: {k: v.detach() for k, v in p.items()} for g, p in self.params.items()},
            "buffers": {g: dict(b) for g, b in self.buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy ``state`` into the stacked tensors in place (an optimizer keeps its references)."""
        if list(state["names"]) != self.names or list(state["run_ids"]) != self.run_ids:
            raise ValueError("the state belongs to another ensemble (groups or run ids differ)")
        with torch.no_grad():
            for kind in ("params", "buffers"):
                mine = getattr(self, kind)
                for g in self.names:
                    if set(state[kind][g]) != set(mine[g]):
                        raise ValueError(f"group {g!r}: the state's {kind} have other names")
                    for k, v in mine[g].items():
                        if state[kind][g][k].shape != v.shape:
                            raise ValueError(
                                f"group {g!r}: {k} has shape {tuple(state[kind][g][k].shape)}, "
                                f"expected {tuple(v.shape)}"
                            )
                        v.copy_(state[kind][g][k])


@dataclass(frozen=True)
class TrainConfig:
    """Plain minibatch SGD: ``epochs`` passes, minibatches of ``batch_size``, step ``lr``."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")


@dataclass
class EpochLog:
    """One epoch: ``loss[g][r]`` (group × run, ``NaN`` for a diverged model) and hook rows."""

    epoch: int
    step: int
    loss: list[list[float]]
    rows: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    logs: list[EpochLog]
    resumed_from: int  # the epoch the run resumed after (0: started fresh)

    def loss(self) -> np.ndarray:
        """``(epochs + 1, G, R)`` losses, epoch 0 the initialisation."""
        return np.asarray([log.loss for log in self.logs], dtype=np.float64)

    def rows(self) -> list[dict]:
        return [r for log in self.logs for r in log.rows]


def epoch_order(n: int, run_ids: Sequence[int], seed: int, epoch: int) -> torch.Tensor:
    """``(R, n)``: each run's order of the ``n`` training items in ``epoch`` (seeded by ``(seed, run, epoch)``)."""
    out = []
    for r in run_ids:
        state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(r), int(epoch)]).generate_state(2, np.uint64)
        gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        out.append(torch.randperm(n, generator=gen))
    return torch.stack(out)


def _plain(value: Any) -> Any:
    """Python scalars for numpy/torch scalars (checkpoints load with ``weights_only=True``)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def _fingerprint(ens: Ensemble, cfg: TrainConfig, X: torch.Tensor, every: int, tag: Any) -> dict:
    config = {k: v for k, v in asdict(cfg).items() if k != "epochs"}  # more epochs may follow a checkpoint
    return _plain(
        {
            "format": _FORMAT,
            "config": config,
            "groups": ens.names,
            "run_ids": ens.run_ids,
            "data": [list(X.shape), str(X.dtype)],
            "every": every,
            "tag": tag,
        }
    )


def _load_checkpoint(path: Path, fingerprint: dict, epochs: int, device: torch.device) -> dict | None:
    """The checkpoint at ``path`` (or ``path.prev``) of the same setup, at most ``epochs`` epochs
    in, at the latest epoch every rank has (one rank may have saved an epoch more)."""
    found = {}
    for p in (path, path.with_name(path.name + ".prev")):
        if p.exists():
            try:
                ck = torch.load(p, map_location=device, weights_only=True)
            except Exception:  # a torn or foreign file: not a checkpoint we can use
                continue
            if ck.get("fingerprint") == fingerprint and int(ck["epoch"]) <= epochs:
                found[int(ck["epoch"])] = ck
    latest = max(found, default=0)
    agreed = distributed.agree_min(latest)  # ranks resume together (one may be an epoch ahead)
    return found.get(agreed)


def _save_checkpoint(path: Path, state: dict, keep_previous: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)


def _bar(progress: bool | Callable[..., Any], total: int, initial: int, desc: str):
    """A tqdm bar on stderr, or the one ``progress(None, desc=desc, total=total)`` makes."""
    if callable(progress):
        bar = progress(None, desc=desc, total=total)
        bar.update(initial)
        return bar
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True
    )


def _check_train_args(X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, every: int) -> int:
    """The number of minibatches per epoch, after checking the inputs of :func:`train`."""
    if X.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"X has {X.shape[0]} items but y is shaped {tuple(y.shape)}; need (N,) labels")
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer classes, got {y.dtype}")
    steps = X.shape[0] // cfg.batch_size
    if steps < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {X.shape[0]} training items")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"every must be an integer >= 0, got {every!r}")
    return steps


@dataclass
class _Loop:
    """One :func:`train` call's state: the data on the device, the optimizer and the hooks."""

    ens: Ensemble
    X: torch.Tensor
    y: torch.Tensor
    cfg: TrainConfig
    opt: torch.optim.Optimizer
    steps: int
    measure: Hook | None
    every: int
    evaluate: Hook | None
    part: dict | None = None  # the saved part of the next epoch, continued by :meth:`epoch`

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s minibatches, ``(R, B, ...)`` inputs and ``(R, B)`` labels."""
        B = self.cfg.batch_size
        order = epoch_order(self.X.shape[0], self.ens.run_ids, self.cfg.seed, epoch).to(self.ens.device)
        for b in range(self.steps):
            idx = order[:, b * B : (b + 1) * B]
            yield self.X[idx], self.y[idx]

    def rows(self, hook: Hook | None, step: int, epoch: int) -> list[dict]:
        if hook is None:
            return []
        with self.ens.frozen_buffers():
            return _plain(list(hook(self.ens, step, epoch)))

    def resume(self, path: Path | None, fingerprint: dict) -> tuple[list[EpochLog], int, dict | None]:
        """The logs so far, the last finished epoch and the saved part of the next epoch
        (``None``: none): from the checkpoints, else epoch 0's log (measured here)."""
        ck = None if path is None else _load_checkpoint(path, fingerprint, self.cfg.epochs, self.ens.device)
        start = 0 if ck is None else int(ck["epoch"])
        part = None if path is None else _load_partial(path, fingerprint, start, self.ens.device)
        if part is not None or ck is not None:
            state = part if part is not None else ck
            self.ens.load_state_dict(state["ensemble"])
            self.opt.load_state_dict(state["optimizer"])
            return [EpochLog(**log) for log in state["logs"]], start, part
        with torch.no_grad(), self.ens.frozen_buffers():
            init = sum(self.ens.losses(xb, yb) for xb, yb in self.batches(1)) / self.steps
        found = self.rows(self.measure, 0, 0) + self.rows(self.evaluate, 0, 0)
        return [EpochLog(0, 0, init.double().cpu().tolist(), found)], 0, None

    def epoch(self, epoch: int, bar: Any, postfix: bool, saver: Callable[[int, torch.Tensor, list], None]) -> EpochLog:
        """One epoch of SGD steps; ``postfix``: show the running loss on ``bar`` (a host sync).
        ``saver(batches done, running loss, rows)`` runs after every step (it saves when due); a
        saved part of this epoch (``self.part``) is continued after its last step."""
        ens, steps = self.ens, self.steps
        step0 = (epoch - 1) * steps
        show = max(1, steps // 10)
        total = torch.zeros(len(ens.names), ens.runs, dtype=torch.float64, device=ens.device)
        found: list = []
        done = 0
        if self.part is not None:
            done, found = int(self.part["batch"]), list(self.part["found"])
            total = self.part["total"].to(device=ens.device, dtype=torch.float64)
            self.part = None
        for b, (xb, yb) in enumerate(self.batches(epoch)):
            if b < done:  # finished before the interruption
                continue
            losses = ens.losses(xb, yb)
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.opt.step()
            total += losses.detach().double()
            step = step0 + b + 1
            if self.every and step % self.every == 0:
                found += self.rows(self.measure, step, epoch)
            bar.update(1)
            if postfix and (b + 1) % show == 0:
                bar.set_postfix(epoch=epoch, loss=f"{(total / (b + 1)).nanmean().item():.4f}")
            if b + 1 < steps:
                saver(b + 1, total, found)
        found += self.rows(self.evaluate, step0 + steps, epoch)
        return EpochLog(epoch, step0 + steps, (total / steps).cpu().tolist(), found)

    def save(self, path: Path, fingerprint: dict, logs: list[EpochLog]) -> None:
        state = {
            "fingerprint": fingerprint,
            "epoch": logs[-1].epoch,
            "ensemble": self.ens.state_dict(),
            "optimizer": self.opt.state_dict(),
            "logs": [asdict(log) for log in logs],
        }
        _save_checkpoint(path, state)
        _partial_path(path).unlink(missing_ok=True)

    def save_part(
        self, path: Path, fingerprint: dict, logs: list[EpochLog], batch: int, total: torch.Tensor, found: list
    ) -> None:
        """``PATH.partial``: the epoch after ``logs[-1]`` saved after ``batch`` of its minibatches."""
        state = {
            "fingerprint": fingerprint,
            "epoch": logs[-1].epoch,
            "batch": batch,
            "total": total.detach().cpu(),
            "found": found,
            "ensemble": self.ens.state_dict(),
            "optimizer": self.opt.state_dict(),
            "logs": [asdict(log) for log in logs],
        }
        _save_checkpoint(_partial_path(path), state, keep_previous=False)


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _load_partial(path: Path, fingerprint: dict, epoch: int, device: torch.device) -> dict | None:
    """The saved part of epoch ``epoch + 1`` of the same setup (``None`` if there is none)."""
    part = _partial_path(path)
    if not part.exists():
        return None
    try:
        state = torch.load(part, map_location=device, weights_only=True)
    except Exception:  # a torn or foreign file
        return None
    return state if state.get("fingerprint") == fingerprint and int(state["epoch"]) == epoch else None


def train(
    ens: Ensemble,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    measure: Hook | None = None,
    every: int = 0,
    evaluate: Hook | None = None,
    on_epoch: Callable[[list[EpochLog]], None] | None = None,
    checkpoint: str | Path | None = None,
    tag: Any = None,
    progress: bool | Callable[..., Any] = True,
    desc: str = "train",
    save_every_s: float = 60.0,
) -> TrainResult:
    """Train every model of ``ens`` by minibatch SGD on ``(X, y)`` (module docstring).

    ``X``: ``(N, ...)`` inputs, ``y``: ``(N,)`` integer classes, moved to the ensemble's device
    once. ``measure`` runs at step 0 and after every ``every``-th step (``every = 0``: never),
    ``evaluate`` at initialisation and after every epoch; both get ``(ens, step, epoch)`` and
    return rows (dicts of plain values). ``on_epoch(logs)`` runs after each epoch's
    checkpoint (e.g. to append to a CSV). ``checkpoint``: a file to save to and resume from;
    within an epoch the state is saved to ``checkpoint.partial`` at most every ``save_every_s``
    seconds (``0``: after every step), and once epoch 0 (the initialisation) is measured.
    A tqdm bar on stderr shows the mean loss over the models; ``progress``: ``False`` for none, or
    a factory ``progress(None, desc=..., total=...)`` of a tqdm-like bar (a runner's).
    """
    steps = _check_train_args(X, y, cfg, every)
    device = ens.device
    X, y = X.to(device), y.to(device, torch.int64)
    opt = torch.optim.SGD(ens.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loop = _Loop(ens, X, y, cfg, opt, steps, measure, every, evaluate)
    fingerprint = _fingerprint(ens, cfg, X, every, tag)
    path = None if checkpoint is None else Path(checkpoint)
    logs, start, loop.part = loop.resume(path, fingerprint)
    saved = [time.monotonic()]

    def saver(batch: int, total: torch.Tensor, found: list) -> None:
        if path is not None and time.monotonic() - saved[0] >= save_every_s:
            loop.save_part(path, fingerprint, logs, batch, total, found)
            saved[0] = time.monotonic()

    if path is not None and start == 0 and loop.part is None:  # the initialisation measured: kept from now on
        loop.save_part(path, fingerprint, logs, 0, torch.zeros(len(ens.names), ens.runs, dtype=torch.float64), [])
    bar = _bar(
        progress, cfg.epochs * steps, start * steps + (0 if loop.part is None else int(loop.part["batch"])), desc
    )
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            logs.append(loop.epoch(epoch, bar, postfix=progress is not False, saver=saver))
            if path is not None:
                loop.save(path, fingerprint, logs)
            if on_epoch is not None:
                on_epoch(logs)
    finally:
        bar.close()
    return TrainResult(logs, start)
