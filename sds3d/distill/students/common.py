"""What every few-step image student shares: its config, the student network (a trainable copy of
the teacher's), its time grid, its sampler, its run folder and how it is loaded back.

A student is "the teacher with another network": `StudentModel` is a shallow copy of the teacher
object whose `network` is a trainable copy of `teacher.network`, so that `student.predict_eps(x,
t, cond)` runs the student through exactly the teacher's own conditioning, parametrization
(eps / x0 / v) and model space. That is why the same code serves the embedded pixel teacher and a
diffusers latent teacher with no special case. Students are called unguided (guidance 1): the
teacher's classifier-free guidance at one fixed scale (`StudentConfig.guidance`) is distilled into
them (Meng et al. 2023, "On distillation of guided diffusion models", the fixed-scale variant).

A method (sfd.py, progressive.py, consistency.py, kd.py) is a class with
    name: str;  supported_nfe(nfe) -> str | None  (a staticmethod: None if fine, else why not);
    __init__(config: StudentConfig)  (reads and checks config.options; cheap: sampling needs only this);
    student_network(teacher) -> nn.Module  (optional: a network of its own, e.g. SFD-v's step condition;
        default a trainable copy of teacher.network);
    attach(run: StudentRun)  (training-time state: caches, target networks; `extra_modules` to checkpoint);
    loss(step, generator) -> scalar tensor;
    sample(student, cond, nfe, generator, x_T=None) -> StudentSample.
`StudentRun` gives it the teacher, the student, the prompts and the shared training loop;
`load_student` rebuilds a trained student from its folder for `sds3d sample` and the benchmark.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...diffusion.protocol import Cond
from ...diffusion.schedule import NoiseSchedule
from ...diffusion.solvers import ddim_step, initial_noise, polynomial_timesteps
from ...io import atomic_write_text, save_image
from ...precision import PRECISIONS, describe_precision, resolve_precision
from ...teachers import SHIPPED_TEACHERS, load_teacher
from ...training.loop import LoopConfig, TrainingLoop

STUDENT_FORMAT = "sds3d-student"
STUDENT_FILE = "student.json"


class StudentFolderError(ValueError):
    """A folder that is not a student, or one made from another teacher; the message says which."""


# --- config ----------------------------------------------------------------------------------

@dataclass
class StudentConfig:
    """A student run's settings, saved as student.json["config"]. `options` are the method's own
    (e.g. SFD's sub-steps), validated by the method."""

    method: str = "sfd"
    teacher: str = "embedded"
    nfe: int = 2
    guidance: float | None = None  # the teacher's CFG scale distilled in; None: 3 (embedded) or 7.5 (others)
    steps: int = 1000  # optimizer steps
    batch_size: int = 16
    lr: float = 5e-5
    warmup_steps: int = 20
    ema_decay: float | None = None
    grad_clip: float | None = 1.0
    seed: int = 0
    prompts: str = "world"  # 'world' (prompts/world.txt without the held-out pairs) or a prompt file
    log_every: int = 10
    checkpoint_every: int = 100
    checkpoint_minutes: float = 5.0
    sample_every: int = 100  # a sample grid under samples/ every N steps (0: only at the end)
    threads: int | None = None
    # CPU compute of teacher and student (embedded teachers): 'auto' (bf16 autocast where the CPU runs
    # bf16 natively, else fp32: sds3d.precision), 'fp32' or 'bf16'; student.json records the one used
    precision: str = "auto"
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StudentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown student setting(s) {', '.join(unknown)}: allowed are {', '.join(sorted(known))}")
        return cls(**data)

    def validate(self) -> "StudentConfig":
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"bad value {name}={getattr(self, name)!r}: {rule}")

        for name in ("nfe", "steps", "batch_size", "seed", "log_every", "checkpoint_every", "sample_every", "warmup_steps"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool), name, "must be an integer")
        need(self.nfe >= 1, "nfe", "must be >= 1")
        need(self.steps >= 1, "steps", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.guidance is None or self.guidance >= 1, "guidance", "must be >= 1 (1: no guidance) or null")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1) or null")
        need(isinstance(self.options, dict), "options", "must be a mapping of method settings")
        need(self.precision in PRECISIONS, "precision", f"allowed are {', '.join(PRECISIONS)}")
        return self

    def loop_config(self) -> LoopConfig:
        return LoopConfig(seed=self.seed, lr=self.lr, lr_min_ratio=0.1, warmup_steps=self.warmup_steps,
                          total_steps=self.steps, ema_decay=self.ema_decay, grad_clip=self.grad_clip,
                          log_every=self.log_every, checkpoint_every=self.checkpoint_every,
                          checkpoint_minutes=self.checkpoint_minutes, eval_every=self.sample_every)


