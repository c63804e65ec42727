"""Seconds per training step (forward + backward + AdamW) of candidate teacher networks on this CPU.

    python benchmarks/teacher_train_speed.py --threads 1 2 --batch 32 --steps 6
    python benchmarks/teacher_train_speed.py --only lean-64 lean-p2-96 --precision fp32 bf16

Each candidate runs `--warmup` untimed steps, then `--steps` timed ones; the median is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn


class DiffusersBaseline(nn.Module):
    """The issue's measured baseline: diffusers UNet2DModel (32/64/128, one block per level),
    text embedding projected to the time-embedding width and added as an 'identity' class embedding."""

    def __init__(self, channels=(32, 64, 128), resolution=32, text_dim=384):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=channels,
                                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                                class_embed_type="identity", norm_num_groups=8)
        emb = channels[0] * 4
        self.proj = nn.Sequential(nn.Linear(text_dim, emb), nn.SiLU(), nn.Linear(emb, emb))

    def forward(self, x, t, text):
        return self.unet(x, t, class_labels=self.proj(text)).sample


def candidates(resolution: int) -> dict:
    from sds3d.teachers.unet import LeanUNet, NetConfig

    lean = lambda **kw: (lambda: LeanUNet(NetConfig(resolution=resolution, **kw)))
    return {
        "diffusers-32-64-128": lambda: DiffusersBaseline((32, 64, 128), resolution),
        "lean-32-64-128": lean(channels=(32, 64, 128)),
        "lean-48-96-192": lean(channels=(48, 96, 192)),
        "lean-32-64-128-b2": lean(channels=(32, 64, 128), blocks_per_level=2),
        "lean-64-128-128": lean(channels=(64, 128, 128)),
        "lean-p2-64-128-256": lean(channels=(64, 128, 256), patch=2, attention_levels=(1,)),
        "lean-p2-96-192-192": lean(channels=(96, 192, 192), patch=2, attention_levels=(1,)),
        "lean-p2-128-256-256-b2": lean(channels=(128, 256, 256), patch=2, blocks_per_level=2, attention_levels=(1, 2)),
    }


def time_steps(make, batch: int, resolution: int, steps: int, warmup: int, precision: str, channels_last: bool,
               compile_model: bool) -> tuple[float, int]:
    torch.manual_seed(0)
    model = make()
    params = sum(p.numel() for p in model.parameters())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, resolution, resolution)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    text = torch.randn(batch, 384)
    times = []
    for i in range(warmup + steps):
        t = torch.randint(0, 1000, (batch,))
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = run(x, t, text)
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (slow first steps)")
    parser.add_argument("--only", nargs="*", default=None, help="candidate names (default: all)")
    args = parser.parse_args(argv)
    table = candidates(args.resolution)
    names = args.only or list(table)
    print(f"batch {args.batch}, {args.resolution}x{args.resolution}, median of {args.steps} steps "
          f"(channels_last={args.channels_last}, compile={args.compile})")
    print(f"{'candidate':28s} {'params':>8s} {'threads':>7s} {'precision':>9s} {'s/step':>8s} {'img/s':>7s}")
    for name in names:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for precision in args.precision:
                sec, params = time_steps(table[name], args.batch, args.resolution, args.steps, args.warmup,
                                         precision, args.channels_last, args.compile)
                print(f"{name:28s} {params / 1e6:7.2f}M {threads:7d} {precision:>9s} {sec:8.3f} {args.batch / sec:7.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
