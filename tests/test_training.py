"""Batched ensemble training (isoprobe.training), the training reproductions' rules, and the
torchrun helpers (isoprobe.distributed) under a 2-process gloo group."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from isoprobe import Probe, distributed
from isoprobe.experiments.joudaki import rule_norms_never_raise
from isoprobe.experiments.training import (
    rule_depth_independent,
    rule_fig7,
    rule_near_orthogonal,
    spearman,
)
from isoprobe.nets import BNMLP, LNMLP
from isoprobe.theory import LNMLPSpec
from isoprobe.training import Ensemble, TrainConfig, epoch_order, train

F64 = torch.float64
D_IN, CLASSES, N = 12, 3, 48


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny products: a second thread only adds contention (bench/bench_train.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=gen, dtype=F64), torch.randint(0, CLASSES, (N,), generator=gen)


def _ln_model(act: str, run: int) -> nn.Module:
    spec = LNMLPSpec(act, depth=3, width=16)
    head = nn.Linear(16, CLASSES, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.normal_(0, 0.25, generator=torch.Generator().manual_seed(100 + run))
    return nn.Sequential(OrderedDict(body=LNMLP(spec, D_IN, seed=3, run=run, dtype=F64), head=head))


def _bn_model(run: int) -> nn.Module:
    # standard BatchNorm1d: its running statistics are buffers, stacked and updated under vmap
    return BNMLP(D_IN, 10, 3, CLASSES, norm="batchnorm", activation="tanh",
                 generator=torch.Generator().manual_seed(run), dtype=F64)


def _groups(runs=(0, 1, 2)) -> dict[str, list[nn.Module]]:
    return {"tanh": [_ln_model("tanh", r) for r in runs], "relu": [_ln_model("relu", r) for r in runs],
            "bn": [_bn_model(r) for r in runs]}


# --- the batched computation equals separate models --------------------------------------------


def test_losses_and_gradients_match_separate_models():
    groups = _groups()
    refs = copy.deepcopy(groups)
    ens = Ensemble(groups)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, D_IN, generator=gen, dtype=F64)
    y = torch.randint(0, CLASSES, (3, 8), generator=gen)
    losses = ens.losses(x, y)
    losses.sum().backward()
    for gi, name in enumerate(ens.names):
        for r, model in enumerate(refs[name]):
            loss = F.cross_entropy(model(x[r]), y[r])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            assert losses[gi, r].item() == pytest.approx(loss.item(), rel=1e-13, abs=1e-14)
            for (pname, _), g in zip(model.named_parameters(), grads):
                torch.testing.assert_close(ens.params[name][pname].grad[r], g, rtol=1e-12, atol=1e-14)


def _reference_sgd(model: nn.Module, X, y, run: int, cfg: TrainConfig) -> tuple[nn.Module, list[float]]:
    """One model trained alone by torch.optim.SGD on run ``run``'s minibatches."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    steps = X.shape[0] // cfg.batch_size
    losses = []
    for epoch in range(1, cfg.epochs + 1):
        order = epoch_order(X.shape[0], [run], cfg.seed, epoch)[0]
        total = 0.0
        for b in range(steps):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / steps)
    return model, losses


def test_training_equals_training_each_model_alone():
    X, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=5)
    runs = [4, 7]  # global run ids seed the data order
    groups = _groups(runs)
    refs = copy.deepcopy(groups)
    ens = Ensemble(groups, run_ids=runs)

    def evaluate(ens, step, epoch):  # a forward in training mode: must not move BN running statistics
        with torch.no_grad():
            return [{"logit_sum": float(ens(X[:16], shared=True)["bn"].sum())}]

    result = train(ens, X, y, cfg, evaluate=evaluate, progress=False)
    loss = result.loss()
    assert loss.shape == (cfg.epochs + 1, 3, 2)
    for gi, name in enumerate(ens.names):
        for r, run in enumerate(runs):
            model, ref_losses = _reference_sgd(refs[name][r], X, y, run, cfg)
            np.testing.assert_allclose(loss[1:, gi, r], ref_losses, rtol=1e-12)
            trained = ens.member(name, r)
            for (k, v), (_, w) in zip(model.state_dict().items(), trained.state_dict().items()):
                torch.testing.assert_close(w, v, rtol=1e-11, atol=1e-13, msg=f"{name} run {run}: {k}")


