"""The one training loop of sds3d: the embedded teacher and every image student train through it.

What it owns, so that no trainer writes it twice:

- **Determinism.** Every random draw of step k comes from `step_generator(seed, k)`, and data
  comes in a fixed per-epoch permutation (`DataOrder`), so the batch, noise and timesteps of a
  step are functions of the step number alone.
- **Exact resume.** The checkpoint holds the model, the EMA copy, the optimizer, extra modules
  (a student's critic, a fake score, ...), the step and the global torch RNG. A run stopped at
  any step and resumed continues bit for bit as if never stopped (same machine, same threads).
  Checkpoints are written atomically (temp file, then rename) and read with
  `torch.load(weights_only=True)`: a checkpoint cannot run code.
- **Schedules.** Linear warm-up then cosine decay of the learning rate (`learning_rate`), EMA
  with a warm-up of its decay (`ema_decay`), gradient-norm clipping, and a skipped update on a
  non-finite loss or gradient (deterministic, so resumption still matches; many in a row abort).
- **Stopping.** At `max_steps`, after `max_minutes` of this session, or on SIGINT / SIGTERM,
  always with a checkpoint to resume from.
- **Records.** `loss.csv` (one row per `log_every` steps, trimmed to the checkpoint on resume),
  `loss_curve.png` beside it, a tqdm bar on a terminal and a log line per `log_every` steps
  (also when the output is a file or a pipe), and the owner's periodic `evaluate` callback.

A trainer gives the loop its model, optimizer and a loss function `loss_fn(step, generator) ->
scalar tensor`; the loop does the rest. `LoopConfig` is the loop's own small config, so that this
module imports nothing above it.

Scale-out: given a Hugging Face `accelerate.Accelerator` (the way diffusers' training scripts run
on many GPUs and nodes; gloo on CPU), the loop backpropagates through it (gradients all-reduced,
so every replica takes the same update), draws each replica's batch from its own generator
(`step_generator(seed, step, rank)`), and only the main process writes files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..io import atomic_save_torch, atomic_write_text

CHECKPOINT = "checkpoints/last.pt"
LOSS_CSV = "loss.csv"
LOSS_CURVE = "loss_curve.png"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and what to do."""


@dataclass
class LoopConfig:
    """What the loop needs to know; a trainer's own config maps onto it (`TrainConfig.loop_config`)."""

    seed: int = 0
    lr: float = 1e-3
    lr_min_ratio: float = 0.05  # the cosine decay ends at lr * lr_min_ratio
    warmup_steps: int = 500
    total_steps: int = 50000  # length of the cosine decay; training may stop earlier or go on at the floor
    ema_decay: float | None = 0.9995  # None: no EMA copy
    grad_clip: float | None = 1.0  # None or 0: no clipping (the norm is still computed and checked)
    log_every: int = 25
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    eval_every: int = 0  # 0: never call `evaluate`
    max_skipped_in_a_row: int = 20


# --- pieces ----------------------------------------------------------------------------------

def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of all random draws of one training step: a function of (seed, step) only,
    and of the replica's rank when several processes train together (rank 0 = a single process)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 12345 + rank * 104_729) % (2 ** 63))


