"""figC5 (isoprobe.experiments.transformer): Theorem 1 at every LayerNorm of a pretrained transformer."""

import json

import pytest

from isoprobe.experiments import Options, ReproductionOptionError, run_reproductions
from isoprobe.experiments.base import summarize
from isoprobe.experiments.transformer import (
    _block,
    _drawn,
    _short,
    figc5_verdict,
    site_rows,
)
from isoprobe.records import Record

CFG = {
    "blocks": 6,
    "model": {"asked": "gpt2", "name": "gpt2"},
    "texts": {
        "source": "hand-made",
        "count": 1,
        "chars_per_text": 512,
        "paper": "Simple English Wikipedia",
    },
}


def _record(site, point, gap, holds=None, bound=None, n=5):
    return Record(
        site=site,
        kind="norm",
        point=point,
        view="token",
        item=0,
        step=0,
        n=n,
        dim=8,
        isometry=None if gap is None else 2.718281828**-gap,
        isometry_gap=gap,
        orthogonality_gap=0.1,
        theorem1_bound=bound,
        theorem1_holds=holds,
    )


def _rows(holds: list[bool | None], n: int = 5, normalized: float = 0.4, post: float = 0.45) -> list[dict]:
    """One LayerNorm call per entry of ``holds`` (Theorem 1's check there; None: no gaps): input gap 0.5,
    ``normalized`` after the normalisation step, ``post`` after the affine part."""
    recs = []
    for i, h in enumerate(holds):
        site = f"h.{i}.ln_1"
        gap = None if h is None else 0.5
        recs += [
            _record(site, "pre", gap, n=n),
            _record(site, "centered", gap, n=n),
            _record(site, "normalized", None if h is None else normalized, h, None if h is None else 0.5, n=n),
            _record(site, "post", None if h is None else post, n=n),
        ]
    return site_rows(recs, 0)


def test_verdict_holds_when_the_normalisation_lowers_the_gap_at_every_call():
    v = figc5_verdict(_rows([True, True, True]), CFG)
    assert v.verdict == "held" and v.measured["normalisation_lowers_the_gap"] == 3 == v.measured["layernorm_calls"]
    assert "lowers the gap at 3 of 3" in v.reason and "after the affine part 3 of 3" in v.reason


def test_verdict_fails_where_the_normalisation_raises_the_gap():
    rows = _rows([True, True, True])
    rows[2]["gap"] = 0.6  # h.0.ln_1 normalised above its input
    v = figc5_verdict(rows, CFG)
    assert v.verdict == "not held" and v.held is False and "h.0.ln_1" in v.reason
    assert v.measured["normalisation_raises_the_gap_at"] == ["h.0.ln_1"]


def test_the_affine_part_is_reported_not_judged():
    v = figc5_verdict(_rows([True, True], post=0.7), CFG)  # the affine part raises the gap again
    assert v.verdict == "held" and v.measured["with_affine_lowers_the_gap"] == 0
    assert v.measured["with_affine_raises_the_gap_at"] == ["h.0.ln_1", "h.1.ln_1"]


def test_theorem1_holding_everywhere_is_not_enough():
    """Theorem 1 holds for every input: a normalisation that leaves the gap unchanged is not 'lowered'."""
    v = figc5_verdict(_rows([True, True], normalized=0.5), CFG)
    assert v.verdict == "undecided" and v.measured["theorem1_violations"] == 0


def test_eps_dominated_records_are_counted_apart_and_not_checked():
    from isoprobe.records import EPS_DOMINATED

    rows = _rows([True, True])
    assert rows[2]["site"] == "h.0.ln_1" and rows[2]["point"] == "normalized"
    rows[2]["theorem1_holds"], rows[2]["flag"] = "", EPS_DOMINATED  # as site_rows writes it
    v = figc5_verdict(rows, CFG)
    assert v.measured["records_checked"] == 1 and v.measured["records_undecided_eps_dominated"] == 1


def test_verdict_is_undecided_when_nothing_could_be_checked():
    v = figc5_verdict(_rows([None, None], n=1), CFG)
    assert v.verdict == "undecided" and v.held is None and "no LayerNorm record" in v.reason
    assert "fewer than 2 tokens" in v.reason


def test_block_numbers_and_last_blocks():
    assert _block("transformer.h.7.ln_1") == 7 and _block("encoder.layer.3.output.LayerNorm") == 3
    assert _block("ln_f") == "" and _block("embeddings.LayerNorm") == ""
    rows = _rows([True] * 8) + site_rows([_record("ln_f", "pre", 0.3)], 0)
    assert _drawn(rows, 6) == [(f"h.{i}.ln_1", "norm") for i in range(2, 8)]
    assert _short(["encoder.layer.0.output.LayerNorm", "encoder.layer.1.output.LayerNorm"]) == [
        "0.output.LayerNorm",
        "1.output.LayerNorm",
    ]


def test_offline_without_gpt2_weights_fails_fast_with_the_gpt2_message(monkeypatch, tmp_path):
    from isoprobe.models import ModelLoadError, load_gpt2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        load_gpt2("gpt2", "pretrained")
    except ModelLoadError as error:
        expected = str(error)
    else:
        pytest.skip("GPT-2 weights are cached here")
    with pytest.raises(ReproductionOptionError) as info:
        run_reproductions(["figC5"], Options(), tmp_path, show_progress=False, echo=lambda m: None)
    assert expected in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_figc5_runs_on_the_pretrained_minilm_offline(minilm_path, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat and looked at the door.\n")
    opts = Options(model=str(minilm_path), text_file=str(texts))
    (summary,) = run_reproductions(["figC5"], opts, tmp_path / "out", show_progress=False, echo=lambda m: None)
    assert summary["verdict"] == "held" and summary["measured"]["texts"] == 1
    assert summary["measured"]["records_checked"] == 13  # 13 LayerNorms in MiniLM-L6, one check each
    on_disk = json.loads((tmp_path / "out" / "figC5.json").read_text())
    model = on_disk["config"]["model"]
    assert model["class"] == "BertModel" and model["pretrained"] is True and model["path"] == str(minilm_path)
    assert on_disk["config"]["texts"]["paper_texts"] is False and on_disk["config"]["texts"]["count"] == 1
    assert (tmp_path / "out" / "figC5.png").stat().st_size > 10_000
    # the model and texts are not the paper's: a substitute, labelled and counted apart
    assert on_disk["data"]["substitute"] is True and on_disk["data"]["used"].endswith("on the texts of texts.txt")
    assert "on substitute data (1): 1 held" in summarize([summary], tmp_path / "out")


def test_all_leaves_figc5_out_offline_without_weights_and_says_why(monkeypatch):
    from isoprobe.experiments.base import select
    from isoprobe.models import ModelLoadError, load_gpt2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        load_gpt2("gpt2", "pretrained")
    except ModelLoadError:
        pass
    else:
        pytest.skip("GPT-2 weights are cached here")
    said = []
    names = select(["all"], Options(), echo=said.append)
    assert "figC5" not in names and "fig4" in names
    assert any(m.startswith("leaving out figC5: cannot load pretrained model 'gpt2'") for m in said)
