"""Probe inside a plain PyTorch training loop: isometry at the norms while an MLP learns.

A LayerNorm MLP (Joudaki et al., eq. 1) trained with Adam on a synthetic task. The probe records
every 20th forward; ``pop_records`` hands the new records over and keeps memory bounded. The
hooks detach what they read, so gradients are exactly those of the unprobed model.

    python examples/probe_training_loop.py
"""

import torch
from torch import nn

from isoprobe import Probe
from isoprobe.records import summarize


def make_mlp(width: int = 128, depth: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(16, width)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 3)]
    return nn.Sequential(*layers)


def main(steps: int = 100, every: int = 20) -> None:
    torch.manual_seed(0)
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(512, 16)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()

    with Probe(model, sites="norm", every=every) as probe:  # samples of a batch are the items
        for step in range(steps):
            batch = torch.randperm(len(x))[:32]  # distinct samples: a repeated one makes G singular
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            records = probe.pop_records()
            if records:
                rows = {r["site"]: r for r in summarize(records) if r["point"] == "normalized"}
                gaps = "  ".join(f"ln{site}: {row['gap_mean']:.3f}" for site, row in rows.items())
                held = all(r.theorem1_holds for r in records if r.theorem1_holds is not None)
                print(f"step {step:3d}  loss {loss.item():.3f}  gap after norm  {gaps}  Theorem 1 held: {held}")


if __name__ == "__main__":
    main()