def default_guidance(teacher_spec: str) -> float:
    """The CFG scale students distill when none is given: the embedded teacher's evaluation scale 3,
    Stable Diffusion's customary 7.5."""
    from ...teachers import teacher_kind

    return {"embedded": 3.0, "oracle": 1.0}.get(teacher_kind(teacher_spec), 7.5)


# --- the student network -----------------------------------------------------------------------

class StudentModel:
    """The teacher object with a trainable copy of its network: the Teacher protocol, unguided.

    `network` may also be another module with the teacher network's call signature (a smaller
    student). `predict_eps(x, t, cond)` and `predict_x0` are the teacher's own methods, run on
    the student's network, differentiable."""

    def __init__(self, teacher, network: torch.nn.Module | None = None):
        if getattr(teacher, "network", None) is None:
            raise ValueError(f"{type(teacher).__name__} has no network to copy: students need a network teacher "
                             "(embedded or diffusers), not the oracle")
        self.teacher = teacher
        self.network = network if network is not None else copy.deepcopy(teacher.network)
        self.network.requires_grad_(True).train()
        self._view = copy.copy(teacher)
        self._view.network = self.network
        self.schedule: NoiseSchedule = teacher.schedule

    @property
    def running_network(self) -> torch.nn.Module:
        """The module a forward pass goes through: `network`, or its DDP wrapper under `accelerate`
        (which all-reduces gradients); methods that call the network directly use this one."""
        return self._view.network

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._view.predict_eps(x_t, t, cond, 1.0)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return self.schedule.eps_to_x0(x_t, self.predict_eps(x_t, t, cond), t)

    def with_network(self, network: torch.nn.Module) -> "StudentModel":
        """The same student view on another network (an EMA copy, a frozen target)."""
        other = copy.copy(self)
        other.network = network
        other._view = copy.copy(self._view)
        other._view.network = network
        return other


def student_timesteps(schedule: NoiseSchedule, intervals: int, rho: float = 7.0) -> list[int]:
    """`intervals + 1` strictly decreasing timesteps of the rho-polynomial (EDM) grid
    (`polynomial_timesteps`), except that the first point is the schedule's last timestep T - 1:
    a student is handed pure noise, which on a zero-terminal-SNR schedule (the embedded teacher's
    cosine) is exactly x at T - 1, and less than 1% off it at EDM's sigma_max = 80."""
    ts = polynomial_timesteps(schedule.alphas_cumprod, intervals, rho)
    ts[0] = schedule.num_train_timesteps - 1
    return ts


@dataclass
class StudentSample:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    x: torch.Tensor  # the final sample in model space
    nfe: int  # student network evaluations


def ddim_student_sample(student: StudentModel, cond: Cond, timesteps: list[int], generator: torch.Generator | None,
                        x_T: torch.Tensor | None = None, analytic_first_step: bool = False) -> StudentSample:
    """Deterministic DDIM along `timesteps` with the student's eps; the last point is the output
    (x at t_min, sigma ~ 0.006: no further step). With `analytic_first_step` the first interval
    uses eps = x_T (SFD's AFS: at abar ~ 0, x_T is the noise itself), costing no evaluation."""
    # float64 between steps: at t = T - 1 (abar ~ 1e-9 on the cosine schedule) x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    # loses ~1e-3 in float32. The network sees float32, as in the solvers.
    x = initial_noise(student.teacher, len(cond.prompts), generator, x_T).double()
    nfe = 0
    with torch.no_grad():
        for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            if analytic_first_step and i == 0:
                eps = x
            else:
                eps = student.predict_eps(x.float(), torch.full((x.shape[0],), t, dtype=torch.long), cond).double()
                nfe += 1
            x = ddim_step(student.schedule, x, eps, t, t_next)
    x = x.float()
    return StudentSample(student.teacher.decode(x), x, nfe)


# --- prompts -----------------------------------------------------------------------------------

