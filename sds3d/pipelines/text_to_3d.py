"""Text -> NeRF by score distillation -> mesh + turntable: the loop behind `sds3d generate`.

A run lives in its own folder:

    outputs/<slug>-<seed>/
      config.yaml            written when training starts; `--resume` reads it back and keeps it
      previews/step-NNNNN.png
      checkpoints/last.pt    field + optimizer + occupancy + RNG state (+ vsd's LoRA), written atomically,
                             never with NaN/Inf in it; read back with weights_only=True (`read_checkpoint`)
      mesh.glb mesh.obj mesh.mtl mesh.png mesh.ply turntable.mp4 mesh_views.png   (sds3d/export)
      metrics.json           against the world's ground truth when the prompt names a world scene
      contact_sheet.png loss.csv loss_curve.png summary.md   (report.py)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, GenerateConfig
from ..settings import check_value
from ..distill.annealing import annealed_guidance, annealed_range, decayed_lr_factor
from ..distill.score import NFSD_NEGATIVE_PROMPT, lora_diffusion_loss, nfsd_loss, sds_loss, vsd_loss
from ..precision import describe_precision
from ..threads import ThreadGovernor
from ..io import CheckpointError, RunFolderError, atomic_save_torch, atomic_write_text, load_torch_file, run_folder, slugify
from ..nerf.backends import describe_backends, field_device, make_occupancy
from ..geometry.views import VIEW_NAMES, view_names
from ..geometry.cameras import camera_directions, camera_rays, concat_cameras, orbit_cameras, sample_cameras
from ..nerf.field import NeRFField
from .layout import ObjectRegion, layout_regions, object_cameras, region_of_image, region_tensors
from .report import write_run_report
from .regularizers import (ALBEDO_SMOOTH_POINTS, albedo_smoothness_loss, opacity_entropy_loss, opacity_sparsity_loss,
                           orientation_loss, surface_points, z_variance_loss)
from ..nerf.render import render_image
from ..diffusion.protocol import Cond
from ..teachers import embedded_folder, load_teacher, teacher_kind


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




def terms_total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of a step's loss terms, left to right in their order (the order fixes the float sum)."""
    values = list(terms.values())
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def gradients_ok(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite and below sqrt(the dtype's largest value) in magnitude: Adam
    squares it into its second moment (`exp_avg_sq`), where a larger one turns to Inf, after which
    the parameter never moves again (its update m / sqrt(v) is 0). One max-abs reduction per tensor,
    one device sync; NaN fails the comparison."""
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return True
    peaks = torch.stack([g.detach().abs().amax().float() / math.sqrt(torch.finfo(g.dtype).max) for g in grads])
    return bool((peaks < 1.0).all())


CHECKPOINT_KEYS = ("step", "field", "optimizer", "occupancy", "generator")


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A run's `checkpoints/last.pt`, loaded safely (`io.load_torch_file`: weights_only=True, one
    CheckpointError line for an empty, truncated, random or code-running file) and checked before
    anything uses it: a mapping with `CHECKPOINT_KEYS`, a whole step >= 0, a field of tensors, all
    finite (the loop never writes NaN or Inf; a file that holds them is refused, not resumed)."""
    path = Path(path)
    state = load_torch_file(path, map_location=map_location, what="checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a run checkpoint (it holds a {type(state).__name__}, "
                              f"not the mapping sds3d writes)")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a run checkpoint: it lacks {', '.join(missing)}")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"checkpoint {path} is damaged: its step is {state['step']!r}, not a whole number >= 0")
    field_state = state["field"]
    if not isinstance(field_state, dict) or not all(torch.is_tensor(v) for v in field_state.values()):
        raise CheckpointError(f"checkpoint {path} is damaged: its field is not a mapping of tensors")
    for name, value in field_state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"checkpoint {path} holds NaN or Inf in field.{name}: the run that wrote it had "
                                  f"diverged; start again with --overwrite")
    return state


def load_run_config(run_dir: str | Path) -> GenerateConfig:
    """The config.yaml of an existing run folder (`GenerateConfig.load`: one line naming the file for
    anything wrong in it), or RunFolderError when the folder is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"cannot resume: run folder {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"cannot resume: {run_dir} is not a run folder (it has no config.yaml); give the --out "
                             f"of a run, or leave out --resume to start one (in a new or empty folder)")
    return GenerateConfig.load(run_dir / "config.yaml")


# What a resumed run may change in its config: how long it runs and where it computes. Anything else
# (prompt, teacher, seed, loss, weights, ...) would continue a checkpoint under other settings.
RESUME_MAY_CHANGE = ("steps", "device", "encoding_backend", "precision")


def _resume_conflict(run_dir: Path, name: str, saved, asked) -> ConfigError:
    return ConfigError(f"cannot resume {run_dir} with {name}={asked!r}: the run's config.yaml has {name}={saved!r}, "
                       f"and a resumed run keeps its settings (only {', '.join(RESUME_MAY_CHANGE)} may change); "
                       f"give the run's own value, or another --out for a new run")


def resumed_config(run_dir: str | Path, changes: dict | None = None) -> GenerateConfig:
    """The config of a run to resume: its config.yaml with `changes` applied, validated. `changes`
    (what a user asked for: `sds3d generate --resume` flags) may set `RESUME_MAY_CHANGE` fields;
    any other value must equal the run's own, else ConfigError naming it: a resume never guesses
    between the two and never silently drops what was asked."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    hints = typing.get_type_hints(GenerateConfig)
    for name, value in (changes or {}).items():
        if name not in hints:
            raise ConfigError(f"unknown setting {name}")
        value = check_value(value, hints[name], name)
        if name in RESUME_MAY_CHANGE:
            setattr(config, name, value)
        elif value != getattr(config, name):
            raise _resume_conflict(run_dir, name, getattr(config, name), value)
    return config.validate()


def check_resume(config: GenerateConfig, run_dir: str | Path) -> None:
    """What resuming `run_dir` with `config` needs, checked before anything is written: a run folder
    (config.yaml) whose settings `config` keeps (but for `RESUME_MAY_CHANGE`), and a checkpoint that
    is readable and not beyond `config.steps`, or none (the run then starts again from step 0)."""
    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    for f in dataclasses.fields(GenerateConfig):
        if f.name not in RESUME_MAY_CHANGE and getattr(config, f.name) != getattr(saved, f.name):
            raise _resume_conflict(run_dir, f.name, getattr(saved, f.name), getattr(config, f.name))
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if checkpoint.exists():
        step = read_checkpoint(checkpoint)["step"]
        if step > config.steps:
            raise ConfigError(f"bad value steps={config.steps}: the checkpoint {checkpoint} is at step {step}; "
                              f"give --steps {step} or more")


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
    """The teacher a config names, on `device` (see `sds3d.teachers.load_teacher`), computing in
    `config.precision` (`sds3d.precision.resolve_precision` with nerf_loop=True: "auto" is fp32
    here, since at the few images per step of the NeRF loop bf16 is not measurably faster)."""
    from ..precision import resolve_precision

    oracle = dict(resolution=config.teacher_resolution, views_per_bucket=config.oracle_views_per_bucket, seed=0,
                  elevation_range=config.elevation_range, distance_range=config.distance_range,
                  fovy_range=config.fovy_range, camera_sigma_deg=config.oracle_camera_sigma)
    return load_teacher(config.teacher, device=device, oracle_options=oracle, vae_resolution=config.vae_resolution,
                        autocast_bf16=resolve_precision(config.precision, device, nerf_loop=True) == "bf16")


def make_field(config: GenerateConfig, device: torch.device | str = "cpu",
               layout: list[ObjectRegion] | None = None) -> NeRFField:
    """The run's field; with a `layout` (`composition_layout`) density lives in the objects' boxes only."""
    device = torch.device(device)
    return NeRFField(device=device, n_levels=config.n_levels, log2_hashmap_size=config.log2_hashmap_size,
                     base_resolution=config.base_resolution, max_resolution=config.max_resolution,
                     hidden_dim=config.hidden_dim, albedo_levels=config.albedo_levels,
                     blob_density=config.blob_density, blob_radius=config.blob_radius,
                     backend=config.encoding_backend, regions=region_tensors(layout) if layout else None).to(device)


def composition_layout(config: GenerateConfig) -> list[ObjectRegion] | None:
    """The objects' regions when the run learns a two-object prompt object by object
    (pipelines/layout.py): a world teacher, a prompt the world resolves to a Composition, and
    `composition_guidance` "layout" (or "auto" with the embedded teacher). Otherwise None."""
    kind = teacher_kind(config.teacher)
    if kind not in ("oracle", "embedded") or config.composition_guidance == "whole" \
            or (config.composition_guidance == "auto" and kind != "embedded"):
        return None
    from ..world.compositions import Composition
    from ..world.prompts import resolve_prompt

    try:
        scene = resolve_prompt(config.prompt)
    except ValueError:  # `check_run` refuses such prompts
        return None
    return layout_regions(scene) if isinstance(scene, Composition) else None


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


def conditioning_prompt(config: GenerateConfig) -> str:
    """The words the teacher is conditioned on. A world teacher ("embedded", "oracle") reads the
    canonical caption of the scene the prompt resolves to ('a crimson block' -> 'a red cube', a
    trailing view suffix kept): the embedded network was trained on the world's captions, so the
    user's own paraphrase would put it off its training data and generate a different object than
    the one the run is scored against. A prompt that already is one of its scene's
    captions ('a snowman', 'a white snowman') is kept as written. A diffusers teacher reads the
    user's words. The user's prompt stays what is shown and saved (config.yaml, folder name)."""
    if teacher_kind(config.teacher) not in ("oracle", "embedded"):
        return config.prompt
    return _world_caption(config.prompt)


@functools.lru_cache(maxsize=64)
def _world_caption(prompt: str) -> str:
    from ..world.captions import captions, split_view, with_view
    from ..world.prompts import resolve_prompt

    try:
        scene = resolve_prompt(prompt)
    except ValueError:  # `check_run` refuses such prompts; a TextTo3D built directly keeps the words
        return prompt
    base, view = split_view(prompt)
    from ..world.scenes import Scene

    known = captions(scene.category, scene.color) if isinstance(scene, Scene) else [scene.caption]  # a Composition
    text = base if base in known else scene.caption
    return with_view(text, view) if view else text


def conditioning_note(config: GenerateConfig) -> str | None:
    """One stderr line when the teacher reads another caption than the prompt as typed, else None."""
    text = conditioning_prompt(config)
    if text == config.prompt:
        return None
    return f"sds3d: {config.prompt!r} is the world's {text!r}; the teacher is conditioned on that caption"


def view_prompts(config: GenerateConfig, views: list[str], prompt: str | None = None) -> list[str]:
    """The teacher's prompt for each view: `prompt` (default `conditioning_prompt`) with DreamFusion's
    view suffix (", front view") when `view_dependent_prompting`, else as it is."""
    prompt = conditioning_prompt(config) if prompt is None else prompt
    if not config.view_dependent_prompting:
        return [prompt] * len(views)
    from ..world.captions import with_view

    return [with_view(prompt, view) for view in views]


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
        self.layout = composition_layout(self.config)
        self.field = make_field(self.config, self.device, self.layout)
        self.optimizer = make_optimizer(self.config, self.field)
        # nerfacc's OccGridEstimator for a field on CUDA (when its extension loads), else our OccupancyGrid
        self.occupancy = make_occupancy(field_device(self.field), resolution=self.config.occupancy_resolution,
                                        update_every=self.config.occupancy_update_every)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk (written or restored), if any
        self.losses: list[float] = []  # the total loss of every step, kept in the checkpoint (loss.csv)
        self.lora = self.lora_optimizer = None

    def _init_lora(self):
        """VSD's camera-conditioned LoRA copy of the teacher's network and its own optimizer."""
        from ..distill.lora import make_lora_network, make_lora_optimizer

        self.lora = make_lora_network(self.teacher, rank=self.config.lora_rank)
        self.lora_optimizer = make_lora_optimizer(self.lora, lr=self.config.lora_lr)

    def _lora_state(self) -> dict:
        """Only the trained LoRA and camera tensors: the frozen copy of the teacher is not saved."""
        return {name: p.detach().clone() for name, p in self.lora.named_parameters() if p.requires_grad}

    def _non_finite_state(self) -> str | None:
        """The name of the first trained tensor (field parameter, Adam moment, LoRA tensor) holding NaN
        or Inf, or None: `_save_checkpoint` refuses to write such a state over a good checkpoint."""
        named = [(f"field.{name}", t) for name, t in self.field.state_dict().items()]
        for moments in self.optimizer.state.values():
            named += [(f"optimizer.{key}", t) for key, t in moments.items() if key != "step"]
        if self.lora is not None:
            named += [(f"lora.{name}", p.detach()) for name, p in self.lora.named_parameters() if p.requires_grad]
        tensors = [(name, t) for name, t in named if torch.is_tensor(t) and t.is_floating_point()]
        if not tensors:
            return None
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
        return None if finite.all() else tensors[int((~finite).nonzero()[0])][0]

    def _save_checkpoint(self):
        from ..nerf.encoding import GRID_CONVENTION

        bad = self._non_finite_state()
        if bad is not None:
            raise FloatingPointError(f"not writing {self.checkpoint_path} at step {self.step}: {bad} holds NaN or Inf; "
                                     f"{self._kept_checkpoint()}")
        # hash_grid: the function the grid's parameters stand for (tcnn's HashGrid), checked on load.
        state = {"step": self.step, "field": self.field.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "occupancy": self.occupancy.state_dict(),
                 "generator": self.generator.get_state(), "config": self.config.to_dict(),
                 "hash_grid": GRID_CONVENTION, "losses": torch.tensor(self.losses, dtype=torch.float64)}
        if self.lora is not None:
            state["lora"], state["lora_optimizer"] = self._lora_state(), self.lora_optimizer.state_dict()
        atomic_save_torch(state, self.checkpoint_path)
        self.saved_step = self.step

    def _kept_checkpoint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint of this run was written"
        return f"the checkpoint of step {self.saved_step} ({self.checkpoint_path}) is kept"

    def _load_checkpoint(self):
        """Restore the run from `checkpoints/last.pt`, whichever machine wrote it.

        The hash grid's parameters (and Adam's moments of them) are converted between tiny-cuda-nn's
        flat layout and the (L, T, F) table, which hold the same function; an occupancy grid of the
        other sampler (nerfacc's estimator vs ours) is rebuilt from the field, with one line saying so.
        A checkpoint from before the grid followed tiny-cuda-nn's convention is refused (ValueError):
        its table means another function. A damaged, unsafe or foreign file, or one that does not fit
        this run's config.yaml, is one CheckpointError line (`read_checkpoint`).
        """
        from ..nerf.encoding import GRID_CONVENTION

        state = read_checkpoint(self.checkpoint_path, map_location=self.device)
        if state.get("hash_grid") != GRID_CONVENTION:
            raise ValueError(f"{self.checkpoint_path} was written by an earlier sds3d whose hash grid followed another "
                             f"convention (nerfstudio's levels), so its field cannot be restored; start the run again "
                             f"(generate --overwrite) instead of resuming or re-exporting it")
        try:
            self._restore(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):  # load_state_dict: the first mismatch
                lines = lines[1:]
            detail = (lines[0][:160] if lines else type(error).__name__).rstrip(".")
            raise CheckpointError(f"checkpoint {self.checkpoint_path} does not fit the run's config.yaml ({detail}): "
                                  f"restore the config.yaml it was written with, or start again with --overwrite") from None
        self.saved_step = self.step

    def _restore(self, state: dict) -> None:
        from ..nerf.occupancy import load_occupancy_state

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
        self.losses = state["losses"].tolist() if "losses" in state else []
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
        """Optimize the field from step 0, or with `resume` from `checkpoints/last.pt` (a run folder
        without one starts again from step 0 and says so); config.yaml is written once the state is
        built or restored, so a resume that fails to restore leaves it as it was.

        Non-finite values stop the run: before every optimizer step the total loss and then every
        gradient are checked, and NaN or Inf ends training with one FloatingPointError line naming
        the term (sds / vsd / nfsd, lora, orientation, sparsity, opacity_entropy, z_variance; for a
        gradient, found by replaying the step's forward from its saved random draws, one term at a
        time). No parameter takes that step and the last checkpoint is kept as it is:
        `_save_checkpoint` never writes NaN or Inf. Stopping, not skipping the step (as AMP's
        GradScaler does), because here the cause is the run's own settings or teacher, and the step
        is drawn from the run's seeded generator: a skipped step would come back, and a run that
        silently skips every step ends with an untrained field that looks like a result. Resuming
        repeats the same draws, so the fix is a new run with other weights (`--overwrite`)."""
        from tqdm import tqdm

        from ..io import save_image

        cfg = self.config
        self._init_state()
        if show_progress:  # once per run: which hash grid and sampler this run uses
            print(describe_backends(field_device(self.field), self.field.encoding.backend), file=sys.stderr, flush=True)
            print(describe_precision(cfg.precision, self.device, nerf_loop=True), file=sys.stderr, flush=True)
            if (note := conditioning_note(cfg)) is not None:
                print(note, file=sys.stderr, flush=True)
            if self.layout:
                objects = " and ".join(repr(region.caption) for region in self.layout)
                print(f"sds3d: two objects, learnt one at a time in the world's layout: {objects} "
                      f"(composition_guidance={cfg.composition_guidance})", file=sys.stderr, flush=True)
        if self.teacher is None:
            self.teacher = make_teacher(cfg, self.device)
        if cfg.loss == "vsd":
            self._init_lora()
        if resume and self.checkpoint_path.exists():
            self._load_checkpoint()
        elif resume:
            print(f"sds3d: {self.run_dir} has no checkpoint yet: the run starts again from step 0", file=sys.stderr,
                  flush=True)
        self._write_config()
        prompts_by_view = dict(zip(VIEW_NAMES, view_prompts(cfg, list(VIEW_NAMES))))
        # a layout run: each object's own caption per view instead (the whole prompt is not shown)
        self.region_prompts = [dict(zip(VIEW_NAMES, view_prompts(cfg, list(VIEW_NAMES), region.caption)))
                               for region in self.layout or []]
        for prompts in self.region_prompts or [prompts_by_view]:
            self._encode(list(prompts.values()))  # builds the teacher's data once, up front
        if self.step == 0:
            self.occupancy.update(self.field, step=0, generator=self.generator)

        start = time.time()
        first_step = self.step
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show_progress, desc=cfg.prompt[:30], unit="step")
        # fewer threads while other processes hold some of the cores, back up when they leave
        governor = ThreadGovernor() if cfg.adapt_threads and self.device.type == "cpu" else None
        try:
            while self.step < cfg.steps:
                if self.should_stop is not None and self.should_stop():
                    self._stop(first_step, time.time() - start)
                    break
                draws = self.generator.get_state()  # to replay this step's forward if a gradient goes non-finite
                terms = self._loss_terms(prompts_by_view)
                loss = terms_total(terms)
                self.optimizer.zero_grad(set_to_none=True)
                if self.lora is not None:
                    self.lora_optimizer.zero_grad(set_to_none=True)
                self._check_loss(loss, terms)
                loss.backward()
                self._check_gradients(draws, prompts_by_view)
                factor = decayed_lr_factor(self.step, cfg.steps, cfg.lr_decay, cfg.lr_decay_start)
                for group, base in zip(self.optimizer.param_groups, (cfg.lr_encoding, cfg.lr_network)):
                    group["lr"] = base * factor  # from the step alone: a resumed run takes the same rates
                self.optimizer.step()
                if self.lora is not None:
                    self.lora_optimizer.step()
                self.step += 1
                if governor is not None:
                    governor.update()
                self.occupancy.update(self.field, step=self.step, generator=self.generator)
                self.last_loss = loss.item()
                self.losses.append(self.last_loss)
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
        finally:
            bar.close()
            if governor is not None:
                governor.close()

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

    def _loss_terms(self, prompts_by_view: dict[str, str]) -> dict[str, torch.Tensor]:
        """One step's forward: cameras, shading and backgrounds drawn from the run's generator, the
        render, and the loss as named, weighted terms in the order they are summed (`terms_total`):
        the score distillation (named after `config.loss`; vsd adds "lora"), then the regularizers
        with a weight > 0 ("orientation", "sparsity", "opacity_entropy", "z_variance", "albedo_smooth")."""
        cfg = self.config
        cameras = sample_cameras(cfg.batch_size, render_resolution(cfg, self.step), cfg.elevation_range, cfg.azimuth_range,
                                 cfg.distance_range, cfg.fovy_range, generator=self.generator)
        shading = shading_for_step(cfg, self.step, self.generator)
        need_normals = shading != "albedo" or cfg.lambda_orientation > 0
        backgrounds = sample_backgrounds(cfg, cfg.batch_size, self.generator)
        if self.layout is None:
            out = render_image(self.field, cameras, occupancy=self.occupancy, num_samples=cfg.num_samples,
                               shading=shading, background=backgrounds, generator=self.generator,
                               need_normals=need_normals, early_stop_eps=cfg.early_stop_eps, jitter=cfg.jitter_pixels)
            prompts = [prompts_by_view[v] for v in view_names(cameras)]
            base_prompts = [conditioning_prompt(cfg)] * len(prompts)
        else:
            out, cameras, prompts, base_prompts = self._render_objects(cameras, shading, backgrounds, need_normals)
        cond = self._encode(prompts)
        # used by teachers that model them (the oracle): the background behind the object, the camera
        cond.extra["background"] = backgrounds
        cond.extra["camera_dirs"] = camera_directions(cameras)
        t_min, t_max = annealed_range(self.step, cfg.steps, cfg.t_min, cfg.t_max, cfg.t_max_end)
        try:
            terms = self._distillation_terms(out["rgb"], cond, cameras, t_min, t_max, base_prompts)
        except FloatingPointError as error:  # the score losses' own guard (NonFiniteGradientError)
            self._stop_non_finite(f"the {cfg.loss} term: {str(error).splitlines()[0]}")
        if cfg.lambda_orientation > 0:
            terms["orientation"] = cfg.lambda_orientation * orientation_loss(out["backfacing"])
        if cfg.lambda_sparsity > 0:
            terms["sparsity"] = cfg.lambda_sparsity * opacity_sparsity_loss(out["opacity"])
        if cfg.lambda_opacity_entropy > 0:
            terms["opacity_entropy"] = cfg.lambda_opacity_entropy * opacity_entropy_loss(out["opacity"])
        if cfg.lambda_z_variance > 0:
            terms["z_variance"] = cfg.lambda_z_variance * z_variance_loss(out["z_variance"], out["opacity"].detach())
        if cfg.lambda_albedo_smooth > 0:
            origins, dirs = camera_rays(cameras)
            points = surface_points(origins, dirs, out["depth"], out["opacity"], ALBEDO_SMOOTH_POINTS, self.generator)
            terms["albedo_smooth"] = cfg.lambda_albedo_smooth * albedo_smoothness_loss(self.field, points, self.generator)
        return terms

    def _render_objects(self, cameras, shading: str, backgrounds: torch.Tensor, need_normals: bool):
        """A layout run's renders (pipelines/layout.py): image i looks at object `region_of_image`
        alone, from camera i moved into the object's frame, with that object's caption; the samples
        a ray takes grow as the object shrinks, so they are as dense on it as on an object alone.
        Returns (renders, the moved cameras, view prompts, prompts without view suffix)."""
        cfg = self.config
        parts, moved, prompts, base_prompts = [], [], [], []
        for i in range(cameras.batch_size):
            k = region_of_image(self.step, i, cameras.batch_size, len(self.layout))
            region = self.layout[k]
            camera = object_cameras(cameras[i], region)
            with self.field.only_region(k):
                parts.append(render_image(self.field, camera, occupancy=self.occupancy,
                                          num_samples=max(1, round(cfg.num_samples / region.scale)), shading=shading,
                                          background=backgrounds[i : i + 1], generator=self.generator,
                                          need_normals=need_normals, early_stop_eps=cfg.early_stop_eps,
                                          jitter=cfg.jitter_pixels))
            moved.append(camera)
            prompts.append(self.region_prompts[k][view_names(camera)[0]])
            base_prompts.append(region.caption)
        out = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        return out, concat_cameras(moved), prompts, base_prompts

    def _distillation_terms(self, images: torch.Tensor, cond: Cond, cameras, t_min: float,
                            t_max: float, base_prompts: list[str]) -> dict[str, torch.Tensor]:
        """The configured score-distillation loss on the renders (plus, for vsd, the LoRA's own loss:
        the two touch disjoint parameters, so one backward serves both optimizers). `base_prompts`:
        each image's prompt without its view suffix (the LoRA's)."""
        cfg = self.config
        guidance = annealed_guidance(self.step, cfg.steps, cfg.guidance_scale, cfg.guidance_scale_end)
        if cfg.loss == "sds":
            return {"sds": sds_loss(self.teacher, images, cond, guidance, t_min, t_max, self.generator).loss}
        if cfg.loss == "nfsd":
            null_cond = self.teacher.encode_prompt([""] * len(cond.prompts))
            return {"nfsd": nfsd_loss(self.teacher, images, cond, null_cond, guidance, t_min, t_max, self.generator).loss}
        # ProlificDreamer / threestudio: the teacher sees the view-dependent prompt, the LoRA the
        # prompt without view suffix (its camera input says where it looks from).
        lora_cond = self._encode(base_prompts)
        score = vsd_loss(self.teacher, self.lora, images, cond, cameras.c2w, guidance,
                         cfg.lora_guidance_scale, t_min, t_max, self.generator, lora_cond=lora_cond)
        lora_loss = lora_diffusion_loss(self.teacher, self.lora, None, lora_cond, cameras.c2w, self.generator,
                                        cfg.camera_drop_prob, encoded=score.encoded)
        return {"vsd": score.loss, "lora": lora_loss}

    # -- non-finite values (see `train`) ----------------------------------------------------------
    def _stop_non_finite(self, what: str):
        raise FloatingPointError(f"step {self.step + 1} of {self.config.steps}: {what}; training stopped before the "
                                 f"optimizer step, and {self._kept_checkpoint()}")

    def _describe_term(self, name: str, value: float | None = None) -> str:
        weight = f"lambda_{name}"
        text = f"the {name} term" + (f" ({weight}={getattr(self.config, weight):g})" if hasattr(self.config, weight) else "")
        return text if value is None else f"{text} of the loss is {value}"

    def _check_loss(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """The total loss is finite, or FloatingPointError naming the first non-finite term."""
        if torch.isfinite(loss.detach()).all():
            return
        for name, term in terms.items():
            value = term.detach()
            if not torch.isfinite(value).all():
                self._stop_non_finite(self._describe_term(name, value.item() if value.numel() == 1 else "NaN/Inf"))
        self._stop_non_finite(f"the total loss is {loss.item()} although every term is finite")

    def _trained_parameters(self) -> list[torch.Tensor]:
        params = list(self.field.parameters())
        if self.lora is not None:
            params += [p for p in self.lora.parameters() if p.requires_grad]
        return params

    def _check_gradients(self, draws: torch.Tensor, prompts_by_view: dict[str, str]) -> None:
        """Every gradient is usable (`gradients_ok`), or FloatingPointError naming the term whose
        gradient alone is not: the step's forward is replayed from `draws` (the generator's state
        before it) and each term's gradient taken on its own. The replay runs only after a failure;
        a good step costs one max-abs pass over its gradients."""
        params = self._trained_parameters()
        if gradients_ok([p.grad for p in params if p.grad is not None]):
            return
        self.generator.set_state(draws)
        terms = self._loss_terms(prompts_by_view)
        for name, term in terms.items():
            if not term.requires_grad:
                continue
            parts = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            if not gradients_ok([g for g in parts if g is not None]):
                self._stop_non_finite(f"the gradient of {self._describe_term(name)} holds NaN or Inf, or values whose "
                                      f"square overflows Adam's second moment (its value {term.item():.4g} is finite)")
        self._stop_non_finite("the gradient of the total loss holds NaN or Inf, though no single term's does")

    def _write_config(self) -> None:
        """config.yaml as the run uses it; rewritten only when it differs (a resume with more steps)."""
        path = self.run_dir / "config.yaml"
        try:
            if GenerateConfig.load(path) == self.config:
                return
        except ValueError:  # missing or unreadable: write it
            pass
        self.config.save(path)

    def export(self) -> dict[str, Path]:
        """Mesh files (textured by default: `sds3d.export.textured`), the turntable video, and the
        mesh-vs-field check: `mesh_*` figures merged into metrics.json (the Chamfer distance to the
        ground truth for world prompts) and mesh_views.png (field, exported mesh, exported mesh lit).

        The check's views have the evaluation's 128 pixels, or the marching-cubes grid's resolution
        when that is coarser (the smoke preset's 48): finer pixels than grid cells show the mesh no
        better, and the check then costs a fraction of the export."""
        from ..eval.ground_truth import EVAL_RESOLUTION
        from ..export import export_textured_mesh, save_image, write_turntable
        from ..world.mesh import ground_truth_mesh
        from ..world.prompts import resolve_prompt

        cfg = self.config

        def field_albedo(cameras):  # unlit renders, ray midpoints (no random draws), as the mesh is drawn
            with torch.no_grad():
                out = render_image(self.field, cameras, occupancy=self.occupancy, num_samples=cfg.num_samples,
                                   shading="albedo", background=cfg.background, stratified=False)
            return {key: value.cpu() for key, value in out.items()}

        try:
            reference = ground_truth_mesh(resolve_prompt(cfg.prompt))
        except ValueError:  # not a scene of the embedded world: no ground truth to measure against
            reference = None
        with torch.no_grad():
            result = export_textured_mesh(self.field.density, lambda x: self.field(x)["albedo"], self.run_dir,
                                          formats=cfg.export_formats, resolution=cfg.export_resolution,
                                          threshold=cfg.mesh_threshold, faces=cfg.export_faces,
                                          texture_size=cfg.export_texture_size, texture=cfg.export_texture,
                                          roughness=cfg.export_roughness, nerf_render_fn=field_albedo,
                                          check_resolution=min(EVAL_RESOLUTION, cfg.export_resolution),
                                          reference_mesh=reference, device=self.device)
        files = dict(result.files)
        floaters = result.metrics["mesh_floaters"]
        if floaters["removed"]:
            print(f"sds3d: removed {floaters['removed']} floater(s) of {floaters['components']} mesh components "
                  f"({floaters['faces_removed']} faces, the largest {floaters['largest_removed_faces']})",
                  file=sys.stderr, flush=True)
        files["mesh_views"] = save_image(self.run_dir / "mesh_views.png", result.views)
        metrics_path = self.run_dir / "metrics.json"  # the other figures stay; this export's replace the last one's
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable
            metrics = {}
        metrics = {key: value for key, value in (metrics if isinstance(metrics, dict) else {}).items()
                   if not key.startswith("mesh_")}
        atomic_write_text(metrics_path, json.dumps({**metrics, **result.metrics}, indent=2))

        def render_fn(camera):  # ray midpoints and display normals: neither random offsets nor grid noise as grain
            with torch.no_grad(), self.field.display_normals():
                out = render_image(self.field, camera, occupancy=self.occupancy, num_samples=cfg.num_samples,
                                   shading="lambertian", background=cfg.background, early_stop_eps=cfg.early_stop_eps,
                                   stratified=False)
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
        # Merged into metrics.json: what the scores do not recompute (train_seconds, the export's mesh
        # figures) stays, so that `sds3d eval` of a finished run keeps them.
        path = self.run_dir / "metrics.json"
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: the scores alone
            previous = {}
        metrics = {**(previous if isinstance(previous, dict) else {}), **metrics}
        atomic_write_text(path, json.dumps(metrics, indent=2))
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
        files.update(write_run_report(self, metrics, time.time() - start, files))
        return RunResult(self.run_dir, self.step, time.time() - start, files, metrics)


def check_run(config: GenerateConfig, teacher=None) -> GenerateConfig:
    """The checks a run passes before any folder is made: the config's values; for the world's teachers
    a prompt the world knows (UnknownPromptError naming the nearest known prompts), and a two-object scene
    (a Composition) learnt as a whole only from a teacher that learnt them (the oracle; an embedded
    teacher whose metadata says `compositions: true`, which the shipped one's does not; a layout run,
    `composition_layout`, needs single objects only); for a diffusers
    teacher not given as an object, a folder that is there, or a hub id in the local cache or on a hub
    that answers (`teachers.diffusers.check_teacher_spec`: at once, not after retries)."""
    config.validate()
    if teacher_kind(config.teacher) in ("oracle", "embedded"):
        from ..world.compositions import Composition
        from ..world.prompts import resolve_prompt

        scene = resolve_prompt(config.prompt)
        if isinstance(scene, Composition) and teacher_kind(config.teacher) == "embedded" \
                and composition_layout(config) is None and not _teacher_knows_compositions(config.teacher, teacher):
            parts = " or ".join(repr(s.caption) for s in (scene.first, scene.second))
            raise ValueError(f"{config.prompt!r} is a two-object scene ({scene.relation!r}) and this embedded teacher was "
                             f"not trained on whole ones: use composition_guidance=layout (each object from its own "
                             f"caption), --teacher oracle, or a diffusers teacher; or try {parts} alone")
    elif teacher is None:
        from ..teachers.diffusers import check_teacher_spec

        check_teacher_spec(config.teacher)
    return config


def _teacher_knows_compositions(spec: str, teacher=None) -> bool:
    """Whether an embedded teacher was trained on two-object scenes: `compositions: true` in its
    metadata (the loaded teacher's `meta`, else its folder's config.json; the shipped one's lacks it)."""
    meta = getattr(teacher, "meta", None)
    if not isinstance(meta, dict):
        from ..teachers.embedded import CONFIG_FILE

        folder = embedded_folder(spec)
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError):  # a damaged folder fails later, with load_teacher's own line
            meta = {}
    return bool(isinstance(meta, dict) and meta.get("compositions"))


def generate(config: GenerateConfig, out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
             teacher=None, callback=None, show_progress: bool = True, evaluate: bool = True,
             progress_every: int | None = None, should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Check everything, then prepare the run folder (never clobbering a user's run), optimize, export, score.

    Before any file is written: the config (`check_run`), for `resume` the folder, its config.yaml and
    its checkpoint (`check_resume`: the same settings, a readable checkpoint), and the teacher, loaded
    here unless given. A start that fails before the run's first checkpoint or preview leaves no folder
    behind (`io.run_folder`), so the same command can simply be run again. `callback`,
    `progress_every` and `should_stop` are TextTo3D's (the web app's live view and Cancel)."""
    check_run(config, teacher)
    run_dir = Path(out) if out else default_run_dir(config)
    if resume:
        check_resume(config, run_dir)
    if teacher is None:
        teacher = make_teacher(config, run_device(config))
    with run_folder(run_dir, overwrite=overwrite, resume=resume) as run_dir:
        run = TextTo3D(config, run_dir, teacher=teacher, callback=callback, progress_every=progress_every,
                       should_stop=should_stop)
        return run.run(resume=resume, show_progress=show_progress, evaluate=evaluate)
