"""Training the world classifier (sds3d/eval/classifier.py) on world renders.

    python -m sds3d.training.classifier train     # minutes on one CPU thread; rewrites the shipped weights
    python -m sds3d.training.classifier evaluate  # accuracy of the shipped weights on fresh renders

A short supervised run (one-cycle AdamW over epochs of augmented renders); it does not use the
diffusion training loop, whose per-step determinism and resume it does not need.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..eval.classifier import COLOR_NAMES, WEIGHTS_PATH, WorldClassifier, evaluate, evaluation_sets, load_classifier
from ..geometry.views import VIEW_NAMES
from ..world.scenes import CATEGORIES


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving perturbations, so that imperfect generated images are still read right:
    shifts of up to 2 px (white fill), mild blur, brightness within 5%, Gaussian noise."""
    b, _, h, w = images.shape
    pad = 2
    padded = F.pad(images, (pad,) * 4, value=1.0)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 3, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 3, h, w)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    blur = torch.rand(b, generator=generator) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None]) / 16
        blurred = F.conv2d(F.pad(out[blur], (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        out[blur] = blurred
    scale = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    noise = torch.randn(out.shape, generator=generator) * 0.04 * torch.rand(b, 1, 1, 1, generator=generator)
    return (out * scale + noise).clamp(0, 1)


def train_classifier(out_weights: str | Path = WEIGHTS_PATH, epochs: int = 12, batch_size: int = 128, lr: float = 3e-3,
                     views_per_scene: int = 96, seed: int = 0, log=print) -> tuple[WorldClassifier, dict]:
    """Train on renders of every scene (seed 1, 15% overhead cameras), evaluate on fresh renders
    (seed 2), save weights (safetensors) and config+metrics json next to them."""
    from safetensors.torch import save as save_safetensors

    from ..world.dataset import RenderSpec, world_renders
    from ..io import atomic_path, atomic_write_text

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    spec = RenderSpec(resolution=32, views_per_scene=views_per_scene, seed=1, overhead_fraction=0.15)
    data = world_renders(spec, progress=True)
    test = evaluation_sets()
    log(f"data: {len(data)} training renders, {len(test)} test renders ({time.time() - start:.0f} s)")
    model = WorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    labels = {"category": data.category, "color": data.color, "view": data.view}
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data), generator=gen)
        total_loss = 0.0
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size]
            x = augment(data.float_images(idx), gen)
            logits = model(x)
            loss = (F.cross_entropy(logits["category"], labels["category"][idx], label_smoothing=0.05)
                    + F.cross_entropy(logits["color"], labels["color"][idx], label_smoothing=0.05)
                    + 0.5 * F.cross_entropy(logits["view"], labels["view"][idx], label_smoothing=0.05))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total_loss += float(loss.detach()) * idx.numel()
        metrics = evaluate(model, test)
        log(f"epoch {epoch + 1}/{epochs} loss {total_loss / len(data):.4f} test {metrics['all']} "
            f"held-out pairs {metrics['held_out_pairs']} ({time.time() - start:.0f} s)")
    model.eval()
    metrics = evaluate(model, test)
    out_weights = Path(out_weights)
    with atomic_path(out_weights) as tmp:
        tmp.write_bytes(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}))
    meta = {"config": model.config.to_dict(), "categories": list(CATEGORIES), "colors": list(COLOR_NAMES),
            "views": list(VIEW_NAMES), "train": {"renders": spec.to_dict(), "epochs": epochs, "batch_size": batch_size,
                                                  "lr": lr, "seed": seed, "seconds": round(time.time() - start, 1)},
            "test": {"renders": "RenderSpec(resolution=32, views_per_scene=32, seed=2): generate's camera ranges",
                     **metrics}}
    atomic_write_text(out_weights.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return model, metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sds3d.training.classifier")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--out", default=str(WEIGHTS_PATH))
    tr.add_argument("--epochs", type=int, default=12)
    tr.add_argument("--threads", type=int, default=None)
    sub.add_parser("evaluate")
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "train":
        _, metrics = train_classifier(args.out, epochs=args.epochs)
    else:
        metrics = evaluate(load_classifier(), evaluation_sets())
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
