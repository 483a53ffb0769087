"""What DCL's official rule changes against nemo_hf's earlier one, measured (not a speed benchmark).

Official (default): weighted cross-entropy (0.9, 1.1), masked term at the decoder's resolution. Earlier
nemo_hf rule: ``MaskRIS(class_weights=None, distil_at="labels")``. Two settings, several seeds each:

1. a tiny random CLIPSeg (binary logits at the labels' size, so only the weights differ) on 8 real-photo
   rows collated with ``RISCollator(..., maskris=MaskRIS())``;
2. a model whose logits come at a quarter of the labels' size (LAVT / CARIS decoders), two classes.

Printed per setting: the relative difference of the loss, of the parameters' gradient (L2 of the difference
over L2 of the official one) and, for 2, of the masked logits' gradient.

    python bench/fidelity_dcl.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_maskris import photo_rows  # noqa: E402

from nemo_hf.training import RISCollator, dcl_loss, dcl_two_pass, tiny_random_clipseg  # noqa: E402
from nemo_hf.transforms.maskris import MaskRIS  # noqa: E402

EARLIER = {"class_weights": None, "distil_at": "labels"}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def parameter_gradient(model, batch, **options) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    loss, _, _ = dcl_two_pass(model, batch, backward_clean=torch.Tensor.backward, **options)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def clipseg_setting(seed: int) -> tuple[float, float]:
    model, processor = tiny_random_clipseg(image_size=64, seed=seed)
    rows = photo_rows(8, 64, seed=seed)
    for i, row in enumerate(rows):
        row.update(split="train", sent_id=i)
    batch = RISCollator(processor, maskris=MaskRIS(seed=seed))(rows)
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    official = parameter_gradient(model, batch)
    earlier = parameter_gradient(model, batch, **EARLIER)
    return abs(earlier[0] - official[0]) / official[0], relative(earlier[1], official[1])


class QuarterResolution(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Conv2d(16, 2, 3, padding=1))

    def forward(self, pixel_values, **_):
        return {"logits": self.net(pixel_values)}


def quarter_setting(seed: int) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = QuarterResolution()
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(4, 96, 96)
    labels[:, 20:70, 30:80] = 1
    batch = {
        "pixel_values": torch.randn(4, 3, 96, 96, generator=gen) + labels[:, None],
        "input_ids": torch.zeros(4, 1, dtype=torch.long),
        "labels": labels,
        "masked_pixels": torch.rand(4, 96, 96, generator=gen) < 0.75,
        "input_ids_masked": torch.zeros(4, 1, dtype=torch.long),
    }
    official = parameter_gradient(model, batch)
    earlier = parameter_gradient(model, batch, **EARLIER)
    clean = model(batch["pixel_values"])["logits"].detach()
    grads = []
    for options in ({}, EARLIER):
        masked = model(batch["pixel_values"] * ~batch["masked_pixels"][:, None])["logits"].detach().requires_grad_()
        dcl_loss(clean, masked, labels, **options).backward()
        grads.append(masked.grad)
    return abs(earlier[0] - official[0]) / official[0], relative(earlier[1], official[1]), relative(grads[1], grads[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = [clipseg_setting(s) for s in range(args.seeds)]
    quarter = [quarter_setting(s) for s in range(args.seeds)]

    def span(values) -> str:
        return f"{100 * min(values):.2f}-{100 * max(values):.2f}%"

    print(f"earlier rule vs official, {args.seeds} seeds (min-max of relative differences)")
    print(f"1. tiny CLIPSeg, logits at the labels' size: loss {span([c[0] for c in clip])}, "
          f"parameter gradient {span([c[1] for c in clip])}")
    print(f"2. logits at a quarter of the labels' size: loss {span([q[0] for q in quarter])}, "
          f"parameter gradient {span([q[1] for q in quarter])}, masked logits' gradient {span([q[2] for q in quarter])}")


if __name__ == "__main__":
    main()