def training_prompts(source: str) -> list[str]:
    """'world': prompts/world.txt without the pairs held out of the teacher's training (they measure
    generalization in benchmarks/students.py); otherwise a prompt file, one prompt per line."""
    if source == "world":
        from ...eval.classifier import is_held_out_prompt
        from ...world.prompts import world_txt_prompts

        return [p for p in world_txt_prompts() if not is_held_out_prompt(p)]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"prompts={source!r}: give 'world' or a prompt file (one prompt per line)")
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


# --- identity --------------------------------------------------------------------------------

def network_sha256(network: torch.nn.Module) -> str:
    """A hash of a network's weights (names, shapes, dtypes and bytes), as the teacher's identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_precision(teacher) -> str:
    """What a teacher (and the students viewing it) computes in: "bf16" (autocast, embedded teachers),
    else its dtype ("fp32" for float32)."""
    if getattr(teacher, "autocast_bf16", False):
        return "bf16"
    dtype = getattr(teacher, "dtype", torch.float32)
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def teacher_identity(teacher, spec: str) -> dict:
    return {"spec": spec, "network_sha256": network_sha256(teacher.network), "resolution": teacher.resolution,
            "channels": teacher.channels}


# --- the run -----------------------------------------------------------------------------------

class StudentRun:
    """A student being trained in `out_dir`: teacher, student, prompts, the method and the loop."""

    def __init__(self, out_dir: str | Path, config: StudentConfig, method_cls, teacher=None, log=print,
                 prompts: list[str] | None = None, accelerator=None):
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator
        self.config = config.validate()
        self.log = log
        if config.threads:
            torch.set_num_threads(config.threads)
        # The student is a view of the teacher object (StudentModel), so it computes in the teacher's
        # precision too. A given teacher keeps its own; one loaded here follows config.precision.
        if teacher is None:
            teacher = load_teacher(config.teacher, autocast_bf16=resolve_precision(config.precision) == "bf16")
            if getattr(teacher, "autocast_bf16", None) is not None:
                log(describe_precision(config.precision))
        self.teacher = teacher
        if getattr(self.teacher, "network", None) is None:
            raise ValueError(f"teacher {config.teacher!r} has no network: students distill the embedded teacher or a "
                             "diffusers pipeline, not the oracle")
        self.teacher.network.requires_grad_(False).eval()
        self.guidance = config.guidance if config.guidance is not None else default_guidance(config.teacher)
        self.prompts = prompts if prompts is not None else training_prompts(config.prompts)
        self.method = make_method(method_cls, config)
        torch.manual_seed(config.seed)
        self.student = StudentModel(self.teacher, method_network(self.method, self.teacher))
        self.ema = copy.deepcopy(self.student.network).requires_grad_(False).eval() if config.ema_decay else None
        start = time.time()
        self.method.attach(self)  # may make teacher caches (KD pairs, teacher samples): part of the cost
        self.setup_seconds = time.time() - start
        previous = self.out_dir / STUDENT_FILE
        if previous.exists():  # a resumed run keeps the setup time of the run that made the caches
            try:
                self.setup_seconds = max(self.setup_seconds, 60 * float(json.loads(previous.read_text())["setup_minutes"]))
            except (ValueError, KeyError, TypeError, OSError):
                pass
        params = [p for p in self.student.network.parameters() if p.requires_grad]
        # adversarial methods take GAN betas (e.g. (0.5, 0.999)); every other method AdamW's defaults
        betas = getattr(self.method, "optimizer_betas", (0.9, 0.999))
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=0.0)
        network = self.student.network
        if accelerator is not None:  # DDP: the student's forward runs through the wrapper, files hold the module
            wrapped, self.optimizer = accelerator.prepare(network, self.optimizer)
            if hasattr(network, "config"):  # teachers read network.config (e.g. camera_dim); DDP does not forward it
                wrapped.config = network.config
            self.student._view.network = wrapped
        self.loop = TrainingLoop(self.out_dir, network, self.optimizer, config.loop_config(), ema=self.ema,
                                 log=log, extra_modules=getattr(self.method, "extra_modules", {}),
                                 extra_state=getattr(self.method, "extra_state", None),
                                 load_extra_state=getattr(self.method, "load_extra_state", None),
                                 parameters=params, title=f"{config.method} student, NFE {config.nfe}",
                                 accelerator=accelerator)
        if self.loop.checkpoint_path.exists():
            self.loop.load()

    # -- data -----------------------------------------------------------------------------------
    def batch(self, generator: torch.Generator, batch_size: int | None = None) -> tuple[Cond, torch.Tensor]:
        """Prompts drawn uniformly (with replacement) and their initial noise x_T, from `generator`."""
        b = batch_size or self.config.batch_size
        idx = torch.randint(len(self.prompts), (b,), generator=generator).tolist()
        cond = self.teacher.encode_prompt([self.prompts[i] for i in idx])
        return cond, initial_noise(self.teacher, b, generator)

    def teacher_eps(self, x: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        """The guided teacher eps that students learn from (no gradient)."""
        with torch.no_grad():
            t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
            return self.teacher.predict_eps(x, t, cond, self.guidance)

    def sampling_model(self) -> StudentModel:
        """The student to sample from: its EMA copy when the run keeps one."""
        return self.student.with_network(self.ema) if self.ema is not None else self.student

    # -- records --------------------------------------------------------------------------------
    def sample_grid(self, prompts: list[str] | None = None, seed: int = 1234) -> Path:
        prompts = prompts or self.prompts[:: max(1, len(self.prompts) // 16)][:16]
        model = self.sampling_model()
        model.network.eval()
        try:
            out = self.method.sample(model, self.teacher.encode_prompt(prompts), self.config.nfe,
                                     torch.Generator().manual_seed(seed))
        finally:
            self.student.network.train()
        folder = self.out_dir / "samples"
        folder.mkdir(exist_ok=True)
        return save_image(folder / f"step-{self.loop.step:07d}.png", out.images, ncols=8)

    def describe(self) -> dict:
        return {"format": STUDENT_FORMAT, "version": 1, "config": self.config.to_dict(),
                "teacher": teacher_identity(self.teacher, self.config.teacher), "guidance": self.guidance,
                "nfe": self.config.nfe, "steps_done": self.loop.step,
                "precision": teacher_precision(self.teacher),  # this session's
                "train_minutes": round(self.loop.train_seconds / 60, 2),
                "setup_minutes": round(self.setup_seconds / 60, 2),  # teacher caches made before training
                # training minutes of the students this one starts from (SFD's second stage)
                "prior_minutes": round(float(getattr(self.method, "prior_minutes", 0.0)), 2),
                "parameters": sum(p.numel() for p in self.student.network.parameters())}

    def student_network_note(self) -> str:
        """What the student network is, for the model card: a trained copy of the teacher's network
        unless the method builds its own (`student_network`)."""
        if getattr(self.method, "student_network", None) is None:
            return "a copy of the teacher's, trained"
        teacher_params = sum(p.numel() for p in self.teacher.network.parameters())
        return f"the method's own network; the teacher has {teacher_params:,}"

    def write_card(self) -> None:
        d = self.describe()
        cfg = d["config"]
        text = f"""# sds3d student: {cfg['method']}, {d['nfe']} NFE