def test_member_is_an_ordinary_copy():
    ens = Ensemble({"a": [_ln_model("gelu", r) for r in range(2)]})
    x = torch.randn(2, 5, D_IN, dtype=F64)
    out = ens(x)["a"]
    m = ens.member("a", 1)
    torch.testing.assert_close(m(x[1]), out[1], rtol=1e-14, atol=1e-15)
    with torch.no_grad():
        m.head.weight.zero_()
    assert ens.params["a"]["head.weight"][1].abs().sum() > 0  # a copy: the ensemble is untouched
    shared = ens(x[0], shared=True)["a"]
    torch.testing.assert_close(shared[0], out[0])


def test_ensemble_rejects_mismatched_groups():
    with pytest.raises(ValueError, match="same number"):
        Ensemble({"a": [_ln_model("relu", 0)], "b": [_ln_model("relu", 0), _ln_model("relu", 1)]})
    with pytest.raises(ValueError, match="separate groups"):
        Ensemble({"a": [_ln_model("relu", 0), _ln_model("tanh", 1)]})
    with pytest.raises(ValueError, match="distinct"):
        Ensemble({"a": [_ln_model("relu", 0), _ln_model("relu", 1)]}, run_ids=[3, 3])
    ens = Ensemble({"a": [_ln_model("relu", 0)]})
    X, y = _data()
    with pytest.raises(ValueError, match="exceeds"):
        train(ens, X, y, TrainConfig(epochs=1, batch_size=N + 1, lr=0.1), progress=False)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(epochs=1, batch_size=4, lr=float("nan"))


def test_a_diverged_model_leaves_the_others_alone():
    X, y = _data()
    ens = Ensemble({"a": [_ln_model("relu", r) for r in range(2)]})
    ref = copy.deepcopy(ens)
    with torch.no_grad():
        ens.params["a"]["head.weight"][0].fill_(float("nan"))
    a = train(ens, X, y, TrainConfig(epochs=1, batch_size=16, lr=0.1), progress=False).loss()
    b = train(ref, X, y, TrainConfig(epochs=1, batch_size=16, lr=0.1), progress=False).loss()
    assert np.isnan(a[:, 0, 0]).all()
    np.testing.assert_array_equal(a[:, 0, 1], b[:, 0, 1])


# --- checkpoints ----------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _measure(ens: Ensemble, step: int, epoch: int) -> list[dict]:
    w = ens.params["tanh"]["head.weight"].detach()
    return [{"step": step, "epoch": epoch, "run": r, "w": float(w[i].norm())} for i, r in enumerate(ens.run_ids)]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    X, y = _data()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.9)
    full_ens = Ensemble(_groups())
    full = train(full_ens, X, y, cfg, measure=_measure, every=2, evaluate=_measure,
                 checkpoint=tmp_path / "a.pt", progress=False)

    def stop_after_2(logs):
        if logs[-1].epoch == 2:
            raise _Stop

    path = tmp_path / "b.pt"
    with pytest.raises(_Stop):
        train(Ensemble(_groups()), X, y, cfg, measure=_measure, every=2, evaluate=_measure, checkpoint=path,
              on_epoch=stop_after_2, progress=False)
    resumed_ens = Ensemble(_groups())  # a fresh process: the same initial models, rebuilt
    resumed = train(resumed_ens, X, y, cfg, measure=_measure, every=2, evaluate=_measure, checkpoint=path,
                    progress=False)
    assert resumed.resumed_from == 2 and full.resumed_from == 0
    np.testing.assert_array_equal(resumed.loss(), full.loss())
    assert resumed.rows() == full.rows()
    for name in full_ens.names:
        for kind in ("params", "buffers"):
            for k, v in getattr(full_ens, kind)[name].items():
                assert torch.equal(getattr(resumed_ens, kind)[name][k], v), (name, k)
    # finished: a third call trains nothing and returns the same logs
    again = train(Ensemble(_groups()), X, y, cfg, measure=_measure, every=2, evaluate=_measure, checkpoint=path,
                  progress=False)
    assert again.resumed_from == 3 and again.rows() == full.rows()


