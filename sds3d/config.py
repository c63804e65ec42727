"""Run configuration: one dataclass, named presets, validation with one-line errors, YAML round trip."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from .io import tuples_to_lists
from .settings import ConfigError, check_value, dataclass_from_dict, parse_set_items
from .teachers import teacher_kind


@dataclass
class GenerateConfig:
    """Everything a `sds3d generate` run depends on; saved as config.yaml in the run folder."""

    prompt: str = ""
    seed: int = 0
    preset: str = "cpu-fast"
    teacher: str = "embedded"  # the shipped network; "oracle" (exact denoiser of world renders) or a diffusers PATH_OR_ID
    steps: int = 800
    # rendering during optimization
    render_resolution: int = 64
    # coarse to fine: the first `coarse_fraction` of the steps render at `coarse_resolution` (0: off)
    coarse_resolution: int = 0
    coarse_fraction: float = 0.5
    jitter_pixels: bool = False  # rays through random points of their pixels: antialiasing over steps
    num_samples: int = 48
    # samples with transmittance below this are skipped (early ray termination; 0 turns it off)
    early_stop_eps: float = 0.0
    batch_size: int = 2
    background: float = 1.0
    # share of training images rendered over a random solid colour instead of `background`. The
    # oracle puts the same colour behind its data, so transparency cannot pass for white (its
    # default is 0.5); the embedded network saw only white backgrounds, so it keeps 0.
    random_background_prob: float = 0.0
    # cameras (degrees, scene units); views are the world's: the object faces +x, z is up. Distance
    # and field of view are fixed by default: the oracle's nearest renders then differ from a
    # training view only in direction, which measurably sharpens the result (IoU +0.02-0.03).
    elevation_range: tuple[float, float] = (-10.0, 60.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    distance_range: tuple[float, float] = (2.75, 2.75)
    fovy_range: tuple[float, float] = (45.0, 45.0)
    view_dependent_prompting: bool = True
    # two-object prompts ("a red cube on top of a blue sphere"): "layout" learns each object in its
    # box of the world's layout from its own caption (pipelines/layout.py), "whole" the whole scene
    # from the whole caption (a teacher that binds each colour to its object: the oracle, a diffusers
    # model); "auto" is "layout" for the embedded teacher and "whole" for the others
    composition_guidance: str = "auto"
    # shading: albedo only until `lambertian_start`, then albedo with probability `albedo_prob`,
    # otherwise lambertian (DreamFusion's random shading). The world's teachers saw Lambertian
    # renders under the same light rule, so always shading (albedo_prob 0) is the consistent
    # choice for them: albedo-only renders get pulled toward shaded images and turn grey.
    albedo_prob: float = 0.0
    lambertian_start: float = 0.0
    # field: a hash grid from 16 to 64 cells a side of the box in 6 levels. A 64 px render shows the box
    # over about 56 pixels, so 64 cells is about one a pixel; the teacher sees the render at 32 px.
    # Finer levels are seen by no render: SDS noise walks them at random, which shows as grain at
    # the turntable's 128 px. Against 12 levels up to 512 cells (benchmarks/results/quality-grid64,
    # seed 0 of every prompt): single categories' albedo speckle 0.60x, colour error 0.87x, IoU the same;
    # two-object scenes' speckle 0.61x, colour error 0.71x, IoU +0.02; training time 0.95-1.14x (noisy).
    # The GPU presets keep threestudio's 16 levels up to 2048.
    n_levels: int = 6
    log2_hashmap_size: int = 17
    base_resolution: int = 16
    max_resolution: int = 64
    hidden_dim: int = 64
    # the albedo from the grid's 3 coarsest levels (16-28 cells) only, the density from all of them
    # (NeRFField; 0 or >= n_levels: every level): less grain in the colours, the shape keeps its edges.
    # Against every level (benchmarks/results/quality-albedo3, seed 0 of every single, fronted and
    # two-object prompt): speckle 0.59x / 0.69x / 0.52x, IoU 0.787 -> 0.784 / 0.851 -> 0.842 /
    # 0.912 -> 0.897, colour error the same.
    albedo_levels: int = 3
    encoding_backend: str = "auto"  # "auto" (tcnn on CUDA, the fused C++ op on CPU), "cpp", "torch" or "tcnn"
    device: str = "auto"  # where the field trains: "auto" (CUDA when there, but the oracle is CPU-only), "cpu", "cuda"
    # the embedded teacher's CPU compute: "auto" (fp32 in the NeRF loop, see make_teacher), "fp32" or "bf16" autocast
    precision: str = "auto"
    # fit torch's CPU threads to the cores other processes leave free, between steps (sds3d/threads.py)
    adapt_threads: bool = True
    blob_density: float = 10.0
    blob_radius: float = 0.5
    occupancy_resolution: int = 32
    occupancy_update_every: int = 8
    # optimization
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_decay: float = 1.0  # both rates' factor at the end of the run, reached exponentially (1.0: constant)
    lr_decay_start: float = 0.0  # fraction of the steps before the rates start to fall
    # score distillation: "sds" (DreamFusion), "vsd" (ProlificDreamer: a camera-conditioned LoRA copy
    # of the teacher's network trained alongside) or "nfsd" (noise-free score distillation)
    loss: str = "sds"
    negative_prompt: str = ""  # the unconditional text of network teachers (nfsd defaults to its paper's)
    guidance_scale: float = 3.0  # the embedded network's; the oracle needs none (1), diffusers teachers ~100 for SDS
    guidance_scale_end: float | None = None  # CFG scale reached linearly at the last step (None: constant)
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_end: float | None = 0.5
    lora_rank: int = 4  # vsd: LoRA rank, its own AdamW learning rate, its CFG scale, camera dropout
    lora_lr: float = 1e-4
    lora_guidance_scale: float = 1.0
    camera_drop_prob: float = 0.1
    lambda_orientation: float = 0.01
    lambda_sparsity: float = 0.0
    lambda_opacity_entropy: float = 50.0  # pushes pixel opacity to 0 or 1: crisp silhouettes
    lambda_z_variance: float = 0.0  # HiFA's depth variance along covered rays: thin surfaces, not fog
    lambda_albedo_smooth: float = 0.0  # NeRFactor's albedo smoothness at surface points: no speckled colours
    # teacher data: the oracle's image resolution and bank size; latent diffusers teachers upsample
    # renders to vae_resolution before their VAE (threestudio: 64 -> 512)
    teacher_resolution: int = 64
    vae_resolution: int | None = None  # None: the pipeline's native size
    oracle_views_per_bucket: int = 192
    # the oracle's camera conditioning (as MVDream's): width in degrees of its prior over the cameras of
    # its renders around the render's camera; 0 conditions on the text's view suffix only, and then a
    # rotationally symmetric shape (a snowman) never forms its face: each step's target has it elsewhere
    oracle_camera_sigma: float = 5.0
    # outputs
    preview_every: int = 100
    checkpoint_every: int = 200
    export_resolution: int = 128
    mesh_threshold: float | str = "auto"  # density of the exported isosurface, or "auto" (matches the opacity silhouette)
    export_formats: tuple[str, ...] = ("glb", "obj", "ply")
    export_faces: int = 20000  # triangle budget of the exported mesh (quadric decimation)
    export_texture: str = "albedo"  # "albedo": UV atlas + baked PNG texture; "none": vertex colours only
    export_texture_size: int = 1024  # texture side in texels (a power of two)
    export_roughness: float = 0.9  # PBR roughness of the GLB/MTL material (metallic is 0): matte, like the training shading
    turntable_frames: int = 48
    turntable_resolution: int = 128

    def validate(self) -> "GenerateConfig":
        """The config itself, or ConfigError with one line naming the first bad field and what it allows.

        Types first (a config built in code skips from_dict's checks), then ranges. A value that fits
        its type after the reader's conversion (a whole float for an int, a list for a tuple) is
        stored converted, so that nothing downstream sees a float seed or step count."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(getattr(self, f.name), hints[f.name], f.name))

        def need(ok: bool, name: str, allowed: str):
            if not ok:
                raise ConfigError(f"bad value {name}={getattr(self, name)!r}: {allowed}")

        need(isinstance(self.prompt, str) and self.prompt.strip() != "", "prompt", "give a non-empty prompt, e.g. \"a red cube\"")
        need(self.steps >= 1, "steps", "must be a positive integer")
        need(self.render_resolution >= 8, "render_resolution", "must be >= 8")
        need(self.coarse_resolution == 0 or self.coarse_resolution >= 8, "coarse_resolution", "0 (off) or >= 8")
        need(0.0 <= self.coarse_fraction <= 1.0, "coarse_fraction", "must be in [0, 1] (a fraction of the steps)")
        need(self.num_samples >= 4, "num_samples", "must be >= 4")
        need(0.0 <= self.early_stop_eps < 1.0, "early_stop_eps", "must be in [0, 1) (0 turns early ray termination off)")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.loss in LOSSES, "loss", f"allowed are {', '.join(LOSSES)}")
        need(self.composition_guidance in COMPOSITION_GUIDANCE, "composition_guidance",
             f"allowed are {', '.join(COMPOSITION_GUIDANCE)}")
        need(self.loss == "sds" or self.teacher != "oracle", "loss",
             "vsd and nfsd need a network teacher (embedded or diffusers); the oracle supports sds")
        need(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        need(self.lora_lr > 0, "lora_lr", "must be > 0")
        need(0.0 <= self.camera_drop_prob <= 1.0, "camera_drop_prob", "must be in [0, 1]")
        need(self.vae_resolution is None or self.vae_resolution >= 8, "vae_resolution",
             "must be null (the pipeline's native size) or >= 8 (Stable Diffusion: 512)")
        need(self.encoding_backend in ("auto", "cpp", "torch", "tcnn"), "encoding_backend",
             "allowed are auto, cpp, torch, tcnn")
        need(self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None, "device",
             "allowed are auto, cpu, cuda[:N]")
        need(self.preset in PRESETS, "preset", f"allowed are {', '.join(PRESETS)}")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "allowed are auto, fp32, bf16")
        need(not (self.teacher == "oracle" and self.device.startswith("cuda")), "device",
             "the oracle teacher runs on the CPU: use device auto or cpu with it")
        need(isinstance(self.teacher, str) and self.teacher.strip() != "", "teacher",
             f"give {', '.join(TEACHERS)}, a diffusers pipeline folder or a hub id like stabilityai/stable-diffusion-2-1-base")
        need(self.guidance_scale >= 0, "guidance_scale", "must be >= 0")
        need(self.guidance_scale_end is None or self.guidance_scale_end >= 0, "guidance_scale_end", "must be >= 0 or null")
        need(0.0 <= self.t_min < self.t_max <= 1.0, "t_max", "need 0 <= t_min < t_max <= 1")
        need(self.t_max_end is None or self.t_min <= self.t_max_end <= 1.0, "t_max_end", "need t_min <= t_max_end <= 1")
        need(0.0 <= self.albedo_prob <= 1.0, "albedo_prob", "must be in [0, 1]")
        need(0.0 <= self.random_background_prob <= 1.0, "random_background_prob", "must be in [0, 1]")
        need(0.0 <= self.lambertian_start <= 1.0, "lambertian_start", "must be in [0, 1] (a fraction of the steps)")
        need(self.oracle_camera_sigma >= 0, "oracle_camera_sigma", "must be >= 0 (degrees; 0 turns camera conditioning off)")
        need(self.lambda_z_variance >= 0, "lambda_z_variance", "must be >= 0")
        need(self.lambda_albedo_smooth >= 0, "lambda_albedo_smooth", "must be >= 0")
        need(self.lr_encoding > 0 and self.lr_network > 0, "lr_encoding", "learning rates must be > 0")
        need(0.0 < self.lr_decay <= 1.0, "lr_decay", "must be in (0, 1]: the rates' factor at the end of the run")
        need(0.0 <= self.lr_decay_start < 1.0, "lr_decay_start", "must be in [0, 1) (a fraction of the steps)")
        need(all(f in EXPORT_FORMATS for f in self.export_formats), "export_formats", f"allowed are {', '.join(EXPORT_FORMATS)}")
        need(self.mesh_threshold == "auto" or (isinstance(self.mesh_threshold, (int, float)) and self.mesh_threshold > 0),
             "mesh_threshold", "a density > 0 or 'auto'")
        need(self.preview_every >= 1 and self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        for name in ("elevation_range", "azimuth_range", "distance_range", "fovy_range"):
            lo, hi = getattr(self, name)
            need(lo <= hi, name, "need low <= high")
        need(-90.0 <= self.elevation_range[0] and self.elevation_range[1] <= 90.0, "elevation_range",
             "elevations are degrees in [-90, 90]")
        need(self.distance_range[0] > 1.8, "distance_range", "cameras must stay outside the scene box: distance > 1.8")
        need(0 < self.fovy_range[0] and self.fovy_range[1] < 120, "fovy_range", "field of view in (0, 120) degrees")
        # Sizes and counts that otherwise fail only when the run reaches them (types are checked by from_dict).
        need(0 <= self.seed < 2 ** 64, "seed", "must be an integer in [0, 2**64) (torch.Generator.manual_seed)")
        need(self.turntable_frames >= 1, "turntable_frames", "must be >= 1 (frames of the turntable video)")
        need(self.turntable_resolution >= 8, "turntable_resolution", "must be >= 8")
        need(self.export_resolution >= 8, "export_resolution", "must be >= 8 (marching-cubes grid points per side)")
        need(self.export_faces >= 100, "export_faces", "the face budget (--faces) must be at least 100 triangles")
        need(self.export_texture in ("albedo", "none"), "export_texture", "allowed are albedo, none (--texture)")
        need(self.export_texture_size in tuple(2 ** k for k in range(6, 14)), "export_texture_size",
             "the texture size (--texture-size) must be a power of two from 64 to 8192")
        need(0.0 <= self.export_roughness <= 1.0, "export_roughness", "must be in [0, 1] (PBR roughness)")
        need(self.teacher_resolution >= 8, "teacher_resolution", "must be >= 8")
        need(self.oracle_views_per_bucket >= 1, "oracle_views_per_bucket", "must be >= 1")
        need(self.occupancy_resolution >= 1 and self.occupancy_update_every >= 1, "occupancy_resolution",
             "occupancy_resolution and occupancy_update_every must be >= 1")
        need(self.n_levels >= 1 and self.hidden_dim >= 1, "n_levels", "n_levels and hidden_dim must be >= 1")
        need(self.albedo_levels >= 0, "albedo_levels", "must be >= 0 (0, or n_levels and more: every level)")
        need(1 <= self.base_resolution <= self.max_resolution, "max_resolution", "need 1 <= base_resolution <= max_resolution")
        need(1 <= self.log2_hashmap_size <= 30, "log2_hashmap_size", "must be in [1, 30] (table size 2**N per level)")
        need(self.blob_density >= 0 and self.blob_radius > 0, "blob_radius", "need blob_density >= 0 and blob_radius > 0")
        need(0.0 <= self.background <= 1.0, "background", "must be in [0, 1] (a grey level)")
        need(self.lora_guidance_scale >= 0, "lora_guidance_scale", "must be >= 0")
        for name in ("lambda_orientation", "lambda_sparsity", "lambda_opacity_entropy"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        return self

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return tuples_to_lists(out)

    @classmethod
    def from_dict(cls, values: dict) -> "GenerateConfig":
        """Strict (sds3d.settings.dataclass_from_dict): an unknown key or a value of the wrong type
        is a ConfigError naming it; lists become tuples. Not yet `validate`d."""
        return dataclass_from_dict(cls, values)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "GenerateConfig":
        """A run's config.yaml, read strictly and validated: any problem is one ConfigError line that
        names the file and what is wrong (not YAML, not text, a mistyped or out-of-range value)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path} is not a text file (not UTF-8): it is damaged or not a config.yaml") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"config {path} is not valid YAML ({problem}{where})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} is not a mapping of field: value")
        # a run saved before a field existed was made with that field's value of the time, not today's default
        values = {**ADDED_FIELDS, **values}
        try:
            return cls.from_dict(values).validate()
        except ConfigError as error:
            raise ConfigError(f"config {path}: {error}") from None


# Fields whose default changed the behaviour when they were added: the value that reproduces a run saved
# without them (its field and checkpoint were made that way). Fields added with the old behaviour as
# their default need no entry.
ADDED_FIELDS = {"albedo_levels": 0}

LOSSES = ("sds", "vsd", "nfsd")
COMPOSITION_GUIDANCE = ("auto", "layout", "whole")
TEACHERS = ("oracle", "embedded")
EXPORT_FORMATS = ("glb", "obj", "ply")

# Named presets: only the fields that differ from the defaults above.
# The gpu presets follow threestudio's dreamfusion-sd / prolificdreamer configs (64 px renders,
# batch 1, t in [0.02, 0.98], cameras at fovy 40-70 and elevation -10..90; our scene box has
# radius 1, so cameras stay just outside it), for Stable Diffusion 2.1 base unless --teacher says
# otherwise.
SD_TEACHER = "stabilityai/stable-diffusion-2-1-base"
_GPU_COMMON = {"teacher": SD_TEACHER, "render_resolution": 64, "batch_size": 1, "num_samples": 192,
               "elevation_range": (-10.0, 90.0), "distance_range": (1.9, 2.5), "fovy_range": (40.0, 70.0),
               "albedo_prob": 0.2, "lambertian_start": 0.2, "lambda_orientation": 100.0, "lambda_sparsity": 1.0,
               "lambda_opacity_entropy": 0.0, "n_levels": 16, "log2_hashmap_size": 19, "max_resolution": 2048,
               "albedo_levels": 0,  # colour from every level: renders and teachers at 64-512 px see the fine ones
               "preview_every": 500, "checkpoint_every": 1000, "export_resolution": 256, "turntable_resolution": 256,
               "turntable_frames": 120}
PRESETS: dict[str, dict] = {
    "cpu-fast": {},
    "cpu-quality": {"steps": 1600, "num_samples": 64, "export_resolution": 192},
    "smoke": {"steps": 20, "render_resolution": 32, "num_samples": 24, "batch_size": 1, "preview_every": 10,
              "checkpoint_every": 10, "export_resolution": 48, "turntable_frames": 4, "turntable_resolution": 32,
              "oracle_views_per_bucket": 8, "teacher_resolution": 32, "export_texture_size": 256},
    "gpu-sd": {**_GPU_COMMON, "steps": 10000, "loss": "sds", "guidance_scale": 100.0, "t_max_end": None},
    "gpu-vsd": {**_GPU_COMMON, "steps": 25000, "loss": "vsd", "guidance_scale": 7.5, "t_max_end": 0.5,
                "lora_rank": 4, "lora_lr": 1e-4, "camera_drop_prob": 0.1, "render_resolution": 128},
}


# Settings that depend on the teacher (and for diffusers teachers on the loss), applied before the
# preset and explicit overrides. The dataclass defaults are the embedded network's. The oracle is an
# exact model of its data and needs no guidance, and it composites random backgrounds behind its
# renders (on white alone a white-on-white NeRF turns transparent). Stable Diffusion wants guidance
# 100 for SDS (DreamFusion) and 7.5 for VSD and NFSD. The embedded network's guidance falls from 3
# to 1 over the run: strong guidance settles the shape early, and kept to the end it greys colours.
# Its albedo comes from the grid's 3 coarsest levels (it sees renders at 32 px; measured with it only);
# the oracle's 64 px images and diffusers teachers colour from every level.
TEACHER_DEFAULTS: dict[str, dict] = {
    "embedded": {"guidance_scale_end": 1.0},
    "oracle": {"random_background_prob": 0.5, "guidance_scale": 1.0, "albedo_levels": 0},
    "diffusers": {"guidance_scale": 100.0, "random_background_prob": 0.0, "albedo_levels": 0},
}


def teacher_defaults(teacher: str, loss: str) -> dict:
    values = dict(TEACHER_DEFAULTS[teacher_kind(teacher)])
    if teacher_kind(teacher) == "diffusers" and loss in ("vsd", "nfsd"):
        values["guidance_scale"] = 7.5
    return values


def parse_overrides(items: list[str]) -> dict:
    """`FIELD=VALUE` strings (VALUE in YAML: 0.5, 1e-4, true, [-10, 60], null) -> {field: value}.

    The one `--set` syntax of every command (sds3d.settings.parse_set_items). Names and values are
    checked by `make_config`; a malformed item is one clear error here."""
    return parse_set_items(items)


def make_config(preset: str = "cpu-fast", explicit: dict | None = None, **overrides) -> GenerateConfig:
    """A validated config: dataclass defaults < the teacher's defaults < the preset < overrides (None
    values are ignored: a flag not given) < `explicit` (`--set` values, where None means None)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: allowed are {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(explicit or {})
    chosen = dict(PRESETS[preset], **overrides)
    values = teacher_defaults(str(chosen.get("teacher", GenerateConfig.teacher)), chosen.get("loss", GenerateConfig.loss))
    values.update(PRESETS[preset], preset=preset)
    values.update(overrides)
    return GenerateConfig.from_dict(values).validate()
