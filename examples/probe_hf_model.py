"""Probe a HuggingFace model: token isometry before/after every LayerNorm and activation.

Runs offline in seconds on a small random-init GPT-2; swap in any model, e.g.
``GPT2LMHeadModel.from_pretrained("gpt2")`` (needs the weights) or a local checkpoint path.

    python examples/probe_hf_model.py [OUT_DIR]
"""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from isoprobe import Probe


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4)).eval()

    # two sequences of different lengths in one padded batch: the probe takes the padding out
    # of each sequence's token Gram using the attention mask the model receives
    input_ids = torch.randint(0, model.config.vocab_size, (2, 48))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0

    with torch.no_grad(), Probe(model) as probe:
        model(input_ids=input_ids, attention_mask=attention_mask)

    print(probe.summary())  # the table: one row per site and point, gap mean ± std, Theorem 1
    last = probe["transformer.h.3.ln_1:normalized"][0]
    print(f"\n{last.key}: I = {last.isometry:.4f} >= Theorem 1 bound {last.theorem1_bound:.4f}: {last.theorem1_holds}")
    out.mkdir(parents=True, exist_ok=True)
    probe.to_csv(out / "records.csv")
    probe.plot(out / "plot.png", title="random GPT-2, 4 layers")
    print(f"wrote {out / 'records.csv'} and {out / 'plot.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="isoprobe-")))