def test_a_checkpoint_of_another_setup_is_not_used(tmp_path):
    X, y = _data()
    path = tmp_path / "c.pt"
    train(Ensemble(_groups()), X, y, TrainConfig(epochs=1, batch_size=16, lr=0.05), checkpoint=path, progress=False)
    other = train(Ensemble(_groups()), X, y, TrainConfig(epochs=1, batch_size=16, lr=0.01), checkpoint=path,
                  progress=False)
    assert other.resumed_from == 0
    tagged = train(Ensemble(_groups()), X, y, TrainConfig(epochs=1, batch_size=16, lr=0.01), checkpoint=path,
                   tag={"probe_batch": 64}, progress=False)
    assert tagged.resumed_from == 0


# --- decision rules on fabricated numbers --------------------------------------------------------


def test_spearman_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = np.random.default_rng(3)
    for _ in range(20):
        a = gen.integers(0, 5, size=9).astype(float)  # ties
        b = gen.normal(size=9)
        b[gen.integers(0, 9)] = np.inf
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_rule_fig7():
    betas = [1.0, 1.1, 1.2, 1.3]
    assert rule_fig7(betas, [0.4, 0.3, 0.2, 0.1]) == (True, pytest.approx(-1.0))
    held, rho = rule_fig7(betas, [0.1, 0.2, 0.3, 0.4])  # larger β trains slower: must fail
    assert not held and rho == pytest.approx(1.0)
    assert not rule_fig7(betas, [0.4, 0.3, 0.2, float("nan")])[0]  # the largest β diverged: ranks last
    assert not rule_fig7(betas, [0.2] * 4)[0]  # no ranking
    assert not rule_fig7([1.0, 1.1], [0.2, 0.1])[0]  # too few activations


def test_rule_norms_never_raise():
    assert rule_norms_never_raise([1.0, 2.0], [0.9, 2.0], tol=0.01) == (True, 0, 0.0)
    held, rises, worst = rule_norms_never_raise([1.0, 2.0], [1.02, 1.0], tol=0.01)
    assert not held and rises == 1 and worst == pytest.approx(0.02)
    assert rule_norms_never_raise([1.0], [1.005], tol=0.01)[0]
    assert not rule_norms_never_raise([1.0], [math.inf], tol=0.01)[0]  # a norm layer that collapses
    assert rule_norms_never_raise([math.inf], [math.inf], tol=0.01)[0]
    assert not rule_norms_never_raise([1.0], [math.nan], tol=0.01)[0]


def test_rule_depth_independent():
    assert rule_depth_independent({4: 0.90, 16: 0.88, 64: 0.87}, chance=0.1) == (True, pytest.approx(0.03))
    assert not rule_depth_independent({4: 0.90, 16: 0.80, 64: 0.60}, chance=0.1)[0]  # degrades with depth
    assert not rule_depth_independent({4: 0.1, 16: 0.1}, chance=0.1)[0]  # flat, but learned nothing
    assert not rule_depth_independent({4: 0.9, 16: math.nan}, chance=0.1)[0]  # diverged
    assert not rule_depth_independent({4: 0.9}, chance=0.1)[0]