def learning_rate(config: LoopConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * lr_min_ratio at `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(config: LoopConfig, step: int) -> float:
    """EMA decay with warm-up, min(decay, (1 + k) / (10 + k)), so early EMA weights are not stuck at
    the random initialisation."""
    return min(config.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, p in zip(ema.buffers(), model.buffers()):
        e.copy_(p)


class DataOrder:
    """Batch k = samples [k B, (k + 1) B) of the concatenation of per-epoch permutations of n items."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self._perm

    def batch_indices(self, step: int) -> torch.Tensor:
        start = step * self.batch
        out = []
        while len(out) < self.batch:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(self.batch - len(out), self.n - pos)
            out.extend(self._permutation(epoch)[pos:pos + take].tolist())
        return torch.tensor(out, dtype=torch.long)

    def position(self, step: int) -> dict:
        epoch, pos = divmod(step * self.batch, self.n)
        return {"epoch": epoch, "offset": pos}


def write_loss_curve(csv_path: Path, png_path: Path, title: str = "") -> bool:
    """Plot loss.csv (step vs loss, log scale when positive) into a PNG; False when there is nothing to plot."""
    rows = [r.split(",") for r in csv_path.read_text().splitlines()[1:] if r] if csv_path.exists() else []
    points = [(int(r[0]), float(r[1])) for r in rows if math.isfinite(float(r[1]))]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = zip(*points)
    ax.plot(steps, losses, lw=1.2)
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return True


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --- the loop --------------------------------------------------------------------------------

class TrainingLoop:
    """Model + optimizer (+ EMA copy, + extra modules) trained in `out_dir` by a loss function.

    `extra_modules` are saved and restored with the model (e.g. a critic and its optimizer);
    `extra_state()` / `load_extra_state(dict)` carry anything else a trainer must resume exactly.
    """

    def __init__(self, out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: LoopConfig,
                 ema: nn.Module | None = None, log: Callable[[str], None] = print,
                 extra_modules: dict[str, nn.Module | torch.optim.Optimizer] | None = None,
                 extra_state: Callable[[], dict] | None = None, load_extra_state: Callable[[dict], None] | None = None,
                 parameters: list[torch.nn.Parameter] | None = None, title: str = "", accelerator=None):
        self.out_dir = Path(out_dir)
        self.model, self.optimizer, self.config, self.ema = model, optimizer, config, ema
        self.log = log
        self.extra_modules = dict(extra_modules or {})
        self._extra_state, self._load_extra_state = extra_state, load_extra_state
        self.parameters = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
        self.title = title
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = accelerator is None or accelerator.is_main_process
        self.step = 0
        self.train_seconds = 0.0
        self.skipped_in_a_row = 0
        if ema is not None and config.ema_decay is None:
            raise ValueError("an EMA module was given but config.ema_decay is None")

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "train_seconds": self.train_seconds, "torch_rng": torch.get_rng_state(),
                 "extra_modules": {k: m.state_dict() for k, m in self.extra_modules.items()}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self._extra_state is not None:
            state["extra"] = self._extra_state()
        return state

    def save(self) -> Path:
        if self.is_main:
            atomic_save_torch(self.state(), self.checkpoint_path)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return self.checkpoint_path

    def load(self, path: str | Path | None = None) -> None:
        """Restore a checkpoint (default: this run's); one-line `CheckpointError` when it is damaged."""
        path = Path(path) if path is not None else self.checkpoint_path
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            for name, module in self.extra_modules.items():
                module.load_state_dict(state["extra_modules"][name])
        except Exception as error:
            raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}): delete it to restart "
                                  f"from step 0, or restore a copy") from None
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if self._load_extra_state is not None:
            self._load_extra_state(state.get("extra", {}))
        self.trim_logs()
        self.log(f"resumed {self.out_dir} at step {self.step} ({self.train_seconds / 60:.1f} min of training so far)")

    def trim_logs(self, jsonl_logs: tuple[str, ...] = ("eval.jsonl",)) -> None:
        """Drop log rows written after the checkpoint we resume from (they will be redone)."""
        loss_csv = self.out_dir / LOSS_CSV
        if loss_csv.exists():
            rows = loss_csv.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if r and int(r.split(",")[0]) <= self.step]
            atomic_write_text(loss_csv, "\n".join(kept) + "\n")
        for name in jsonl_logs:
            path = self.out_dir / name
            if path.exists():
                kept = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
                atomic_write_text(path, "".join(r + "\n" for r in kept))

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, loss_fn: Callable[[int, torch.Generator], torch.Tensor]) -> dict:
        """One optimizer step on loss_fn(step, step_generator(seed, step))."""
        cfg = self.config
        gen = step_generator(cfg.seed, self.step, self.rank)
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(self.step, gen)
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.grad_clip if cfg.grad_clip else float("inf"))
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            # A non-finite loss or gradient skips the update (deterministically, so resumption still
            # matches); many in a row mean the run has diverged.
            self.skipped_in_a_row += 1
            self.step += 1
            if self.skipped_in_a_row >= cfg.max_skipped_in_a_row:
                raise FloatingPointError(f"training diverged: {cfg.max_skipped_in_a_row} non-finite losses in a row up "
                                         f"to step {self.step}; resume from an earlier checkpoint copy with a lower lr")
            return {"loss": float("nan"), "lr": lr, "grad_norm": float("nan")}
        self.skipped_in_a_row = 0
        self.optimizer.step()
        if self.ema is not None:
            ema_update(self.ema, self.model, ema_decay(cfg, self.step))
        self.step += 1
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm)}

    def _agree(self, flag: bool) -> bool:
        """True on every replica when it is true on any (one process: the flag itself), so that
        decisions taken from clocks and signals never split the replicas."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)]), reduction="sum").item() > 0)

    # -- the loop -----------------------------------------------------------------------------
    def train(self, loss_fn: Callable[[int, torch.Generator], torch.Tensor], max_steps: int | None = None,
              max_minutes: float | None = None, evaluate: Callable[[], dict] | None = None,
              progress: bool | None = None) -> dict:
        """Train until `max_steps`, `max_minutes` of this session, or a signal; checkpoint and return
        {"step", "reason", "train_minutes"}. `evaluate()` runs every `eval_every` steps; its time
        counts as training time. `progress`: a tqdm bar (default: when stderr is a terminal)."""
        cfg = self.config
        session_start = time.time()
        last_ckpt_time, last_ckpt_step = time.time(), self.step
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        handlers = {}
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, on_signal)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        loss_csv = self.out_dir / LOSS_CSV
        new_file = not loss_csv.exists()
        log_file = open(loss_csv if self.is_main else os.devnull, "a", newline="")
        writer = csv.writer(log_file)
        if new_file:
            writer.writerow(["step", "loss", "lr", "grad_norm", "sec_per_step", "train_minutes"])
        bar = None
        if (sys.stderr.isatty() if progress is None else progress) and max_steps is not None and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        window, window_start = [], time.time()
        reason = "max_steps"
        try:
            while max_steps is None or self.step < max_steps:
                if stop["signal"] is not None:
                    reason = f"signal {stop['signal']}"
                elif max_minutes is not None and time.time() - session_start >= max_minutes * 60:
                    reason = "time budget"
                if self._agree(reason != "max_steps"):  # every replica stops at the same step
                    reason = reason if reason != "max_steps" else "another replica stopped"
                    break
                t0 = time.time()
                info = self.train_step(loss_fn)
                self.train_seconds += time.time() - t0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
                if math.isfinite(info["loss"]):
                    window.append(info["loss"])
                if self.step % cfg.log_every == 0 and window:
                    sec = (time.time() - window_start) / len(window)
                    mean = sum(window) / len(window)
                    writer.writerow([self.step, f"{mean:.5f}", f"{info['lr']:.3e}", f"{info['grad_norm']:.3f}",
                                     f"{sec:.3f}", f"{self.train_seconds / 60:.2f}"])
                    log_file.flush()
                    if bar is None and self.is_main:
                        self.log(f"step {self.step} loss {mean:.4f} lr {info['lr']:.2e} {sec:.2f} s/step "
                                 f"({self.train_seconds / 60:.1f} min)")
                    window, window_start = [], time.time()
                if evaluate is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.is_main:
                    t0 = time.time()
                    evaluate()
                    self.train_seconds += time.time() - t0
                    write_loss_curve(loss_csv, self.out_dir / LOSS_CURVE, self.title)
                if self._agree(self.step - last_ckpt_step >= cfg.checkpoint_every
                               or time.time() - last_ckpt_time >= cfg.checkpoint_minutes * 60):
                    self.save()
                    last_ckpt_time, last_ckpt_step = time.time(), self.step
        finally:
            if bar is not None:
                bar.close()
            log_file.close()
            if self.step != last_ckpt_step or not self.checkpoint_path.exists():
                self.save()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self.is_main:
            write_loss_curve(loss_csv, self.out_dir / LOSS_CURVE, self.title)
        self.log(f"stopped at step {self.step} ({reason}); checkpoint {self.checkpoint_path}")
        return {"step": self.step, "reason": reason, "train_minutes": self.train_seconds / 60}