Written by `sds3d distill` from student.json; figures of quality come from `benchmarks/students.py`.

- **Method**: {cfg['method']} (options {json.dumps(cfg['options'])}), distilled classifier-free guidance {d['guidance']}
- **Teacher**: `{cfg['teacher']}`, network sha256 {d['teacher']['network_sha256'][:16]}..., {d['teacher']['resolution']} px
- **Student network**: {d['parameters']:,} parameters ({self.student_network_note()})
- **Training**: {d['steps_done']} steps of batch {cfg['batch_size']}, lr {cfg['lr']}, seed {cfg['seed']},
  {d['train_minutes']} minutes of training (+ {d['setup_minutes']} minutes making teacher caches) on this machine
- **Prompts**: {cfg['prompts']}
- **Use**: `sds3d sample --student {self.out_dir} "a red cube" --n 16`
"""
        atomic_write_text(self.out_dir / "MODEL_CARD.md", text)

    # -- train ----------------------------------------------------------------------------------
    def train(self, max_minutes: float | None = None, max_steps: int | None = None) -> dict:
        """Train to config.steps (or stop earlier at `max_steps` / `max_minutes` / a signal, with a
        checkpoint to resume from); sample grid, student.json and model card at the end."""
        main = self.loop.is_main
        if main:
            atomic_write_text(self.out_dir / STUDENT_FILE, json.dumps(self.describe(), indent=2) + "\n")
        start = time.time()
        stop_at = self.config.steps if max_steps is None else min(max_steps, self.config.steps)
        result = self.loop.train(self.method.loss, max_steps=stop_at, max_minutes=max_minutes,
                                 evaluate=self.sample_grid)
        if main:
            self.sample_grid()
            atomic_write_text(self.out_dir / STUDENT_FILE, json.dumps(self.describe(), indent=2) + "\n")
            self.write_card()
        result["seconds"] = round(time.time() - start, 1)
        return result


def make_accelerator():
    """An `accelerate.Accelerator` when launched by `accelerate launch` with several processes
    (gloo on CPU, NCCL on GPUs), else None: a single process trains without it."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Unused parameters are normal here: a camera-conditioned network called without a camera.
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def method_network(method, teacher) -> torch.nn.Module | None:
    """The student network a method builds itself (optional `student_network(teacher)`, e.g. SFD-v's
    step-conditioned copy), or None: a plain copy of the teacher's network."""
    make = getattr(method, "student_network", None)
    return make(teacher) if make is not None else None


