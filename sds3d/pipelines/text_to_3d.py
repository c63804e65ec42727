"""Text -> NeRF by score distillation -> mesh + turntable: the loop behind `sds3d generate`.

A run lives in its own folder:

    outputs/<slug>-<seed>/
      config.yaml            written first; `--resume` reads it back
      previews/step-NNNNN.png
      checkpoints/last.pt    field + optimizer + occupancy + RNG state (+ vsd's LoRA), written atomically
      mesh.glb mesh.obj mesh.ply turntable.mp4
      metrics.json           against the world's ground truth when the prompt names a world scene
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import GenerateConfig
from ..distill.annealing import annealed_guidance, annealed_range
from ..distill.score import NFSD_NEGATIVE_PROMPT, lora_diffusion_loss, nfsd_loss, sds_loss, vsd_loss
from ..io import atomic_save_torch, atomic_write_text, prepare_run_folder, slugify
from ..nerf.backends import describe_backends, field_device, make_occupancy
from ..geometry.views import VIEW_NAMES, view_names
from ..geometry.cameras import camera_directions, orbit_cameras, sample_cameras
from ..nerf.field import NeRFField
from .regularizers import opacity_entropy_loss, opacity_sparsity_loss, orientation_loss, z_variance_loss
from ..nerf.render import render_image
from ..diffusion.protocol import Cond
from ..teachers import load_teacher, teacher_kind


@dataclass
class ProgressEvent:
    """What the CLI's progress bar and the web app hear: at every saved preview, and every
    `progress_every` steps when a listener asks for more (the web app's progress bar).

    `phase` says where the run is: "train" (a step finished), "export", "evaluate", or "stopped"
    (a `should_stop` request was honoured; the checkpoint holds `step`). `start_step` is the step
    this session began from (0, or a resumed checkpoint's), so that `seconds_left` extrapolates the
    pace of this session only. `render(resolution=64)` draws the four-view preview of the field as it
    is now (`TextTo3D.preview`), for a listener that wants a picture between saved previews; called
    from the listener, i.e. in the training thread between steps, it draws no random numbers of the
    run's generator, so the run's field is unchanged."""

    step: int
    total_steps: int
    loss: float
    elapsed_s: float
    preview_path: Path | None = None
    preview: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    message: str = ""
    phase: str = "train"
    start_step: int = 0
    render: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    @property
    def seconds_left(self) -> float | None:
        """Training time left at this session's mean pace so far, or None before a step is done."""
        done = self.step - self.start_step
        if self.phase != "train" or done <= 0:
            return None
        return self.elapsed_s / done * (self.total_steps - self.step)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict | None = None
    stopped: bool = False  # a `should_stop` request ended training early: no export, checkpoint kept




def default_run_dir(config: GenerateConfig, root: str | Path = "outputs") -> Path:
    return Path(root) / f"{slugify(config.prompt)}-{config.seed}"


def run_device(config: GenerateConfig) -> torch.device:
    """The device a run trains on: config.device, with "auto" meaning CUDA when it is there (and the
    teacher is not the CPU-only oracle)."""
    if config.device == "auto":
        use_cuda = torch.cuda.is_available() and config.teacher != "oracle"
        return torch.device("cuda" if use_cuda else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        from ..config import ConfigError

        raise ConfigError(f"bad value device={config.device!r}: this torch sees no CUDA device; use auto or cpu")
    return torch.device(config.device)


def make_teacher(config: GenerateConfig, device: torch.device | str = "cpu"):
    """The teacher a config names, on `device` (see `sds3d.teachers.load_teacher`)."""
    oracle = dict(resolution=config.teacher_resolution, views_per_bucket=config.oracle_views_per_bucket, seed=0,
                  elevation_range=config.elevation_range, distance_range=config.distance_range,
                  fovy_range=config.fovy_range, camera_sigma_deg=config.oracle_camera_sigma)
    return load_teacher(config.teacher, device=device, oracle_options=oracle, vae_resolution=config.vae_resolution)


def make_field(config: GenerateConfig, device: torch.device | str = "cpu") -> NeRFField:
    device = torch.device(device)
    return NeRFField(device=device, n_levels=config.n_levels, log2_hashmap_size=config.log2_hashmap_size,
                     base_resolution=config.base_resolution, max_resolution=config.max_resolution,
                     hidden_dim=config.hidden_dim, blob_density=config.blob_density, blob_radius=config.blob_radius,
                     backend=config.encoding_backend).to(device)


def make_optimizer(config: GenerateConfig, nerf: NeRFField) -> torch.optim.Optimizer:
    """Adam with a high rate on the hash table and a low one on the MLP (threestudio's split).

    Fused (`fused=True`): one kernel over the multi-million-entry table instead of a dozen passes."""
    encoding = list(nerf.encoding.parameters())
    encoding_ids = {id(p) for p in encoding}
    network = [p for p in nerf.parameters() if id(p) not in encoding_ids]
    return torch.optim.Adam([{"params": encoding, "lr": config.lr_encoding},
                             {"params": network, "lr": config.lr_network}], betas=(0.9, 0.99), eps=1e-15, fused=True)


def shading_for_step(config: GenerateConfig, step: int, generator: torch.Generator) -> str:
    """DreamFusion's random shading: albedo early on, later albedo or Lambertian at random."""
    draw = torch.rand((), generator=generator).item()  # drawn every step so resumed runs stay in sync
    if step < config.lambertian_start * config.steps or draw < config.albedo_prob:
        return "albedo"
    return "lambertian"


def render_resolution(config: GenerateConfig, step: int) -> int:
    """Coarse to fine (Magic3D, threestudio's resolution milestones): cheap low-resolution renders
    while the shape forms, full resolution for the details."""
    if config.coarse_resolution and step < config.coarse_fraction * config.steps:
        return config.coarse_resolution
    return config.render_resolution


def sample_backgrounds(config: GenerateConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Background colours (B, 3): `config.background`, or a random colour with `random_background_prob`."""
    colors = torch.rand(batch, 3, generator=generator)
    use_random = torch.rand(batch, 1, generator=generator) < config.random_background_prob
    return torch.where(use_random, colors, torch.full_like(colors, config.background))


def view_prompts(config: GenerateConfig, views: list[str]) -> list[str]:
    if not config.view_dependent_prompting:
        return [config.prompt] * len(views)
    from ..world.captions import with_view

    return [with_view(config.prompt, view) for view in views]


class TextTo3D:
    """One optimization run; `run()` trains, exports and scores, resuming from `checkpoints/last.pt`.

    `callback` hears a ProgressEvent at every saved preview and, with `progress_every=N`, after every
    N-th step too. `should_stop` (polled before every step; the web app's Cancel button) ends
    training cooperatively: the step in progress finishes, the checkpoint is written, and `run()`
    returns with `stopped=True` and no export, so that `resume=True` continues exactly."""

    def __init__(self, config: GenerateConfig, run_dir: str | Path, teacher=None,
                 callback: Callable[[ProgressEvent], None] | None = None, progress_every: int | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.config = config.validate()
        self.run_dir = Path(run_dir)
        self.teacher = teacher
        self.callback = callback
        self.progress_every = progress_every
        self.should_stop = should_stop
        self.stopped = False
        self.last_loss = float("nan")
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"

    # -- state --------------------------------------------------------------------------------
    def _init_state(self):
        torch.manual_seed(self.config.seed)
        self.device = run_device(self.config)
        if self.device.type == "cuda" and self.device.index is not None:
            # tiny-cuda-nn allocates its grid (and nerfacc launches its kernels) on the *current* CUDA
            # device, not on the one a tensor names: make --device cuda:N current before building anything.
            torch.cuda.set_device(self.device)
        self.field = make_field(self.config, self.device)
        self.optimizer = make_optimizer(self.config, self.field)
        # nerfacc's OccGridEstimator for a field on CUDA (when its extension loads), else our OccupancyGrid
        self.occupancy = make_occupancy(field_device(self.field), resolution=self.config.occupancy_resolution,
                                        update_every=self.config.occupancy_update_every)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        self.lora = self.lora_optimizer = None

    def _init_lora(self):
        """VSD's camera-conditioned LoRA copy of the teacher's network and its own optimizer."""
        from ..distill.lora import make_lora_network, make_lora_optimizer

        self.lora = make_lora_network(self.teacher, rank=self.config.lora_rank)
        self.lora_optimizer = make_lora_optimizer(self.lora, lr=self.config.lora_lr)

    def _lora_state(self) -> dict:
        """Only the trained LoRA and camera tensors: the frozen copy of the teacher is not saved."""
        return {name: p.detach().clone() for name, p in self.lora.named_parameters() if p.requires_grad}

    def _save_checkpoint(self):
        from ..nerf.encoding import GRID_CONVENTION

        # hash_grid: the function the grid's parameters stand for (tcnn's HashGrid), checked on load.
        state = {"step": self.step, "field": self.field.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "occupancy": self.occupancy.state_dict(),
                 "generator": self.generator.get_state(), "config": self.config.to_dict(),
                 "hash_grid": GRID_CONVENTION}
        if self.lora is not None:
            state["lora"], state["lora_optimizer"] = self._lora_state(), self.lora_optimizer.state_dict()
        atomic_save_torch(state, self.checkpoint_path)

    def _load_checkpoint(self):
        """Restore the run from `checkpoints/last.pt`, whichever machine wrote it.

        The hash grid's parameters (and Adam's moments of them) are converted between tiny-cuda-nn's
        flat layout and the (L, T, F) table, which hold the same function; an occupancy grid of the
        other sampler (nerfacc's estimator vs ours) is rebuilt from the field, with one line saying so.
        A checkpoint from before the grid followed tiny-cuda-nn's convention is refused (ValueError):
        its table means another function.
        """
        from ..nerf.encoding import GRID_CONVENTION
        from ..nerf.occupancy import load_occupancy_state

        state = torch.load(self.checkpoint_path, weights_only=True, map_location=self.device)
        if state.get("hash_grid") != GRID_CONVENTION:
            raise ValueError(f"{self.checkpoint_path} was written by an earlier sds3d whose hash grid followed another "
                             f"convention (nerfstudio's levels), so its field cannot be restored; start the run again "
                             f"(generate --overwrite) instead of resuming or re-exporting it")
        self.field.load_state_dict(state["field"])  # converts a tcnn grid to a table and back
        optimizer_state = state["optimizer"]
        encoding = self.field.encoding
        for index in optimizer_state["param_groups"][0]["params"]:  # group 0: the grid (`make_optimizer`)
            moments = optimizer_state["state"].get(index, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moments:
                    moments[key] = encoding.convert_parameter(moments[key])
        self.optimizer.load_state_dict(optimizer_state)
        note = load_occupancy_state(self.occupancy, state["occupancy"], self.field)
        if note is not None:
            print(f"sds3d: {note}", file=sys.stderr, flush=True)
        self.generator.set_state(state["generator"].cpu())  # CPU generator, whatever map_location did
        self.step = state["step"]
        if self.lora is not None and "lora" in state:
            self.lora.load_state_dict(state["lora"], strict=False)
            self.lora_optimizer.load_state_dict(state["lora_optimizer"])

    def _emit(self, event: ProgressEvent):
        if self.callback is not None:
            self.callback(event)

    # -- the loop -----------------------------------------------------------------------------
    def preview(self, resolution: int = 64) -> torch.Tensor:
        """Four views around the object, side by side: (3, H, 4W)."""
        with torch.no_grad():
            out = render_image(self.field, orbit_cameras(4, resolution), occupancy=self.occupancy,
                               num_samples=self.config.num_samples, shading="lambertian", background=self.config.background,
                               early_stop_eps=self.config.early_stop_eps)
        return torch.cat(list(out["rgb"].clamp(0, 1).cpu()), dim=-1)

    def train(self, resume: bool = False, show_progress: bool = True) -> None:
        from tqdm import tqdm

        from ..io import save_image

        cfg = self.config
        self._init_state()
        if show_progress:  # once per run: which hash grid and sampler this run uses
            print(describe_backends(field_device(self.field), self.field.encoding.backend), file=sys.stderr, flush=True)
        if self.teacher is None:
            self.teacher = make_teacher(cfg, self.device)
        if cfg.loss == "vsd":
            self._init_lora()
        if resume and self.checkpoint_path.exists():
            self._load_checkpoint()
        prompts_by_view = dict(zip(VIEW_NAMES, view_prompts(cfg, list(VIEW_NAMES))))
        self._encode(list(prompts_by_view.values()))  # builds the teacher's data once, up front
        if self.step == 0:
            self.occupancy.update(self.field, step=0, generator=self.generator)

        start = time.time()
        first_step = self.step
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show_progress, desc=cfg.prompt[:30], unit="step")
        while self.step < cfg.steps:
            if self.should_stop is not None and self.should_stop():
                self._stop(first_step, time.time() - start)
                break
            cameras = sample_cameras(cfg.batch_size, render_resolution(cfg, self.step), cfg.elevation_range, cfg.azimuth_range,
                                     cfg.distance_range, cfg.fovy_range, generator=self.generator)
            shading = shading_for_step(cfg, self.step, self.generator)
            need_normals = shading != "albedo" or cfg.lambda_orientation > 0
            backgrounds = sample_backgrounds(cfg, cfg.batch_size, self.generator)
            out = render_image(self.field, cameras, occupancy=self.occupancy, num_samples=cfg.num_samples,
                               shading=shading, background=backgrounds, generator=self.generator,
                               need_normals=need_normals, early_stop_eps=cfg.early_stop_eps, jitter=cfg.jitter_pixels)
            cond = self._encode([prompts_by_view[v] for v in view_names(cameras)])
            # used by teachers that model them (the oracle): the background behind the object, the camera
            cond.extra["background"] = backgrounds
            cond.extra["camera_dirs"] = camera_directions(cameras)
            t_min, t_max = annealed_range(self.step, cfg.steps, cfg.t_min, cfg.t_max, cfg.t_max_end)
            loss = self._distillation_loss(out["rgb"], cond, cameras, t_min, t_max)
            if cfg.lambda_orientation > 0:
                loss = loss + cfg.lambda_orientation * orientation_loss(out["backfacing"])
            if cfg.lambda_sparsity > 0:
                loss = loss + cfg.lambda_sparsity * opacity_sparsity_loss(out["opacity"])
            if cfg.lambda_opacity_entropy > 0:
                loss = loss + cfg.lambda_opacity_entropy * opacity_entropy_loss(out["opacity"])
            if cfg.lambda_z_variance > 0:
                loss = loss + cfg.lambda_z_variance * z_variance_loss(out["z_variance"], out["opacity"].detach())
            self.optimizer.zero_grad(set_to_none=True)
            if self.lora is not None:
                self.lora_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.lora is not None:
                self.lora_optimizer.step()
            self.step += 1
            self.occupancy.update(self.field, step=self.step, generator=self.generator)
            self.last_loss = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_loss:.3g}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._save_checkpoint()
            if self.step % cfg.preview_every == 0 or self.step == cfg.steps:
                image = self.preview()
                path = self.run_dir / "previews" / f"step-{self.step:05d}.png"
                save_image(path, image)
                self._emit(ProgressEvent(self.step, cfg.steps, self.last_loss, time.time() - start, path, image,
                                         start_step=first_step, render=self.preview))
            elif self.progress_every and self.step % self.progress_every == 0:
                self._emit(ProgressEvent(self.step, cfg.steps, self.last_loss, time.time() - start,
                                         start_step=first_step, render=self.preview))
        bar.close()

    def _stop(self, first_step: int, elapsed_s: float) -> None:
        """Honour a stop request before the next step: keep what this session trained in the
        checkpoint (unless this very step's is already written) and say where the run stands."""
        cfg = self.config
        if self.step > first_step and self.step % cfg.checkpoint_every != 0:
            self._save_checkpoint()
        self.stopped = True
        kept = (f"checkpoint at step {self.step} kept" if self.checkpoint_path.exists()
                else "nothing trained yet, no checkpoint")
        self._emit(ProgressEvent(self.step, cfg.steps, self.last_loss, elapsed_s, phase="stopped", start_step=first_step,
                                 message=f"stopped at step {self.step} of {cfg.steps}: {kept}"))

    def _encode(self, prompts: list[str]) -> Cond:
        """The teacher's conditioning; nfsd's unconditional text is its paper's negative prompt by default."""
        negative = self.config.negative_prompt or (NFSD_NEGATIVE_PROMPT if self.config.loss == "nfsd" else "")
        return self.teacher.encode_prompt(prompts, negative=[negative] if negative else None)

    def _distillation_loss(self, images: torch.Tensor, cond: Cond, cameras, t_min: float, t_max: float) -> torch.Tensor:
        """The configured score-distillation loss on the renders (plus, for vsd, the LoRA's own loss:
        the two touch disjoint parameters, so one backward serves both optimizers)."""
        cfg = self.config
        guidance = annealed_guidance(self.step, cfg.steps, cfg.guidance_scale, cfg.guidance_scale_end)
        if cfg.loss == "sds":
            return sds_loss(self.teacher, images, cond, guidance, t_min, t_max, self.generator).loss
        if cfg.loss == "nfsd":
            null_cond = self.teacher.encode_prompt([""] * len(cond.prompts))
            return nfsd_loss(self.teacher, images, cond, null_cond, guidance, t_min, t_max, self.generator).loss
        # ProlificDreamer / threestudio: the teacher sees the view-dependent prompt, the LoRA the
        # prompt without view suffix (its camera input says where it looks from).
        lora_cond = self._encode([cfg.prompt] * len(cond.prompts))
        score = vsd_loss(self.teacher, self.lora, images, cond, cameras.c2w, guidance,
                         cfg.lora_guidance_scale, t_min, t_max, self.generator, lora_cond=lora_cond)
        lora_loss = lora_diffusion_loss(self.teacher, self.lora, None, lora_cond, cameras.c2w, self.generator,
                                        cfg.camera_drop_prob, encoded=score.encoded)
        return score.loss + lora_loss

    def export(self) -> dict[str, Path]:
        """Mesh files and the turntable video of the trained field."""
        from ..export import export_mesh, extract_mesh, write_turntable

        cfg = self.config
        with torch.no_grad():
            mesh = extract_mesh(self.field.density, lambda x: self.field(x)["albedo"], resolution=cfg.export_resolution,
                                threshold=cfg.mesh_threshold, device=self.device)
        files = export_mesh(mesh, self.run_dir, stem="mesh", formats=cfg.export_formats)

        def render_fn(camera):
            with torch.no_grad():
                out = render_image(self.field, camera, occupancy=self.occupancy, num_samples=cfg.num_samples,
                                   shading="lambertian", background=cfg.background, early_stop_eps=cfg.early_stop_eps)
            return {key: value.cpu() for key, value in out.items()}

        files["turntable"] = write_turntable(render_fn, self.run_dir / "turntable.mp4", n_frames=cfg.turntable_frames,
                                             resolution=cfg.turntable_resolution)
        return {k: Path(v) for k, v in files.items()}

    def evaluate(self) -> dict | None:
        """Scores against the world's ground truth, or None when the prompt is not a world scene.

        The evaluation renders place their samples along the rays with torch's global generator; it is
        seeded here (and restored after), so that the scores depend on the field alone, not on what
        else the process drew before (a teacher built in the run or kept by the web app, extra
        previews): `generate`, `sds3d eval` and the web app give the same metrics for the same field."""
        from ..eval.ground_truth import evaluate_run
        from ..world.prompts import resolve_prompt

        try:
            scene = resolve_prompt(self.config.prompt)
        except ValueError:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed)
            metrics = evaluate_run(self.field, self.occupancy, scene, self.run_dir / "mesh.ply",
                                   num_samples=self.config.num_samples, background=self.config.background)
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def run(self, resume: bool = False, show_progress: bool = True, evaluate: bool = True) -> RunResult:
        start = time.time()
        self.train(resume=resume, show_progress=show_progress)
        train_seconds = time.time() - start
        if self.stopped:
            return RunResult(self.run_dir, self.step, time.time() - start, stopped=True)
        steps = self.config.steps
        self._emit(ProgressEvent(self.step, steps, self.last_loss, train_seconds, phase="export",
                                 message="exporting the mesh and the turntable"))
        files = self.export()
        if evaluate:
            self._emit(ProgressEvent(self.step, steps, self.last_loss, time.time() - start, phase="evaluate",
                                     message="scoring against the world's ground truth"))
        metrics = self.evaluate() if evaluate else None
        if metrics is not None:
            metrics["train_seconds"] = round(train_seconds, 1)
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return RunResult(self.run_dir, self.step, time.time() - start, files, metrics)


def check_run(config: GenerateConfig, teacher=None) -> GenerateConfig:
    """The checks a run passes before any folder is made: the config's values; for the world's teachers
    a prompt the world knows (UnknownPromptError naming the nearest known prompts); for a diffusers
    teacher not given as an object, a folder that is there (hub ids are checked when loaded)."""
    config.validate()
    if teacher_kind(config.teacher) in ("oracle", "embedded"):
        from ..world.prompts import resolve_prompt

        resolve_prompt(config.prompt)
    elif teacher is None:
        from ..teachers.diffusers import resolve_spec

        resolve_spec(config.teacher)
    return config


def generate(config: GenerateConfig, out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
             teacher=None, callback=None, show_progress: bool = True, evaluate: bool = True,
             progress_every: int | None = None, should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Prepare the run folder (never clobbering a user's run), save the config, optimize, export, score.

    `callback`, `progress_every` and `should_stop` are TextTo3D's (the web app's live view and Cancel)."""
    check_run(config, teacher)
    run_dir = Path(out) if out else default_run_dir(config)
    run_dir = prepare_run_folder(run_dir, overwrite=overwrite, resume=resume)
    config.save(run_dir / "config.yaml")
    run = TextTo3D(config, run_dir, teacher=teacher, callback=callback, progress_every=progress_every,
                   should_stop=should_stop)
    return run.run(resume=resume, show_progress=show_progress, evaluate=evaluate)
