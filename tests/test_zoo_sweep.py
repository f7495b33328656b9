"""The automatic zoo: every architecture that transformers ships with a base model, built tiny by
``zoo.build_auto``; in one forward the Probe must record exactly the norms and activations that
the oracle of ``zoo.py`` finds among the modules that ran, and its Theorem 1 verdicts must be
the test's own (held, or undecided where eps dominates; never a failure).

``data/zoo_sweep.json`` is the full sweep (``python tests/zoo.py SCRATCH.jsonl``, about 10
minutes on two cores, then ``python tests/zoo.py --commit SCRATCH.jsonl tests/data/zoo_sweep.json``),
one row per model type:
checked (with the oracle's counts) or skipped (with the reason). The CI part re-checks a fixed
selection of it: the checked types in order of their sweep time, as many as fit ``_CI_BUDGET_S``
sweep seconds, plus every model type the installed transformers ships that the file does not
list (the new architectures, which the sweep exists to catch: they are checked, not ignored, and
a warning asks for the file to be regenerated). ``ISOPROBE_ZOO_ALL=1`` checks every type.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from zoo import base_models, sweep_one, truth_kind

SWEEP = json.loads((Path(__file__).parent / "data" / "zoo_sweep.json").read_text())
ROWS = {row["type"]: row for row in SWEEP["rows"]}
SAME_VERSION = SWEEP["transformers"] == transformers.__version__
_CI_BUDGET_S = 6.0  # sweep seconds (one thread, warm imports): about 20 s of a pytest run here
# Where the Probe and the oracle disagree, and why (the test fails if a disagreement changes).
KNOWN = {
    # LaraMiniRMSNormGated: rms_norm(x) * w * silu(gate). Scale-invariant in x, so the oracle,
    # which re-runs it with the captured gate, finds a norm; discovery calls forward(x) alone, the
    # gate defaults to None and the forward raises, so it is not tried.
    "lara_mini": {"missed": ["layers.0.linear_attn.norm (LaraMiniRMSNormGated: norm)"]},
    # torch.nn.GLU is one of torch's activation classes (so a site), but halves its input's last
    # dimension: no entrywise map, so the oracle (output shaped like the input) finds nothing.
    "wav2vec2-conformer": {
        "extra": [f"encoder.layers.{i}.conv_module.glu (GLU: activation)" for i in range(2)],
    },
}


def ci_selection() -> list[str]:
    """The checked types in order of sweep time (ties by name) within ``_CI_BUDGET_S``."""
    checked = sorted((row["seconds"], t) for t, row in ROWS.items() if row["status"] == "checked")
    chosen, total = [], 0.0
    for seconds, model_type in checked:
        if total + seconds > _CI_BUDGET_S:
            break
        chosen.append(model_type)
        total += seconds
    return chosen


NEW = sorted(set(base_models()) - set(ROWS))
SELECTED = list(ROWS) if os.environ.get("ISOPROBE_ZOO_ALL") == "1" else sorted({*ci_selection(), *KNOWN})


def test_committed_sweep_is_current():
    """The file covers what this transformers ships; new types are checked below, and named here."""
    assert len(ci_selection()) >= 25, "the CI selection is too small to catch anything"
    if SAME_VERSION:
        assert not NEW and set(ROWS) == set(base_models()), "the sweep file does not match its own version"
    elif NEW:
        warnings.warn(
            f"transformers {transformers.__version__} ships {len(NEW)} model types that "
            f"data/zoo_sweep.json (transformers {SWEEP['transformers']}) lacks, checked here: "
            f"{', '.join(NEW)}; regenerate it as the docstring of tests/test_zoo_sweep.py says",
            stacklevel=1,
        )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", SELECTED + NEW)
def test_probe_records_what_the_oracle_finds(model_type):
    if model_type not in base_models():
        pytest.skip(f"{model_type}: not in transformers {transformers.__version__}")
    row = sweep_one(model_type, limit_s=60.0)
    committed = ROWS.get(model_type)
    if row["status"] == "skipped":
        if SAME_VERSION and committed is not None and committed["status"] == "checked":
            pytest.fail(f"{model_type} built and ran in the sweep but not now: {row['reason']}")
        pytest.skip(f"{model_type}: {row['stage']}: {row['reason']}")
    assert row["status"] == "checked", f"{model_type}: the Probe failed: {row['reason']}"
    known = KNOWN.get(model_type, {})
    assert row["missed"] == known.get("missed", []) and row["extra"] == known.get("extra", []), row
    assert not row["wrong_kind"], f"{model_type}: recorded with another kind: {row['wrong_kind']}"
    assert not row["above"], f"{model_type}: sites above leaf modules {row['above']}"
    assert not row["theorem1_differs"], f"{model_type}: Theorem 1 verdicts {row['theorem1_differs']}"
    assert not row["failed"], f"{model_type}: Theorem 1 itself fails at {row['failed']}"
    if SAME_VERSION and committed is not None:
        counts = ("norms", "activations", "theorem1_holds", "eps_dominated")
        assert {k: row[k] for k in counts} == {k: committed[k] for k in counts}, "not as in the sweep"


class _Affine(nn.Module):
    def forward(self, x):
        return 2 * x + 1


class _Softcap(nn.Module):
    def forward(self, x):
        return 30 * torch.tanh(x / 30)


class _Table(nn.Module):  # a positional table of the input's shape
    def forward(self, x):
        return torch.arange(x.numel(), dtype=x.dtype).view_as(x).sin()


_X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
ORACLE_CASES = {  # module, input, the kind it is
    "layernorm": (nn.LayerNorm(8), _X, "norm"),
    "rmsnorm": (nn.RMSNorm(8, eps=1e-6), _X, "norm"),
    "batchnorm": (nn.BatchNorm1d(3).eval(), _X, "norm"),
    "gelu": (nn.GELU(), _X, "activation"),
    "relu on a constant input": (nn.ReLU(), torch.full((2, 3, 8), 0.5), "activation"),
    "dropout on a constant input": (nn.Dropout(0.0), torch.full((2, 3, 8), 0.5), None),
    "softcap on a small input": (_Softcap(), _X / 10, "activation"),
    "groupnorm, one group": (nn.GroupNorm(1, 3), _X, "norm"),
    "affine": (_Affine(), _X, None),
    "positional table": (_Table(), _X, None),
    "linear": (nn.Linear(8, 8), _X, None),
    "linear on zeros": (nn.Linear(8, 8, bias=False), torch.zeros(8), None),
    "in-place relu on a positive input": (nn.ReLU(inplace=True), _X.abs(), "activation"),
    "softmax": (nn.Softmax(-1), _X, None),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_oracle(case):
    """The oracle on modules whose kind is known (constant inputs included: BLIP's attention
    dropout at random init sees uniform probabilities)."""
    module, x, kind = ORACLE_CASES[case]
    with torch.no_grad():
        assert truth_kind(module, (x,), {}, module(x.clone())) == kind


def test_a_site_called_on_an_empty_tensor_is_not_measured():
    """HiggsAudioV2 runs its audio layers on zero tokens when the batch has none: the Probe must
    not break the forward (it raised a reshape error) and records nothing for that call."""
    from isoprobe import Probe

    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with torch.no_grad(), Probe(model) as probe:
        assert model(torch.randn(0, 4)).shape == (0, 4)
    assert not probe.records
    with torch.no_grad(), Probe(model) as probe:
        model(torch.randn(2, 3, 4))
    assert {r.site for r in probe.records} == {"1"}
