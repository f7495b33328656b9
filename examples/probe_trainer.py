"""Probe a model while HuggingFace's Trainer trains it (``isoprobe.integrations.ProbeCallback``).

A tiny random GPT-2 learns a toy token sequence for a few steps, offline. The callback keeps one
summary row per (recorded step, site, point) in ``callback.history``; pass
``writer=tensorboard_writer("runs/iso")`` to log them to TensorBoard (needs ``tensorboard``).
The Trainer itself needs ``accelerate`` (``pip install "isoprobe[trainer]"``, i.e. accelerate ≥ 1.1).

    python examples/probe_trainer.py
"""

import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from isoprobe.integrations import ProbeCallback


def main(steps: int = 12) -> None:
    try:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="isoprobe-trainer-"),
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to=[],
            logging_steps=steps,
            save_strategy="no",
            use_cpu=True,
        )
    except ImportError as error:  # transformers' Trainer requires accelerate
        sys.exit(f"this example needs the Trainer's dependencies: {error}")

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    ids = torch.arange(32).remainder(7).repeat(16, 1)  # a periodic toy language
    data = [{"input_ids": row, "labels": row} for row in ids]

    callback = ProbeCallback(sites="transformer.h.*.ln_*", every=4)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

    for row in callback.history:
        if row["point"] == "normalized":
            print(
                f"step {row['global_step']:3d}  {row['site']:22s}  gap {row['gap_mean']:.4f}  "
                f"Theorem 1 violations {row['theorem1_violations']}/{row['theorem1_checked']}"
            )


if __name__ == "__main__":
    main()