def make_method(method_cls, config: StudentConfig):
    """The method object for a config, after checking that it can make a student of config.nfe."""
    why = method_cls.supported_nfe(config.nfe)
    if why:
        raise ValueError(f"method {config.method} cannot make a {config.nfe}-NFE student: {why}")
    return method_cls(config)


def read_student_folder(folder: str | Path) -> dict:
    """student.json of a student folder, or a one-line StudentFolderError."""
    folder = Path(folder)
    path = folder / STUDENT_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudentFolderError(f"{folder} is not a student folder (no {STUDENT_FILE}); make one with sds3d distill") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise StudentFolderError(f"{path} is unreadable ({type(error).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != STUDENT_FORMAT:
        raise StudentFolderError(f"{path} is not a student description (format {STUDENT_FORMAT!r} expected)")
    if not (folder / "checkpoints" / "last.pt").is_file():
        raise StudentFolderError(f"{folder} has no checkpoints/last.pt: the student never saved its weights")
    return meta


def shipped_teacher_with(sha256: str, precision: str = "auto"):
    """The shipped teacher (`SHIPPED_TEACHERS`) whose network has this `network_sha256`, or None: a
    student made when "embedded" named an earlier network keeps loading after the default changed."""
    for spec, folder in SHIPPED_TEACHERS.items():
        if (folder / "config.json").exists():
            teacher = load_teacher(spec, autocast_bf16=resolve_precision(precision) == "bf16")
            if network_sha256(teacher.network) == sha256:
                return teacher
    return None


def load_student(folder: str | Path, methods: dict, teacher=None, use_ema: bool = True, precision: str = "auto"):
    """(StudentModel, method, student.json) of a trained student folder, for sampling.

    `methods` maps method names to classes (sds3d.distill.students.METHODS). The teacher is loaded
    from the spec the student was made from (or given) and must be the very network it was
    distilled from (same weights hash), else StudentFolderError; a student of "embedded" made before
    the shipped default changed loads with the earlier network it was made from (`shipped_teacher_with`). A loaded embedded teacher, and so
    the student, computes in `precision` (`sds3d.precision.resolve_precision`)."""
    folder = Path(folder)
    meta = read_student_folder(folder)
    config = StudentConfig.from_dict(meta["config"])
    if config.method not in methods:
        raise StudentFolderError(f"{folder} was made by method {config.method!r}, which this sds3d does not know")
    if teacher is None:
        teacher = load_teacher(config.teacher, autocast_bf16=resolve_precision(precision) == "bf16")
        if config.teacher in SHIPPED_TEACHERS and network_sha256(teacher.network) != meta["teacher"]["network_sha256"]:
            # distilled from a teacher this package shipped before ("embedded" then meant that one)
            teacher = shipped_teacher_with(meta["teacher"]["network_sha256"], precision) or teacher
    if network_sha256(teacher.network) != meta["teacher"]["network_sha256"]:
        raise StudentFolderError(f"{folder} was distilled from another teacher than {config.teacher!r} "
                                 "(its network weights differ): sample it with the teacher it was made from")
    method = make_method(methods[config.method], config)
    student = StudentModel(teacher, method_network(method, teacher))
    try:
        state = torch.load(folder / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        weights = state["ema"] if use_ema and "ema" in state else state["model"]
        student.network.load_state_dict(weights)
    except Exception as error:
        raise StudentFolderError(f"{folder}/checkpoints/last.pt is unreadable ({type(error).__name__})") from None
    student.network.eval().requires_grad_(False)
    return student, method, meta