def test_rule_near_orthogonal():
    assert rule_near_orthogonal(0.03, 0.02, 0.025, 0.2)
    assert not rule_near_orthogonal(0.3, 0.02, 0.025, 0.2)  # drifted from orthogonal
    assert not rule_near_orthogonal(0.03, 0.002, 0.025, 0.2)  # middle layers frozen: trivially orthogonal
    assert not rule_near_orthogonal(0.03, 0.02, 0.025, 0.9)  # did not train
    assert not rule_near_orthogonal(math.nan, 0.02, 0.025, 0.2)


# --- distributed helpers ----------------------------------------------------------------------------


def test_shard_runs_partitions_in_order():
    for runs in range(0, 9):
        for world in range(1, 5):
            shares = [distributed.shard_runs(runs, r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(runs))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        distributed.shard_runs(3, 2, 2)


def test_single_process_helpers_are_identities():
    x = torch.randn(4, 3)
    assert distributed.rank_world() == (0, 1)
    assert distributed.gather_rows([{"a": 1}]) == [{"a": 1}]
    assert distributed.agree_min(7) == 7
    torch.testing.assert_close(distributed.global_sample_gram(x), (x.double() @ x.double().T))


_TRAIN = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)


def _worker(rank: int, world: int, init: str, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = {}
        out["rank_world"] = distributed.rank_world()
        out["rows"] = distributed.gather_rows([{"rank": rank, "i": i} for i in range(rank + 1)])
        out["min"] = distributed.agree_min(10 - rank)
        x = torch.arange((3 + 2 * rank) * 4, dtype=torch.float32).reshape(-1, 2, 2) + 100 * rank
        x.requires_grad_(True)
        gathered = distributed.all_gather_features(x)
        out["gathered"], out["grad"] = gathered, gathered.requires_grad
        out["gram"] = distributed.global_sample_gram(x)
        out["same"] = distributed.all_gather_features(torch.full((2, 3), float(rank)), same_size=True)
        net = _probe_net()
        with Probe(net, gather=True) as probe:  # ragged shares of one global batch
            net(_probe_batch()[sum(_PROBE_SHARES[:rank]): sum(_PROBE_SHARES[: rank + 1])])
        out["probe"] = [(r.key, r.isometry_gap) for r in probe.records]
        # each rank trains its share of 3 runs; then rank 1 loses its last checkpoint (a crash
        # between the two ranks' saves) and both resume together from epoch 1
        X, y = _data()
        runs = distributed.shard_runs(3)
        path = f"{tmp}/rank{rank}.pt"
        train(Ensemble(_groups(runs), run_ids=runs), X, y, TrainConfig(1, 16, 0.05, 0.9), checkpoint=path,
              progress=False)
        ens = Ensemble(_groups(runs), run_ids=runs)
        first = train(ens, X, y, _TRAIN, checkpoint=path, progress=False)
        if rank == 1:
            import os

            os.replace(f"{path}.prev", path)  # back to epoch 1 on this rank only
        ens = Ensemble(_groups(runs), run_ids=runs)
        res = train(ens, X, y, TrainConfig(3, 16, 0.05, 0.9), checkpoint=path, progress=False)
        out["resumed_from"] = (first.resumed_from, res.resumed_from)
        rows = [{"group": g, "run": r, "loss": res.logs[-1].loss[gi][ri]}
                for gi, g in enumerate(ens.names) for ri, r in enumerate(runs)]
        out["losses"] = distributed.gather_rows(rows)
        torch.save(out, f"{tmp}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


_PROBE_SHARES = (5, 7)


def _probe_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 16), torch.nn.LayerNorm(16)).eval()  # per-sample maps


def _probe_batch() -> torch.Tensor:
    return torch.randn(sum(_PROBE_SHARES), 6, generator=torch.Generator().manual_seed(2))


