"""Models split by accelerate (CPU and disk offload here; no GPU): the Probe's records equal the
single-device run's; ``inspect --device-map`` and its option checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_bert

from isoprobe import Probe
from isoprobe.cli import main
from isoprobe.placement import dispatch_options, input_device, parse_max_memory

pytest.importorskip("accelerate")

TEXTS = ["the quick brown fox jumps over the lazy dog", "norms keep tokens apart in deep nets, layer by layer"]
SPLIT = {"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "disk", "pooler": "disk"}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with the MiniLM package's WordPiece tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden=32, positions=32)


def _records(model, path):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(path)(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), Probe(model) as probe:
        model(**batch)
    return probe.records


def _same(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for name, u in x.to_dict().items():
            v = getattr(y, name)
            ok = math.isclose(u, v, rel_tol=1e-12) if isinstance(u, float) and math.isfinite(u) else u == v
            assert ok, (x.key, name, u, v)


def test_a_model_split_over_cpu_and_disk_gives_the_single_device_records(tiny_bert, tmp_path):
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModel

    whole = AutoModel.from_pretrained(tiny_bert).eval()
    split = AutoModel.from_pretrained(tiny_bert, device_map=SPLIT, offload_folder=tmp_path / "off").eval()
    assert split.encoder.layer[1].attention.self.query.weight.device.type == "meta"  # on the disk, really
    _same(_records(split, tiny_bert), _records(whole, tiny_bert))
    with init_empty_weights():  # the meta-device path: no weights in memory until dispatched
        empty = AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert))
    dispatched = load_checkpoint_and_dispatch(empty, str(tiny_bert), device_map=SPLIT, offload_folder=tmp_path / "o2")
    _same(_records(dispatched.eval(), tiny_bert), _records(whole, tiny_bert))
    assert input_device(dispatched) == torch.device("cpu")


def test_inspect_device_map_auto_with_disk_offload_prints_the_single_device_records(tiny_bert, tmp_path):
    args = ["inspect", "--model", str(tiny_bert), "--format", "json", "--quiet"]
    for t in TEXTS:
        args += ["--text", t]
    plain = CliRunner().invoke(main, args)
    offload = ["--device-map", "auto", "--max-memory", "cpu=100KB", "--offload-folder", str(tmp_path / "off")]
    split = CliRunner().invoke(main, [*args, *offload])
    assert plain.exit_code == split.exit_code == 0, split.output
    assert "accelerate placed the whole model: 1 on disk" in split.stderr
    assert json.loads(split.stdout) == json.loads(plain.stdout)


def test_placement_options_are_checked_before_any_work(tmp_path):
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE pairs"):
        parse_max_memory("cpu:4GiB")
    with pytest.raises(ValueError, match="give --device-map auto too"):
        dispatch_options(None, "cpu=1GiB", None)
    with pytest.raises(ValueError, match="--device-map must be one of auto"):
        dispatch_options("everywhere", None, None)
    result = CliRunner().invoke(
        main, ["inspect", "--model", str(tmp_path / "m"), "--text", "a b", "--max-memory", "0=1GiB"]
    )
    assert result.exit_code == 2 and "give --device-map auto too" in result.output
