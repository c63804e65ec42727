"""Seconds per SDS optimization step of `generate`, split into render / teacher / backward.

    python benchmarks/step.py [--resolution 32 64] [--steps 20] [--preset cpu-fast] [--checkpoint RUN/checkpoints/last.pt]

A fresh field is a blob filling much of the box; `--checkpoint` times the steps of a trained
field (e.g. the last checkpoint of `sds3d generate "a red cube"`), which is what most of a run costs.

`--compare-fused-mlp` alternates the steps between the fused CPU field network
(csrc/mlp_kernels.cpp) and the same network in torch ops (`NeRFField(fused_mlp=False)`), so that
both see the same machine state (a shared machine's speed drifts by 2-3x over minutes), and
prints both with their ratio. `--compare-fused-sampler` does the same for the renderer's samples
(csrc/sampling_kernels.cpp against `render_rays(fused_sampling=False)`) and
`--compare-fused-compositor` for its compositing (csrc/compositing_kernels.cpp against nerfacc's
and torch's ops, `render_rays(fused_compositing=False)`). `--out` saves the lines as a markdown file.
"""

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from sds3d.config import make_config, parse_overrides
from sds3d.distill.score import sds_loss
from sds3d.geometry.views import VIEW_NAMES, view_names
from sds3d.geometry.cameras import sample_cameras
from sds3d.nerf.occupancy import OccupancyGrid
from sds3d.nerf.render import render_image
from sds3d.pipelines.regularizers import orientation_loss
from sds3d.pipelines.text_to_3d import make_field, make_optimizer, make_teacher, view_prompts
from sds3d.precision import cpu_capability, read_cpuinfo
from sds3d.threads import openmp_waiting


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--teacher", default=None, help="embedded (default), oracle, ...")
    parser.add_argument("--resolution", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shading", default="lambertian")
    parser.add_argument("--encoding-backend", default="auto", choices=["auto", "cpp", "torch"])
    parser.add_argument("--checkpoint", default=None, help="a run's checkpoints/last.pt: time a trained field")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="config overrides, e.g. early_stop_eps=0 num_samples=32 (YAML values)")
    parser.add_argument("--compare-fused-mlp", action="store_true",
                        help="alternate steps between the fused field network and its torch ops")
    parser.add_argument("--compare-fused-sampler", action="store_true",
                        help="alternate steps between the fused ray sampler and its torch ops")
    parser.add_argument("--compare-fused-compositor", action="store_true",
                        help="alternate steps between the fused compositor and nerfacc's and torch's ops")
    parser.add_argument("--out", default=None, help="also write the lines to this markdown file")
    args = parser.parse_args()
    comparisons = {"network": args.compare_fused_mlp, "sampler": args.compare_fused_sampler,
                   "compositor": args.compare_fused_compositor}
    if sum(comparisons.values()) > 1:
        parser.error("compare one thing at a time: --compare-fused-mlp, --compare-fused-sampler or "
                     "--compare-fused-compositor")
    compare = any(comparisons.values())
    part = next((name for name, on in comparisons.items() if on), None)
    lines = []
    for resolution in args.resolution:
        cfg = make_config(args.preset, prompt=args.prompt, teacher=args.teacher, render_resolution=resolution,
                          encoding_backend=args.encoding_backend, explicit=parse_overrides(args.set))
        torch.manual_seed(0)
        field, teacher = make_field(cfg), make_teacher(cfg)  # on the CPU
        optimizer = make_optimizer(cfg, field)
        occupancy = OccupancyGrid(resolution=cfg.occupancy_resolution, update_every=cfg.occupancy_update_every)
        if args.checkpoint:
            state = torch.load(args.checkpoint, weights_only=True)
            field.load_state_dict(state["field"])
            occupancy.load_state_dict(state["occupancy"])
        else:
            occupancy.update(field)
        prompts = dict(zip(VIEW_NAMES, view_prompts(cfg, list(VIEW_NAMES))))
        teacher.encode_prompt(list(prompts.values()))
        if hasattr(teacher, "unconditional_data"):  # the oracle builds its image banks up front
            teacher.unconditional_data()
        g = torch.Generator().manual_seed(0)
        variants = ("fused", "torch") if compare else ("default",)
        times = {v: {"render": [], "teacher": [], "backward": [], "total": []} for v in variants}
        for step in range(len(variants) * (args.steps + 3)):
            variant = variants[step % len(variants)]
            if args.compare_fused_mlp:
                field.fused_mlp = variant == "fused"
            fused_sampling = not (args.compare_fused_sampler and variant == "torch")
            fused_compositing = not (args.compare_fused_compositor and variant == "torch")
            t0 = time.perf_counter()
            cams = sample_cameras(cfg.batch_size, resolution, cfg.elevation_range, cfg.azimuth_range,
                                  cfg.distance_range, cfg.fovy_range, generator=g)
            out = render_image(field, cams, occupancy=occupancy, num_samples=cfg.num_samples, shading=args.shading,
                               generator=g, early_stop_eps=cfg.early_stop_eps, fused_sampling=fused_sampling,
                               fused_compositing=fused_compositing,
                               need_normals=args.shading != "albedo" or cfg.lambda_orientation > 0)
            t1 = time.perf_counter()
            cond = teacher.encode_prompt([prompts[v] for v in view_names(cams)])
            loss = sds_loss(teacher, out["rgb"], cond, cfg.guidance_scale, cfg.t_min, cfg.t_max, g).loss
            loss = loss + cfg.lambda_orientation * orientation_loss(out["backfacing"]) if "backfacing" in out else loss
            t2 = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            occupancy.update(field, step=step + 1, generator=g)  # as the pipeline does
            t3 = time.perf_counter()
            if step >= 3 * len(variants):
                for k, v in zip(times[variant], (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    times[variant][k].append(v)
        medians = {}
        for variant in variants:
            medians[variant] = {k: sorted(v)[len(v) // 2] for k, v in times[variant].items()}
            network = "" if variant == "default" else f", {part} {variant}"
            lines.append(f"{resolution}x{resolution} batch {cfg.batch_size} {args.shading} {field.encoding.backend}{network}: "
                         + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in medians[variant].items()))
            print(lines[-1], flush=True)
        if compare:
            lines.append("fused / torch: " + "  ".join(f"{k} {medians['fused'][k] / medians['torch'][k]:.2f}x"
                                                       for k in medians["fused"]))
            print(lines[-1], flush=True)
    if args.out:
        cpu, _ = read_cpuinfo()
        command = "python benchmarks/step.py " + shlex.join(sys.argv[1:])
        text = [f"# Seconds per SDS step (median of {args.steps} steps{' each' if compare else ''})", "",
                f"`{command}` on {cpu} ({cpu_capability()}), {torch.get_num_threads()} threads ({openmp_waiting()}), "
                f"torch {torch.__version__}, "
                f"python {platform.python_version()}.", "", "```", *lines, "```", ""]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(text))


if __name__ == "__main__":
    main()
