"""Training, evaluating and exporting the embedded teacher: a text-conditioned pixel diffusion
model of world renders, trained by the shared loop (`sds3d.training.loop`).

    sds3d teacher train --out runs/teacher --max-minutes 170     # starts or resumes
    sds3d teacher export --run runs/teacher --dest DIR           # a teacher folder + model card
    sds3d teacher eval --teacher DIR --out DIR                   # DDIM-50 over prompts/world.txt -> eval.json

What makes it cheap on a CPU (compare with benchmarks/teacher_train_speed.py and
benchmarks/teacher_short_runs.py): a lean full-resolution UNet (32/64/128 channels; a 2x2 patchify
stem learned slower per step), bf16 autocast where the CPU runs bf16 natively (AMX, AVX512_BF16;
`precision="auto"`, decided by `sds3d.precision.resolve_precision`: elsewhere bf16 is emulated and
many times slower than fp32, issue #18),
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
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..diffusion.schedule import make_schedule, min_snr_weights, stratified_timesteps
from ..diffusion.solvers import ddim_sample
from ..eval.classifier import is_held_out_prompt, score_samples
from ..eval.fd import fd_world
from ..geometry.cameras import spherical_cameras, unit_directions
from ..io import atomic_save_torch, atomic_write_text, save_image
from ..precision import PRECISIONS, cpu_capability, describe_precision, read_cpuinfo, resolve_precision
from ..settings import ConfigError, check_value, dataclass_from_dict
from ..teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher
from ..teachers.text import TextEncoder, slot_embeddings, with_slot_phrases
from ..teachers.unet import LeanUNet, NetConfig
from ..world.captions import with_view
from ..world.compositions import Composition, training_compositions
from ..world.dataset import COLOR_NAMES, CaptionTable, RenderSpec, canonical_phrasings, composition_renders, world_renders
from ..world.prompts import resolve_prompt, world_prompts, world_txt_prompts
from ..world.scenes import CATEGORIES, all_scenes
from .loop import CHECKPOINT, DataOrder, LoopConfig, TrainingLoop, step_generator


PRECISION_LOG = "precision.jsonl"  # one row per training session: its first step and precision


@dataclass
class TrainConfig:
    """Settings of an embedded-teacher training run; saved as train_config.json in the run folder."""

    seed: int = 0
    # data
    views_per_scene: int = 256
    data_seed: int = 0
    overhead_fraction: float = 0.0
    canonical_prob: float = 0.5
    view_prob: float = 0.75
    caption_dropout: float = 0.1
    camera_dropout: float = 0.1  # share of images without their camera (camera-conditioned networks only)
    # two-object scenes (world/compositions.py): `compositions` of them (0: none), `composition_prompts`
    # first (prompts the world resolves to a Composition), then random ones (`training_compositions`,
    # seeded by data_seed); `composition_views` random cameras each. Use a network with text_slots 3.
    compositions: int = 0
    composition_views: int = 24
    composition_prompts: tuple[str, ...] = ()
    # fine-tuning: an exported teacher folder (`sds3d teacher export`; "embedded" is the shipped one)
    # whose weights start the network and its EMA instead of a random init. Its network settings,
    # prediction type, schedule and text slots must be this run's; the optimizer and the data order
    # start afresh (warmup and cosine decay as configured).
    init_from: str | None = None
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
    # 'auto' (bf16 autocast where the CPU runs bf16 natively, else fp32: sds3d.precision) | 'bf16' | 'fp32';
    # the precision each training session used is recorded in the run's precision.jsonl
    precision: str = "auto"
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
        out["composition_prompts"] = list(self.composition_prompts)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Strict (sds3d.settings.dataclass_from_dict): an unknown key or a value of the wrong type
        is a ConfigError naming it ("unknown setting network.camrea_dim: did you mean
        network.camera_dim?"). A partial "network" mapping changes only the keys it names. Reads
        train_config.json of a run and training.config of an exported teacher's config.json."""
        return dataclass_from_dict(cls, data)

    def loop_config(self) -> LoopConfig:
        return LoopConfig(seed=self.seed, lr=self.lr, lr_min_ratio=self.lr_min_ratio, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps, ema_decay=self.ema_decay, grad_clip=self.grad_clip,
                          log_every=self.log_every, checkpoint_every=self.checkpoint_every,
                          checkpoint_minutes=self.checkpoint_minutes, eval_every=self.eval_every)

    def validate(self) -> "TrainConfig":
        """The config itself, or ConfigError (a ValueError) with one line naming the first bad
        setting and what it allows; called before the run folder is touched."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            check_value(getattr(self, f.name), hints[f.name], f.name)
        net = self.network
        for name, annotation in typing.get_type_hints(NetConfig).items():
            check_value(getattr(net, name), annotation, f"network.{name}")

        def need(ok: bool, name: str, allowed: str):
            if not ok:
                value = getattr(net, name.split(".", 1)[1]) if name.startswith("network.") else getattr(self, name)
                raise ConfigError(f"bad value {name}={value!r}: {allowed}")

        need(self.prediction_type in ("epsilon", "sample", "v_prediction"), "prediction_type",
             "allowed are epsilon, sample, v_prediction")
        need(self.precision in PRECISIONS, "precision", f"allowed are {', '.join(PRECISIONS)}")
        need(self.num_train_timesteps >= 2, "num_train_timesteps", "must be >= 2")
        make_schedule(self.schedule, self.num_train_timesteps)  # its ValueError names the allowed schedules
        need(self.views_per_scene >= 1, "views_per_scene", "must be >= 1")
        need(self.compositions >= len(self.composition_prompts), "compositions",
             f"must be >= the {len(self.composition_prompts)} composition_prompts")
        need(self.composition_views >= 1, "composition_views", "must be >= 1")
        need(net.text_slots in (1, 3), "network.text_slots", "1 (the prompt's sentence embedding) or 3 (also each object's phrase)")
        for name in ("overhead_fraction", "canonical_prob", "view_prob", "caption_dropout", "camera_dropout", "lr_min_ratio"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        need(self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", "must be > 0 or null (no min-SNR weights)")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.total_steps >= 1, "total_steps", "must be >= 1")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(all(0.0 <= b < 1.0 for b in self.betas), "betas", "AdamW's two decays, each in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null (torch's default)")
        need(self.log_every >= 1 and self.checkpoint_every >= 1, "checkpoint_every",
             "log_every and checkpoint_every must be >= 1")
        need(self.checkpoint_minutes > 0, "checkpoint_minutes", "must be > 0")
        need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: no periodic evaluation)")
        need(self.eval_prompts >= 1 and self.eval_steps >= 1, "eval_steps", "eval_prompts and eval_steps must be >= 1")
        need(self.eval_guidance >= 0, "eval_guidance", "must be >= 0")
        # the network: the trainer feeds 3-d unit camera directions; each level halves the image
        need(net.camera_dim in (0, 3), "network.camera_dim", "0 (text only) or 3 (camera direction, as MVDream)")
        need(len(net.channels) >= 1 and all(c >= 1 for c in net.channels), "network.channels", "a list of channel counts >= 1")
        need(net.patch >= 1 and net.resolution % (net.patch * 2 ** (len(net.channels) - 1)) == 0, "network.resolution",
             "must be divisible by patch * 2**(levels - 1)")
        need(all(0 <= level < len(net.channels) for level in net.attention_levels), "network.attention_levels",
             f"levels in [0, {len(net.channels) - 1}] (0 = finest)")
        return self


# --- pieces ----------------------------------------------------------------------------------

def load_world_text_table(out_dir: Path, captions_texts: list[str], log=print, text_encoder=None) -> torch.Tensor:
    """Embeddings (V, 384) of every text (the captions and, for a slotted network, the objects'
    phrases), saved in the run folder (so resumption does not depend on the MiniLM build or the
    global cache)."""
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
                           "eval_prompts", "eval_steps", "eval_guidance", "total_steps", "precision"}
                if diff - allowed:
                    raise RuntimeError(f"{saved_config} differs from the given settings in {', '.join(sorted(diff - allowed))}: "
                                       f"resume with the saved settings or train into a new --out")
                stored = config
            config = stored
        self.config = (config or TrainConfig()).validate()
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.precision = resolve_precision(cfg.precision, warn=False)  # "fp32" | "bf16": what this session computes in
        start = self._start_network(cfg.init_from) if cfg.init_from and not ckpt_path.exists() else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_config, json.dumps(cfg.to_dict(), indent=2) + "\n")

        if renders is None:
            spec = RenderSpec(resolution=cfg.network.resolution, views_per_scene=cfg.views_per_scene, seed=cfg.data_seed,
                              overhead_fraction=cfg.overhead_fraction)
            renders = world_renders(spec, progress=True)
        train_index = renders.indices("train")
        self.images = renders.images[train_index]
        self.labels = {k: getattr(renders, k)[train_index] for k in ("view", "elevation", "azimuth")}
        pairs = list(zip(renders.category[train_index].tolist(), renders.color[train_index].tolist()))
        # self.scenes: every scene an image shows, one-object scenes first (in all_scenes order), then the
        # compositions; self.scene_ids: each image's index into it
        present = set(pairs)
        self.scenes = [s for s in all_scenes() if (CATEGORIES.index(s.category), COLOR_NAMES.index(s.color)) in present]
        position = {(CATEGORIES.index(s.category), COLOR_NAMES.index(s.color)): i for i, s in enumerate(self.scenes)}
        self.scene_ids = torch.tensor([position[p] for p in pairs], dtype=torch.long)
        if cfg.compositions:
            self._add_compositions(cfg)
        self.captions = CaptionTable(self.scenes, cfg.canonical_prob, cfg.view_prob)
        self.text_encoder = text_encoder
        slots = cfg.network.text_slots
        texts = with_slot_phrases(self.captions.texts, slots)  # for 3 slots, the objects' phrases too
        base = load_world_text_table(self.out_dir, texts, log, text_encoder)
        self.text_base = dict(zip(texts, base))  # text -> (384,): the table the exported teacher looks up
        self.text_table = base if slots == 1 else slot_embeddings(
            self.captions.texts, lambda ts: torch.stack([self.text_base[t] for t in ts]), slots)
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
        elif start is not None:
            self.model.load_state_dict(start.state_dict())
            self.ema.load_state_dict(start.state_dict())
        self.loop.trim_logs()

    def _start_network(self, spec: str) -> LeanUNet:
        """The exported teacher's network that a new run starts from (`TrainConfig.init_from`), checked
        against this run's settings before anything is written."""
        from ..teachers import embedded_folder
        from ..teachers.embedded import load_network

        folder = embedded_folder(spec)
        network, meta, _ = load_network(folder)
        cfg = self.config
        theirs = {"network": network.config.to_dict(), "prediction_type": meta.get("prediction_type"),
                  "schedule": meta.get("schedule", "cosine"), "num_train_timesteps": int(meta.get("num_train_timesteps", 1000))}
        ours = {"network": cfg.network.to_dict(), "prediction_type": cfg.prediction_type, "schedule": cfg.schedule,
                "num_train_timesteps": cfg.num_train_timesteps}
        differ = [name for name in ours if ours[name] != theirs[name]]
        if differ:
            verb = "differs" if len(differ) == 1 else "differ"
            raise ConfigError(f"bad value init_from={spec!r}: its {', '.join(differ)} {verb} from this run's; train with "
                              f"the teacher's own settings (--config {folder / 'config.json'})")
        self.log(f"network and EMA start from {folder} (sha256 {str(meta.get('weights_sha256'))[:12]}...)")
        return network

    def _add_compositions(self, cfg: TrainConfig) -> None:
        """Append the two-object scenes' renders (`composition_renders`) to the images and scenes."""
        include = []
        for prompt in cfg.composition_prompts:
            scene = resolve_prompt(prompt)
            if not isinstance(scene, Composition):
                raise ConfigError(f"bad value composition_prompts: {prompt!r} is not two objects in a relation the world builds")
            include.append(scene)
        compositions = training_compositions(cfg.compositions, cfg.data_seed, include=tuple(include))
        spec = RenderSpec(resolution=cfg.network.resolution, views_per_scene=cfg.composition_views, seed=cfg.data_seed,
                          overhead_fraction=cfg.overhead_fraction)
        renders = composition_renders(spec, compositions, progress=True)
        self.images = torch.cat([self.images, renders.images])
        for name in self.labels:
            self.labels[name] = torch.cat([self.labels[name], getattr(renders, name)])
        self.scene_ids = torch.cat([self.scene_ids, renders.scene + len(self.scenes)])
        self.scenes = self.scenes + compositions

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
        cap = torch.tensor([self.captions.sample_scene(self.scenes[s], v, generator)
                            for s, v in zip(self.scene_ids[idx].tolist(), self.labels["view"][idx].tolist())], dtype=torch.long)
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
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
        encoder = self.text_encoder or TextEncoder(table=self.text_base)
        return EmbeddedTeacher(self.ema if use_ema else self.model, self.schedule, self.config.prediction_type,
                               text_encoder=encoder, autocast_bf16=self.precision == "bf16",
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

    def precisions_used(self) -> list[str]:
        """The precisions the run's training sessions computed in (precision.jsonl), first use first."""
        path = self.out_dir / PRECISION_LOG
        rows = [json.loads(r) for r in path.read_text().splitlines() if r.strip()] if path.exists() else []
        return list(dict.fromkeys(r["precision"] for r in rows))

    def train(self, max_minutes: float | None = None, max_steps: int | None = None) -> dict:
        """Train with the shared loop; evaluates every `eval_every` steps into eval.jsonl. The
        precision of this session goes to the log and, with the step it starts at, to precision.jsonl
        (a run resumed on another machine may compute in another precision)."""
        resolve_precision(self.config.precision)  # one warning line for bf16 on a CPU without it
        self.log(describe_precision(self.config.precision))
        model, _ = read_cpuinfo()
        with open(self.out_dir / PRECISION_LOG, "a") as f:
            f.write(json.dumps({"step": self.step, "precision": self.precision, "requested": self.config.precision,
                                "cpu": model, "capability": cpu_capability()}) + "\n")

        def evaluate():
            result = self.evaluate()
            self.log(f"eval step {self.step}: category {result['category']:.2f} color {result['color']:.2f} "
                     f"both {result['both']:.2f} held-out both {result['held_out_both']:.2f}")

        return self.loop.train(self._step_loss, max_steps=max_steps, max_minutes=max_minutes, evaluate=evaluate)

    def export(self, dest: str | Path, use_ema: bool = True) -> Path:
        """Write a teacher folder: fp16 EMA weights, config.json (architecture, schedule, checksum and,
        under "training", this run's steps, minutes, settings and last periodic evaluation), the
        prompt table and MODEL_CARD.md, which says "not evaluated yet" until `sds3d teacher eval`
        writes eval.json beside the weights and regenerates the card."""
        prompts = list(dict.fromkeys(world_prompts() + world_txt_prompts() + list(self.config.composition_prompts)))
        table = prompts + [with_view(p, v) for p in prompts for v in ("front", "side", "back", "overhead")]
        teacher = self.teacher(use_ema)
        meta = {"schedule": self.config.schedule, "resolution": self.config.network.resolution,
                # what `generate` checks before it lets this teacher build two-object scenes
                "compositions": self.config.compositions > 0,
                "training": {"steps": self.step, "train_minutes": round(self.train_seconds / 60, 1),
                             "config": self.config.to_dict()}}
        if self.precisions_used():  # what "auto" became on the machines that trained it
            meta["training"]["precision"] = " then ".join(self.precisions_used())
        evals = self.out_dir / "eval.jsonl"
        if evals.exists():
            rows = [json.loads(r) for r in evals.read_text().splitlines() if r]
            if rows:
                meta["training"]["last_eval"] = {k: v for k, v in rows[-1].items() if not isinstance(v, list)}
        folder = teacher.save(dest, meta, prompt_table=table)
        # An eval.json left by the weights this export replaced (--into-package) describes weights
        # that are gone: remove it, so that nothing in the folder quotes figures of other weights.
        old_eval = folder / "eval.json"
        if old_eval.exists():
            try:
                evaluated = json.loads(old_eval.read_text()).get("weights_sha256")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                evaluated = None
            if evaluated != json.loads((folder / "config.json").read_text()).get("weights_sha256"):
                old_eval.unlink()
                self.log(f"removed {old_eval}: it evaluated the weights this export replaced")
        write_model_card(folder)
        return folder


def write_model_card(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write MODEL_CARD.md of the teacher in `folder` from two files and nothing else: its
    config.json (architecture, schedule, checksum and, under "training", the run's steps, minutes,
    settings and last periodic evaluation) and eval.json (what `sds3d teacher eval` measured, with
    the command, sampler settings, seed, sample counts, seconds and machine). So every figure on the
    card is one the code reproduces; a hand edit is overwritten by the next eval or export, and
    tests/test_teacher_claims.py fails on one in the shipped card.

    eval.json is read from, and the card written to, `out` (default `folder`: the card beside the
    weights). An eval.json made for other weights (its weights_sha256 differs) does not count."""
    from ..world.scenes import held_out_combinations

    folder = Path(folder)
    out = Path(out) if out is not None else folder
    meta = json.loads((folder / "config.json").read_text())
    net = meta.get("network", {})
    training = meta.get("training") or {}
    cfg = training.get("config", {})
    spec = RenderSpec()
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    params = sum(p.numel() for p in LeanUNet(NetConfig.from_dict(net)).parameters())
    held = held_out_combinations()
    res = meta.get("resolution", net.get("resolution"))
    slots_text = ("\n  (three MiniLM embeddings side by side: the whole prompt, its first object's phrase and its second"
                  "\n  object's phrase, zeros for one object; sds3d/teachers/text.py `slot_texts`)"
                  if net.get("text_slots", 1) == 3 else "")
    compositions_text = ""
    if cfg.get("compositions"):
        included = cfg.get("composition_prompts") or []
        compositions_text = (
            f"\n  Plus {cfg['compositions']} two-object scenes (world/compositions.py `training_compositions`, data seed "
            f"{cfg.get('data_seed', 0)};\n  'on top of', 'next to', 'in front of'; no held-out pair in either object"
            + (f"; including {', '.join(repr(p) for p in included)}" if included else "")
            + f"),\n  {cfg.get('composition_views')} random cameras each, captioned by their canonical caption or one of 3 "
              f"paraphrases (`composition_phrasings`).")
    camera_text = (f"\n  + projected unit direction to the camera (MVDream-style camera conditioning; a zero vector,"
                   f"\n  used for {pct(cfg.get('camera_dropout', 0.0))} of the training images, means no camera)"
                   if net.get("camera_dim") else "")

    if training:
        train_text = (
            f"- **Training**: AdamW lr {cfg.get('lr')} (warm-up {cfg.get('warmup_steps')} steps, cosine decay over "
            f"{cfg.get('total_steps')}),\n  batch {cfg.get('batch_size')}, min-SNR-gamma {cfg.get('min_snr_gamma')}, "
            f"EMA {cfg.get('ema_decay')}, {training.get('precision', cfg.get('precision'))} precision, seed {cfg.get('seed')};\n"
            f"  {training.get('steps')} steps, {training.get('train_minutes')} min of training "
            f"({cfg.get('threads') or 'all'} CPU threads). To train it again: save the \"config\" under\n"
            f"  \"training\" in config.json as FILE and run `sds3d teacher train --out RUN --config FILE "
            f"--max-steps {training.get('steps')}`.\n")
        if cfg.get("init_from"):
            train_text += (f"- **Fine-tuned**: the network started from the teacher in `{cfg['init_from']}`; the steps and "
                           f"minutes above are\n  this run's alone, that teacher's own training comes on top.\n")
        last = training.get("last_eval")
        if last:
            train_text += (
                f"- **Last periodic evaluation in training** (step {last.get('step')}, DDIM-{cfg.get('eval_steps')}, "
                f"guidance {cfg.get('eval_guidance')}, {last.get('n')} prompts\n  of `eval_prompt_list`, world "
                f"classifier): category {pct(last['category'])}, colour {pct(last['color'])}, both "
                f"{pct(last['both'])};\n  held-out pairs: category {pct(last['held_out_category'])}, colour "
                f"{pct(last['held_out_color'])}.\n")
    else:
        train_text = "- **Training**: config.json has no \"training\" entry (not written by `sds3d teacher export`).\n"

    eval_path = out / "eval.json"
    record = json.loads(eval_path.read_text()) if eval_path.exists() else None
    todo = f"run `sds3d teacher eval --teacher {folder} --write-into-teacher`"
    if record is None:
        eval_text = f"- **Evaluation**: not evaluated yet: {todo}.\n"
    elif record.get("weights_sha256") != meta.get("weights_sha256"):
        eval_text = (f"- **Evaluation**: not evaluated yet: {eval_path.name} in {out} was made for other weights "
                     f"(sha256 {str(record.get('weights_sha256'))[:12]}...);\n  {todo}.\n")
    else:
        s, m, machine = record["sampler"], record["metrics"], record["machine"]
        fd_text = ""
        if "fd_world_samples_vs_real" in m:
            fd_text = (f" FD_world of the samples\n  against fresh real renders of the same scenes "
                       f"**{m['fd_world_samples_vs_real']:.2f}**, beside **{m['fd_world_real_vs_real']:.2f}** between "
                       f"two disjoint sets of\n  real renders (`sds3d.eval.fd`).")
        eval_text = (
            f"- **Evaluation** ({eval_path.name}, written by `{record['command']}`):\n"
            f"  DDIM-{s['steps']} ({s['spacing']} timesteps{', predicted x0 clamped' if s['clip_x0'] else ''}), guidance {s['guidance']}, "
            f"{'no camera' if s.get('camera') is None else s['camera']}, {s['precision']}, seed {record['seed']};\n"
            f"  {record['samples_per_prompt']} samples for each of the {record['prompts']} distinct prompts of "
            f"prompts/world.txt, {record['samples']} images;\n"
            f"  {record['seconds']['total']:.0f} s ({record['seconds']['sampling']:.0f} s of sampling) on "
            f"{machine['cpu']},\n  {machine['threads']} threads, torch {machine['torch']}. Scored by the shipped "
            f"world classifier: category **{pct(m['category'])}**,\n  colour **{pct(m['color'])}**, both "
            f"{pct(m['both'])}; on the {m['held_out_prompts']} held-out (colour, primitive) prompts "
            f"({m['held_out_samples']} images)\n  category {pct(m['held_out_category'])}, colour "
            f"{pct(m['held_out_color'])}, both {pct(m['held_out_both'])}.{fd_text}\n")
        views = record.get("views")
        if views:
            eval_text += (
                f"- **Views** (`evaluate_views`: DDIM-{views['steps']}, guidance {views['guidance']}, every category "
                f"bare, {views['samples_per_view']} samples from each of 4 cameras\n  at elevation "
                f"{views['camera']['elevation']:g}): silhouette IoU against the truth from the asked camera "
                f"**{views['silhouette_iou']:.2f}**, from a camera a quarter\n  turn away "
                f"{views['silhouette_iou_turned']:.2f}; on the prompts that look different a quarter turn round "
                f"({', '.join(views['turn_dependent_prompts']) or 'none'})\n  the camera adds "
                f"**{'-' if views['view_gain'] is None else format(views['view_gain'], '+.2f')}** IoU "
                f"(`view_gain`). Score distillation builds the shape from these views, so this bounds\n  `generate`'s geometry.\n")
        comp = record.get("compositions")
        if comp:
            part = lambda r: (f"each object in its own colour in **{pct(r['bound'])}** of the views, silhouette IoU "  # noqa: E731
                              f"{r['silhouette_iou']:.2f}" if r.get("bound") is not None else "not scored")
            eval_text += (
                f"- **Two-object scenes** (`evaluate_compositions`: DDIM-{comp['steps']}, guidance {comp['guidance']}, 4 views "
                f"each, against the\n  truth render from the same camera): the {comp['seen']['prompts']} trained prompts: "
                f"{part(comp['seen'])};\n  {comp['unseen']['prompts']} compositions not in training: {part(comp['unseen'])}.\n")

    text = f"""# sds3d embedded teacher

<!-- Written by sds3d.training.teacher.write_model_card from config.json and eval.json: do not edit.
     `sds3d teacher eval` and `sds3d teacher export` regenerate it. -->

A small pixel-space text-to-image diffusion model of sds3d's procedural world, trained from
scratch on CPU by `sds3d teacher train` (sds3d/training/teacher.py). The copy shipped in
sds3d/assets/teacher is the default teacher of `sds3d generate` (`--teacher embedded`): offline,
no download; a folder like this one works as `--teacher DIR`.

- **Architecture**: LeanUNet (sds3d/teachers/unet.py), {params / 1e6:.2f}M parameters: channels {net.get('channels')},
  {net.get('blocks_per_level')} residual block(s) per level, patchify stem {net.get('patch')}x{net.get('patch')}, self-attention at levels {net.get('attention_levels')}{' and mid' if net.get('mid_attention') else ''},
  FiLM conditioning on timestep + projected text embedding{slots_text}{camera_text}.
  Output: {meta.get('prediction_type')}.
- **Resolution**: {res}x{res} RGB, model space [-1, 1].
- **Noise schedule**: {meta.get('schedule')}, {meta.get('num_train_timesteps')} steps (diffusers/DDPM convention).
- **Text encoder**: {meta.get('text_encoder')};
  unconditional = embedding of {json.dumps(meta.get('null_prompt', ''))} ({pct(cfg.get('caption_dropout', 0.0))} caption dropout in training).
  prompts.safetensors holds the embeddings of the world's prompts (with view suffixes), so those
  need no MiniLM at run time.
- **Data**: renders of the world's scenes ({len(CATEGORIES)} categories x {len(COLOR_NAMES)} colours) except the {len(held)} held-out
  (colour, primitive) pairs of `held_out_combinations()`
  ({', '.join(f'{c} {p}' for c, p in held)});
  {cfg.get('views_per_scene')} random cameras per scene (`RenderSpec`: elevation {spec.elevation_range[0]:g}..{spec.elevation_range[1]:g}, azimuth
  {spec.azimuth_range[0]:g}..{spec.azimuth_range[1]:g}, distance {spec.distance_range[0]:g}..{spec.distance_range[1]:g}, fovy {spec.fovy_range[0]:g}..{spec.fovy_range[1]:g}), rendered at {spec.supersample}x and average-pooled;
  captions are the world's captions and paraphrases with a DreamFusion view suffix
  {pct(cfg.get('view_prob', 0.0))} of the time.{compositions_text}
{train_text}{eval_text}- **Weights**: model.safetensors (fp16; sha256 {meta.get('weights_sha256')},
  checked at load).
- **Limits**: knows only the procedural world; {res}x{res} pixels; other prompts give arbitrary
  images. Held-out pairs measure compositional generalization. Two-object scenes:
  {'trained (`compositions: true`: `sds3d generate` accepts them)' if meta.get('compositions') else 'not trained (`sds3d generate` refuses them with this teacher)'}.
"""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "MODEL_CARD.md", text)
    return out / "MODEL_CARD.md"


# --- API + command line ----------------------------------------------------------------------

def train_teacher(out_dir: str | Path, config: TrainConfig | None = None, max_minutes: float | None = None,
                  max_steps: int | None = None, log=print) -> dict:
    """Start or resume a teacher training run in `out_dir`; stops cleanly on the time budget,
    at `max_steps`, or on SIGTERM/SIGINT, always leaving a checkpoint to resume from."""
    return TeacherTrainer(out_dir, config, log).train(max_minutes=max_minutes, max_steps=max_steps)


def export_teacher(run_dir: str | Path, dest: str | Path, use_ema: bool = True, allow_existing: bool = False,
                   log=print, renders=None, text_encoder=None) -> Path:
    """Write a run's teacher into `dest` (usable as `--teacher DEST`) with a model card that says it
    is not evaluated yet. A folder that already holds files is refused unless `allow_existing` (the
    CLI's --into-package, which replaces the shipped teacher), so an export never overwrites a
    user's files or the installed package by accident. `renders` and `text_encoder` go to
    `TeacherTrainer` (a run trained on its own renders or text encoder, as in the tests)."""
    dest = Path(dest)
    if not allow_existing and dest.exists() and (dest.is_file() or any(dest.iterdir())):
        raise ValueError(f"{dest} already holds files: export into a new folder (nothing was written)")
    run_dir = Path(run_dir)
    if not (run_dir / "train_config.json").exists():
        raise ValueError(f"{run_dir} is not a teacher training run (no train_config.json)")
    if not (run_dir / CHECKPOINT).exists():
        raise ValueError(f"{run_dir} has no checkpoint ({CHECKPOINT}) yet: train it first (nothing was written)")
    trainer = TeacherTrainer(run_dir, None, log, renders=renders, text_encoder=text_encoder)
    return trainer.export(dest, use_ema)


VIEW_EVAL_AZIMUTHS = (0.0, 90.0, 180.0, -90.0)  # front, side, back, other side
VIEW_EVAL_CAMERA = dict(elevation=15.0, distance=2.75, fovy=45.0)  # generate's default distance and fovy


def _view_cameras(resolution: int):
    """The four cameras of `VIEW_EVAL_AZIMUTHS` and their view names."""
    from ..geometry.views import view_names

    cam = VIEW_EVAL_CAMERA
    az = torch.tensor(VIEW_EVAL_AZIMUTHS)
    cameras = spherical_cameras(torch.full_like(az, cam["elevation"]), az, cam["distance"], cam["fovy"], resolution)
    return cameras, view_names(cameras)


@torch.no_grad()
def sample_views(teacher: EmbeddedTeacher, prompts: list[str], steps: int = 25, guidance: float = 3.0, seed: int = 0,
                 batch_size: int = 32, samples_per_view: int = 1) -> torch.Tensor:
    """DDIM samples of every prompt from each camera of `VIEW_EVAL_AZIMUTHS`, given as `generate`
    gives them: the view suffix in the prompt and the camera's direction. (N, 3, R, R) in [0, 1],
    ordered prompt, then view, then sample."""
    from ..geometry.cameras import camera_directions

    cameras, views = _view_cameras(teacher.resolution)
    directions = camera_directions(cameras)  # as `generate` computes them
    gen = torch.Generator().manual_seed(seed)
    todo = [(p, v) for p in prompts for v in range(len(views)) for _ in range(samples_per_view)]
    images = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        cond = teacher.encode_prompt([with_view(p, views[v]) for p, v in chunk])
        cond.extra["camera_dirs"] = directions[[v for _, v in chunk]]
        images.append(ddim_sample(teacher, cond, steps, guidance, gen, **EMBEDDED_DDIM).images)
    return torch.cat(images) if images else torch.zeros(0, 3, teacher.resolution, teacher.resolution)


def view_eval_prompts() -> list[str]:
    """Every category of the world once, bare ('a cube', 'a snowman': its default colour)."""
    from ..world.captions import bare_caption

    return [bare_caption(category) for category in CATEGORIES]


def evaluate_views(teacher: EmbeddedTeacher, prompts: list[str] | None = None, steps: int = 25, guidance: float = 3.0,
                   seed: int = 0, samples_per_view: int = 4, batch_size: int = 32) -> tuple[dict, torch.Tensor]:
    """Does the teacher draw a single object as the asked camera sees it? Score distillation builds
    the shape from what the teacher draws at each camera, so this bounds the geometry of `generate`.

    Samples of every prompt (default `view_eval_prompts`) from the four cameras of `VIEW_EVAL_AZIMUTHS`
    (`sample_views`), each scored by silhouette IoU (`eval.ground_truth.drawn_mask` of the sample and of
    the truth render, made as the training data are) twice: against the truth from the same camera
    (`silhouette_iou`), and from the camera a quarter turn further round (`silhouette_iou_turned`): a
    teacher that ignored the camera scores both alike. Most of the world looks the same from a quarter
    turn round (a sphere, a cube, a cone); `view_gain` is the difference of the two over the prompts that do not (`turn_dependent`: the truth's
    silhouettes from the two cameras overlap by IoU < 0.9: a table, a dumbbell, a lollipop), so it is what
    the camera conditioning adds where it matters; None when no prompt is. Returns (record, images)."""
    from ..eval.ground_truth import drawn_mask
    from ..eval.metrics import silhouette_iou
    from ..world.render import render_scene

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:  # mean over the images
        return float(silhouette_iou(a, b).mean())

    start = time.time()
    prompts = list(prompts or view_eval_prompts())
    images = sample_views(teacher, prompts, steps, guidance, seed, batch_size, samples_per_view)
    n_views = len(VIEW_EVAL_AZIMUTHS)
    rows = []
    supersample = RenderSpec.supersample
    fine, _ = _view_cameras(teacher.resolution * supersample)
    for k, prompt in enumerate(prompts):
        # the truth drawn as the training data are (rendered finer, average-pooled) and outlined by the
        # same rule as the samples: a thin part (a lollipop's stick) counts where it shows in both
        truth = drawn_mask(F.avg_pool2d(render_scene(resolve_prompt(prompt), fine)["rgb"], supersample))
        drawn = drawn_mask(images[k * n_views * samples_per_view:(k + 1) * n_views * samples_per_view])
        asked = truth.repeat_interleave(samples_per_view, 0)
        turned = truth.roll(-1, 0).repeat_interleave(samples_per_view, 0)  # azimuth + 90 degrees

        rows.append({"prompt": prompt, "silhouette_iou": iou(drawn, asked), "silhouette_iou_turned": iou(drawn, turned),
                     "turn_dependent": iou(truth, truth.roll(-1, 0)) < 0.9})
    mean = lambda key, rows=rows: sum(r[key] for r in rows) / len(rows) if rows else None  # noqa: E731
    dependent = [r for r in rows if r["turn_dependent"]]
    record = {"prompts": len(prompts), "images": int(images.shape[0]), "steps": steps, "guidance": guidance, "seed": seed,
              "samples_per_view": samples_per_view, "camera": {**VIEW_EVAL_CAMERA, "azimuths": list(VIEW_EVAL_AZIMUTHS)},
              "silhouette_iou": mean("silhouette_iou"), "silhouette_iou_turned": mean("silhouette_iou_turned"),
              "per_prompt": rows, "seconds": round(time.time() - start, 1)}
    record["turn_dependent_prompts"] = [r["prompt"] for r in dependent]
    record["view_gain"] = (mean("silhouette_iou", dependent) - mean("silhouette_iou_turned", dependent)) if dependent else None
    return record, images


def composition_eval_prompts(config: TrainConfig, unseen: int = 12, seed: int = 1000) -> tuple[list[str], list[str]]:
    """(prompts of two-object scenes the run trained on: its `composition_prompts`, or its first 6
    compositions when it names none; `unseen` compositions it never saw, drawn by
    `training_compositions` under another seed). Empty lists for a run without compositions."""
    if not config.compositions:
        return [], []
    include = tuple(resolve_prompt(p) for p in config.composition_prompts)
    trained = training_compositions(config.compositions, config.data_seed, include=include)
    seen = list(config.composition_prompts) or [c.caption for c in trained[:6]]
    known = set(trained)
    candidates = training_compositions(len(trained) + 4 * unseen, seed)
    return seen, [c.caption for c in candidates if c not in known][:unseen]


@torch.no_grad()
def evaluate_compositions(teacher: EmbeddedTeacher, prompts: list[str], steps: int = 25, guidance: float = 3.0,
                          seed: int = 0, batch_size: int = 32) -> tuple[dict, torch.Tensor]:
    """DDIM samples of two-object prompts, each from the four views of `VIEW_EVAL_AZIMUTHS` (`sample_views`),
    scored against the truth render from the same camera by `eval.ground_truth.binding_scores`: is each
    object's colour where the truth has that object. The world classifier knows one object per image, so this is the teacher's measure
    of compositions. Returns (record, images (N, 3, R, R) in [0, 1], prompt-major)."""
    from ..eval.ground_truth import binding_scores, object_id_map
    from ..world.compositions import Composition
    from ..world.render import render_scene

    start = time.time()
    cameras, views = _view_cameras(teacher.resolution)
    images = sample_views(teacher, prompts, steps, guidance, seed, batch_size)
    rows = []
    todo = [(p, v) for p in prompts for v in range(len(views))]
    for k, prompt in enumerate(prompts):
        scene = resolve_prompt(prompt)
        if not isinstance(scene, Composition):
            raise ValueError(f"{prompt!r} is not two objects in a relation: evaluate_compositions scores compositions")
        truth = render_scene(scene, cameras)
        ids = object_id_map(scene, cameras, truth)
        scores = [binding_scores(images[k * len(views) + v], truth["rgb"][v], ids[v]) for v in range(len(views))]
        defined = [s["bound"] for s in scores if s["bound"] is not None]
        rows.append({"prompt": prompt, "bound": sum(defined) / len(defined) if defined else None,
                     "silhouette_iou": sum(s["silhouette_iou"] for s in scores) / len(scores),
                     "views": [{"view": name, **s} for name, s in zip(views, scores)]})
    bound = [r["bound"] for r in rows if r["bound"] is not None]
    record = {"prompts": len(prompts), "images": len(todo), "steps": steps, "guidance": guidance, "seed": seed,
              "camera": {**VIEW_EVAL_CAMERA, "azimuths": list(VIEW_EVAL_AZIMUTHS)},
              "bound": sum(bound) / len(bound) if bound else None,
              "silhouette_iou": sum(r["silhouette_iou"] for r in rows) / len(rows) if rows else None,
              "per_prompt": rows, "seconds": round(time.time() - start, 1)}
    return record, images


def evaluate_teacher(teacher: EmbeddedTeacher, prompts: list[str] | None = None, samples_per_prompt: int = 4,
                     steps: int = 50, guidance: float = 3.0, seed: int = 0, batch_size: int = 64,
                     fd: bool = True, log=None) -> tuple[dict, torch.Tensor]:
    """DDIM samples over prompts (default prompts/world.txt) scored by the world classifier, overall
    and on the held-out (colour, primitive) pairs, and FD_world (`sds3d.eval.fd`, the Frechet distance
    of Heusel et al. 2017 in the classifier's feature space) against real renders of the same scenes,
    beside FD between two disjoint real sets (the floor a perfect model would reach at this n).

    Returns (record, images). `record` is what eval.json holds: "metrics", and everything that
    produced them (sampler settings, seed, sample counts, seconds, CPU, torch version, threads,
    the weights' sha256), so that the model card quotes reproducible figures. Progress goes to
    `log` (default: print, flushed, so it shows when stdout is a file or a pipe): the plan, the
    measured first DDIM step with the sampling time it implies (a precision that runs slowly on
    this CPU shows within seconds, not after a batch), a line per batch, then the scores."""
    import os
    import platform
    from functools import partial

    log = log or partial(print, flush=True)
    if samples_per_prompt < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt, steps and batch_size must be >= 1, got {samples_per_prompt}, "
                         f"{steps}, {batch_size}")
    start = time.time()
    prompts = list(dict.fromkeys(prompts or world_txt_prompts()))
    todo = [p for p in prompts for _ in range(samples_per_prompt)]
    held = [p for p in prompts if is_held_out_prompt(p)]
    log(f"teacher eval: {len(prompts)} prompts x {samples_per_prompt} samples = {len(todo)} images, "
        f"DDIM-{steps}, guidance {guidance}, seed {seed}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(seed)
    images = []
    batches = -(-len(todo) // batch_size)

    def first_step(i, t, x):  # after the first DDIM step of the first batch: what the whole will take
        if i == 0:
            seconds = time.time() - batch_start
            log(f"first DDIM step of batch 1/{batches}: {seconds:.2f} s, so about "
                f"{seconds * steps * len(todo) / x.shape[0] / 60:.1f} min of sampling")

    for b, i in enumerate(range(0, len(todo), batch_size)):
        chunk = todo[i:i + batch_size]
        batch_start = time.time()
        images.append(ddim_sample(teacher, teacher.encode_prompt(chunk), steps, guidance, gen, **EMBEDDED_DDIM,
                                  callback=first_step if b == 0 else None).images)
        log(f"sampled {i + len(chunk)}/{len(todo)} (batch {b + 1}/{batches}, {time.time() - start:.0f} s)")
    images = torch.cat(images)
    sample_seconds = time.time() - start
    metrics = {**score_samples(images, todo), "held_out_prompts": len(held),
               "held_out_samples": len(held) * samples_per_prompt}
    log(f"world classifier: category {metrics['category']:.3f}, colour {metrics['color']:.3f}, "
        f"held-out category {metrics['held_out_category']:.3f}, colour {metrics['held_out_color']:.3f}")
    fd_seconds = 0.0
    if fd:
        fd_start = time.time()
        log("FD_world: rendering real images of the same scenes")
        # Real renders of the same prompts' scenes, fresh cameras (seed 4): FD of samples vs. real.
        scenes = list(dict.fromkeys(resolve_prompt(p) for p in prompts))
        per = max(2, -(-len(todo) // len(scenes)))
        real = world_renders(RenderSpec(resolution=teacher.resolution, views_per_scene=per, seed=4), scenes=scenes)
        real_images = real.float_images(torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:len(todo)])
        metrics["fd_world_samples_vs_real"] = fd_world(images, real_images)
        real2 = world_renders(RenderSpec(resolution=teacher.resolution, views_per_scene=per, seed=5), scenes=scenes)
        real2_images = real2.float_images(torch.randperm(len(real2), generator=torch.Generator().manual_seed(1))[:len(todo)])
        metrics["fd_world_real_vs_real"] = fd_world(real2_images, real_images)
        fd_seconds = time.time() - fd_start
        log(f"FD_world: samples vs real {metrics['fd_world_samples_vs_real']:.3f}, "
            f"real vs real {metrics['fd_world_real_vs_real']:.3f} ({fd_seconds:.0f} s)")

    cpu, flags = read_cpuinfo()
    record = {
        "format": "sds3d-teacher-eval", "version": 1,
        "weights_sha256": teacher.meta.get("weights_sha256"),
        "sampler": {"solver": "ddim", "steps": steps, "guidance": guidance, "eta": 0.0, **EMBEDDED_DDIM,
                    "camera": None, "precision": "bf16 autocast" if teacher.autocast_bf16 else "fp32",
                    "batch_size": batch_size},
        "seed": seed, "prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "samples": len(todo),
        "metrics": metrics,
        "fd_real_render_seeds": [4, 5] if fd else None,
        "seconds": {"sampling": round(sample_seconds, 1), "fd": round(fd_seconds, 1),
                    "total": round(time.time() - start, 1)},
        "machine": {"cpu": cpu, "cpu_bf16": sorted((flags or set()) & {"avx512_bf16", "amx_bf16"}),
                    "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
    }
    return record, images
