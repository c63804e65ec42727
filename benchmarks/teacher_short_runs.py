"""Short teacher training runs that compare recipes by the world classifier's prompt accuracy.

    python benchmarks/teacher_short_runs.py --variants v-cos-p2 eps-lin-p2 v-cos-full32 --steps 700 --threads 1

Every variant trains from scratch on the same data for the same number of steps (batch 32, lr 1e-3,
warm-up 100, cosine decay to the end), then its EMA model draws one DDIM-25 sample (guidance 3) for
each of 96 prompts (the 8 held-out pairs + 88 others); the classifier scores them. Runs go to
--root/<variant> (resumable); a summary is printed and written to --root/summary.json.

Measured 2026-11-22 (1 thread, shared 2-core Xeon with AMX, bf16 autocast, 700 steps x batch 32;
prompt accuracy of 96 DDIM-25 samples, guidance 3; s/step inflated by other jobs on the machine):

    variant        params  s/step  val loss  category  color  both  held-out color  backgrounds
    v-cos-full32    3.3M   0.45    0.0096    0.17      0.875  0.125     1.00         clean white
    v-cos-p2       11.0M   0.66    0.0175    0.10      0.52   0.03      0.625        clean white
    eps-lin-p2     11.0M   0.49    (eps)     0.05      0.20   0.01      0.125        noisy, tinted

(val loss: EMA model, fixed batches; v-loss values compare, eps does not.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sds3d.teachers.unet import NetConfig
from sds3d.training.teacher import TeacherTrainer, TrainConfig

P2 = dict(resolution=32, channels=(64, 128, 256), patch=2, attention_levels=(1,))
FULL32 = dict(resolution=32, channels=(32, 64, 128), patch=1, attention_levels=(2,))

VARIANTS = {
    "v-cos-p2": dict(network=P2, prediction_type="v_prediction", schedule="cosine", min_snr_gamma=5.0),
    "eps-lin-p2": dict(network=P2, prediction_type="epsilon", schedule="linear", min_snr_gamma=None),
    "v-cos-full32": dict(network=FULL32, prediction_type="v_prediction", schedule="cosine", min_snr_gamma=5.0),
    "x0-cos-p2": dict(network=P2, prediction_type="sample", schedule="cosine", min_snr_gamma=5.0),
}


def make_config(name: str, steps: int, threads: int | None) -> TrainConfig:
    spec = dict(VARIANTS[name])
    net = NetConfig(**spec.pop("network"))
    return TrainConfig(network=net, batch_size=32, lr=1e-3, warmup_steps=100, total_steps=steps, ema_decay=0.999,
                       threads=threads, eval_every=0, log_every=50, checkpoint_every=250, **spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["v-cos-p2", "eps-lin-p2", "v-cos-full32"])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default="runs/teacher-short")
    args = parser.parse_args(argv)
    root = Path(args.root)
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.variants:
        trainer = TeacherTrainer(root / name, make_config(name, args.steps, args.threads))
        start = time.time()
        trainer.train(max_steps=args.steps)
        trainer.config.eval_prompts, trainer.config.eval_steps, trainer.config.eval_guidance = 96, 25, 3.0
        result = trainer.evaluate()
        summary[name] = {"steps": trainer.step, "train_minutes": round(trainer.train_seconds / 60, 2),
                         "sec_per_step": round(trainer.train_seconds / max(1, trainer.step), 3),
                         "val_loss_ema": round(trainer.validation_loss(use_ema=True), 4),
                         **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}}
        print(name, json.dumps(summary[name]), f"({time.time() - start:.0f} s)", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