def test_gather_and_sharded_training_under_gloo(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(world)]
    xs = [torch.arange((3 + 2 * r) * 4, dtype=torch.float32).reshape(-1, 2, 2) + 100 * r for r in range(world)]
    cat = torch.cat(xs)
    ref_gram = torch.from_numpy(cat.reshape(len(cat), -1).numpy().astype(np.float64)
                                @ cat.reshape(len(cat), -1).numpy().astype(np.float64).T)
    net = _probe_net()
    with Probe(net) as reference:
        net(_probe_batch())
    expected = [(rec.key, rec.isometry_gap) for rec in reference.records]
    for r, out in enumerate(outs):
        assert out["rank_world"] == (r, world)
        assert out["rows"] == [{"rank": 0, "i": 0}, {"rank": 1, "i": 0}, {"rank": 1, "i": 1}]
        assert out["min"] == 9
        assert torch.equal(out["gathered"], cat) and not out["grad"]
        torch.testing.assert_close(out["gram"], ref_gram, rtol=1e-15, atol=0)
        assert torch.equal(out["same"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        # the Probe under DDP: every rank records the statistics of the whole batch
        assert [k for k, _ in out["probe"]] == [k for k, _ in expected]
        assert [g for _, g in out["probe"]] == pytest.approx([g for _, g in expected], rel=1e-9)
        assert out["resumed_from"] == (1, 1)
    # the sharded, interrupted, resumed training equals one process training all 3 runs
    X, y = _data()
    ens = Ensemble(_groups())
    ref = train(ens, X, y, TrainConfig(3, 16, 0.05, 0.9), progress=False).logs[-1].loss
    got = {(row["group"], row["run"]): row["loss"] for row in outs[0]["losses"]}
    assert outs[1]["losses"] == outs[0]["losses"]
    for gi, g in enumerate(ens.names):
        for r in range(3):
            assert got[g, r] == pytest.approx(ref[gi][r], rel=1e-12)


# --- local image sources (isoprobe.data: .npz files and image folders) ------------------------------


def test_npz_images_channels_last_and_first(tmp_path):
    from isoprobe.data import DataUnavailable, is_image_source, load_images

    gen = np.random.default_rng(0)
    hwc = gen.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=hwc, y=np.arange(6) % 2)
    batch = load_images(str(tmp_path / "a.npz"))
    assert batch.X.shape == (6, 3, 5, 4) and batch.X.dtype == torch.float32
    np.testing.assert_allclose(batch.X[2, 1].numpy(), hwc[2, :, :, 1] / 255.0, rtol=1e-7)
    assert batch.labels.tolist() == [0, 1, 0, 1, 0, 1]
    chw = gen.random((5, 1, 3, 3)).astype(np.float64)
    np.savez(tmp_path / "b.npz", images=chw, labels=np.arange(5))
    sub = load_images(str(tmp_path / "b.npz"), limit=3, seed=1)
    idx = sub.labels.numpy()  # labels are the indices: the subset is the right images
    np.testing.assert_allclose(sub.X.numpy(), chw[idx].astype(np.float32))
    assert is_image_source(str(tmp_path / "b.npz")) and not is_image_source(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "c.npz", pixels=chw)
    with pytest.raises(DataUnavailable, match="label array"):
        load_images(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", x=chw * 255, y=np.arange(5))
    with pytest.raises(DataUnavailable, match=r"\[0, 1\]"):
        load_images(str(tmp_path / "d.npz"))
    with pytest.raises(ValueError, match="unknown image data"):
        load_images(str(tmp_path / "missing.npz"))


def test_image_folder(tmp_path):
    from PIL import Image

    from isoprobe.data import DataUnavailable, load_images

    gen = np.random.default_rng(1)
    arrays = {}
    for cls in ("b_cat", "a_dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            a = gen.integers(0, 256, size=(4, 6), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(tmp_path / "imgs" / cls / f"{i}.png")
            arrays[cls, i] = a
    batch = load_images(str(tmp_path / "imgs"))
    assert batch.X.shape == (4, 1, 4, 6)
    assert batch.labels.tolist() == [0, 0, 1, 1]  # classes in sorted order: a_dog = 0
    np.testing.assert_allclose(batch.X[2, 0].numpy(), arrays["b_cat", 0] / 255.0, rtol=1e-7)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "imgs" / "a_dog" / "odd.png")
    with pytest.raises(DataUnavailable, match="one size"):
        load_images(str(tmp_path / "imgs"))


# --- the reproductions end to end, at toy sizes ------------------------------------------------------

_TOY = {
    "fig7": {"acts": ["sigmoid", "tanh", "relu"], "depth": 2, "width": 16, "batch": 32, "epochs": 2,
             "train_size": 256},
    "fig2-trained": {"acts": ["tanh", "relu"], "depth": 2, "width": 16, "batch": 32, "epochs": 2, "train_size": 256,
                     "probe_every": 3, "probe_batch": 8},
    "meterez-fig4": {"depths": [2, 4], "width": 8, "batch": 32, "epochs": 2, "train_size": 256, "test_size": 64},
    "meterez-fig6": {"depth": 6, "width": 8, "batch": 32, "epochs": 2, "train_size": 256, "record_every": 4},
}


@pytest.fixture
def toy_registry(monkeypatch):
    import dataclasses

    from isoprobe.experiments import REGISTRY

    for name, sizes in _TOY.items():
        rep = REGISTRY[name]
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(
            rep, config=lambda ctx, rep=rep, sizes=sizes: {**rep.config(ctx), **sizes}))


@pytest.mark.parametrize("name", ["fig7", "meterez-fig4", "meterez-fig6"])
def test_reproduction_runs_and_decides(toy_registry, tmp_path, name):
    import json

    from isoprobe.experiments import run_reproductions

    (summary,) = run_reproductions([name], quick=True, runs=2, out_dir=tmp_path, show_progress=False,
                                   echo=lambda _m: None)
    assert isinstance(summary["held"], bool) and summary["rule"]
    for suffix in (".csv", ".png", ".json"):
        assert (tmp_path / f"{name}{suffix}").exists()
    # the checkpoint only serves to resume: gone once the results are written
    assert not any(p.name.startswith(f"{name}.ckpt") for p in tmp_path.iterdir())
    assert json.loads((tmp_path / f"{name}.json").read_text())["config"]["epochs"] == 2


def test_interrupted_reproduction_resumes_to_the_same_csv(toy_registry, tmp_path, monkeypatch):
    import json

    import isoprobe.experiments.training as exp
    from isoprobe.experiments import run_reproductions

    def run(out):
        return run_reproductions(["fig2-trained"], quick=True, runs=2, out_dir=out, show_progress=False,
                                 echo=lambda _m: None)[0]

    whole = run(tmp_path / "whole")
    real = exp.train

    def interrupted(*args, on_epoch, **kwargs):
        def stop(logs):
            on_epoch(logs)
            if logs[-1].epoch == 1:
                raise KeyboardInterrupt

        return real(*args, on_epoch=stop, **kwargs)

    monkeypatch.setattr(exp, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    assert not (tmp_path / "cut" / "fig2-trained.json").exists()
    assert (tmp_path / "cut" / "fig2-trained.ckpt.pt").exists()  # kept to resume from
    monkeypatch.setattr(exp, "train", real)
    resumed = run(tmp_path / "cut")
    assert any("resumed training after epoch 1" in n for n in resumed["notes"])
    assert not any(p.name.startswith("fig2-trained.ckpt") for p in (tmp_path / "cut").iterdir())
    a = (tmp_path / "whole" / "fig2-trained.csv").read_text()
    assert a == (tmp_path / "cut" / "fig2-trained.csv").read_text()
    assert resumed["measured"] == whole["measured"] and resumed["held"] == whole["held"]
    assert json.loads((tmp_path / "cut" / "fig2-trained.json").read_text())["held"] == whole["held"]
