"""Few-shot image classification with KAdaptation and VPT on a small ViT pretrained here (issue 27 item 3).

    OMP_NUM_THREADS=1 python -m benchmarks.vision_fewshot          # 3 seeds, 4 and 16 shots (~5 min)
    OMP_NUM_THREADS=1 python -m benchmarks.vision_fewshot --quick  # 2 seeds, 4 shots

No pretrained vision model installs offline, so the backbone is a tiny ViT (32×32 images, 8×8
patches, 4 layers, width 64) pretrained here, fully, on four generated shape classes (disc,
square, ring, plus sign). The target task is four other shapes (triangle, cross, horizontal and
vertical bars) at k shots per class; every method trains the classifier head and, besides linear
probing, its own module: KAdaptation, VPT-shallow, VPT-deep, LoRA, and full fine-tuning of every
weight. Images differ in position, size, colour and noise. Means over seeds with 95 % t-intervals;
the "random backbone" row trains VPT-deep on an unpretrained ViT (a control: what the
pretraining is worth). This shows the code learns and how the methods compare on one toy domain;
it says nothing about ELEVATER or VTAB, where the papers' claims live.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import pelthub as ph
from pelthub.transfer.stats import mean_ci

SIZE = 32
SOURCE = ("disc", "square", "ring", "plus")
TARGET = ("triangle", "cross", "hbar", "vbar")


def shape_mask(kind: str, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(N, SIZE, SIZE) masks of `kind` centred at (cy, cx) with radius r, one per image (vectorised)."""
    y = torch.arange(SIZE).view(1, SIZE, 1).float()
    x = torch.arange(SIZE).view(1, 1, SIZE).float()
    dy, dx, r = y - cy.view(-1, 1, 1), x - cx.view(-1, 1, 1), r.view(-1, 1, 1)
    thin = r / 3
    return {
        "disc": dy ** 2 + dx ** 2 <= r ** 2,
        "square": (dy.abs() <= r) & (dx.abs() <= r),
        "ring": ((dy ** 2 + dx ** 2).sqrt() - r).abs() <= 1.2,
        "plus": ((dy.abs() <= thin) & (dx.abs() <= r)) | ((dx.abs() <= thin) & (dy.abs() <= r)),
        "triangle": (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2),
        "cross": (((dy - dx).abs() <= thin) | ((dy + dx).abs() <= thin)) & (dy.abs() <= r) & (dx.abs() <= r),
        "hbar": (dy.abs() <= thin) & (dx.abs() <= r),
        "vbar": (dx.abs() <= thin) & (dy.abs() <= r),
    }[kind]


def images(classes: tuple[str, ...], per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (N, 3, SIZE, SIZE), labels (N,)): shapes of random place, size and colour on noise."""
    g = torch.Generator().manual_seed(seed)
    pixels, labels = [], []
    for label, kind in enumerate(classes):
        n = per_class
        r = 4 + 5 * torch.rand(n, generator=g)
        cy, cx = (r + (SIZE - 2 * r) * torch.rand(2, n, generator=g)).unbind(0)
        mask = shape_mask(kind, cy, cx, r).float()[:, None]                       # (n, 1, S, S)
        colour = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + 0.2
        background = torch.rand(n, 3, 1, 1, generator=g) * 0.3
        noise = 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
        pixels.append(background + mask * colour + noise)
        labels.append(torch.full((n,), label))
    return torch.cat(pixels), torch.cat(labels)


def vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=len(SOURCE))
    return ViTForImageClassification(config)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int,
          batch: int = 32) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=g)
        loss = nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def pretrained(steps: int) -> ViTForImageClassification:
    model = vit(seed=0)
    x, y = images(SOURCE, 500, seed=100)
    train(model, x, y, steps=steps, lr=1e-3, seed=0, batch=64)
    tx, ty = images(SOURCE, 100, seed=101)
    print(f"pretraining on {SOURCE}: {steps} steps, held-out accuracy {accuracy(model, tx, ty):.3f}", flush=True)
    return model


def for_target(backbone: ViTForImageClassification) -> ViTForImageClassification:
    """The backbone with a fresh 4-way head (the head trains in every method)."""
    model = copy.deepcopy(backbone)
    model.classifier = nn.Linear(model.config.hidden_size, len(TARGET))
    model.config.num_labels = len(TARGET)
    return model


def method(name: str, backbone: ViTForImageClassification) -> tuple[nn.Module, float]:
    """(model with only the method's parameters and the head trainable, learning rate)."""
    model = for_target(backbone)
    if name == "full fine-tuning":
        return model.requires_grad_(True), 1e-3
    model.requires_grad_(False)
    configs = {"linear probe": None, "KAdaptation": ph.KAdaptation(), "VPT-shallow": ph.VPT(length=5, deep=False),
               "VPT-deep": ph.VPT(length=5), "VPT-deep, random backbone": ph.VPT(length=5), "LoRA": ph.LoRA(r=4)}
    if configs[name] is None:
        model.classifier.requires_grad_(True)
        return model, 1e-2
    return ph.attach(model, configs[name], head=True), 1e-2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 shots")
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=100, help="training steps per few-shot run")
    args = parser.parse_args()
    seeds, shots = ((0, 1), (4,)) if args.quick else ((0, 1, 2), (4, 16))
    start = time.perf_counter()
    backbone = pretrained(args.pretrain_steps)
    random_backbone = vit(seed=0)
    test_x, test_y = images(TARGET, 100, seed=7)
    names = ["linear probe", "KAdaptation", "VPT-shallow", "VPT-deep", "LoRA", "full fine-tuning",
             "VPT-deep, random backbone"]
    rows = {}
    for name in names:
        for k in shots:
            found = []
            for seed in seeds:
                x, y = images(TARGET, k, seed=1000 + seed)
                torch.manual_seed(seed)
                model, lr = method(name, random_backbone if "random" in name else backbone)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                train(model, x, y, steps=args.steps, lr=lr, seed=seed)
                found.append(accuracy(model, test_x, test_y))
            rows[name, k] = (mean_ci(found), trainable)
    print(f"\ntarget {TARGET}, {len(seeds)} seeds, test 400 images, chance 0.25; "
          f"{time.perf_counter() - start:.0f} s\n")
    print(f"| method | trainable | " + " | ".join(f"{k} shots" for k in shots) + " |")
    print("|---|---:|" + "---:|" * len(shots))
    for name in names:
        cells = " | ".join(f"{rows[name, k][0][0]:.3f} ± {rows[name, k][0][1]:.3f}" for k in shots)
        print(f"| {name} | {rows[name, shots[0]][1]:,} | {cells} |")


if __name__ == "__main__":
    main()
