"""Real text-to-image teachers through diffusers: Stable Diffusion 1.x / 2.x and DeepFloyd IF stage I.

`load_diffusers_teacher("runwayml/stable-diffusion-v1-5")` (a hub id) or `load_diffusers_teacher("path/to/folder")`
(a folder written by `DiffusionPipeline.save_pretrained`, e.g. a hub snapshot) gives a `DiffusersTeacher` behind the
Teacher protocol (diffusion/protocol.py), so SDS, VSD, the solvers and the students use it like the embedded network.

- Stable Diffusion is a *latent* teacher: images are resized to `vae_resolution` (by default the pipeline's native
  size, UNet sample_size x VAE factor: 512 for SD 1.x/2.x base, as threestudio upsamples its 64 px renders),
  encoded by the VAE, and the UNet works on `vae_resolution / 8` latents.
- DeepFloyd IF stage I is a *pixel* teacher at 64x64; its UNet also predicts a variance (6 output channels), of
  which the first 3 are eps.
- The model's `prediction_type` (eps or v, from the scheduler config) is converted to eps by NoiseSchedule.to_eps.

diffusers and transformers are imported inside functions, so `import sds3d` stays light.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..diffusion.protocol import Cond, model_to_pixels, pixels_to_model
from ..diffusion.schedule import NoiseSchedule

# Pipelines we can drive, by the `_class_name` in model_index.json: their UNet, text encoder and tokenizer
# are used as the pipeline itself uses them.
LATENT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
PIXEL_PIPELINES = ("IFPipeline", "IFImg2ImgPipeline")
SUPPORTED_PIPELINES = LATENT_PIPELINES + PIXEL_PIPELINES

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXAMPLES = "e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base, DeepFloyd/IF-I-XL-v1.0"


class TeacherLoadError(ValueError):
    """A diffusers teacher could not be loaded; the one-line message names the spec and the fix."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def schedule_from_scheduler_config(config) -> NoiseSchedule:
    """The training noise schedule of a pipeline: any DDPM-family scheduler config rebuilt as a DDPMScheduler
    (betas, beta_schedule, trained_betas, rescale_betas_zero_snr), whose `alphas_cumprod` is the schedule."""
    from diffusers import DDPMScheduler

    known = inspect.signature(DDPMScheduler.__init__).parameters
    ddpm = DDPMScheduler.from_config({k: v for k, v in dict(config).items() if k in known})
    return NoiseSchedule(ddpm.alphas_cumprod.detach().float().clone())


class DiffusersTeacher:
    """A diffusers pipeline (SD 1.x/2.x latent, or DeepFloyd IF stage I pixel) behind the Teacher protocol.

    `network` is the pipeline's UNet2DConditionModel, frozen, in `dtype` on `device`. Its call signature, which a
    copy with a LoRA attached (VSD) must keep:

        network(sample, timestep, encoder_hidden_states=emb, return_dict=False)[0] -> out
          sample   (B, channels, resolution, resolution) in `dtype`: the noisy latent (SD) or image in [-1, 1] (IF)
          timestep (B,) long, in [0, schedule.num_train_timesteps)
          emb      (B, L, D) in `dtype`: `Cond.cond` / `Cond.uncond` from `encode_prompt`
          out      (B, channels, ...) in the model's `prediction_type` ('epsilon' or 'v_prediction'); with
                   learned variance (IF) (B, 2 * channels, ...), of which the first `channels` are the prediction.

    Text embeddings are the text encoder's last hidden states, padded to the tokenizer's length, exactly as the
    pipeline's own `encode_prompt` makes them (CLIP: 77 tokens; IF: T5 over 77 lower-cased tokens with a mask).
    """

    def __init__(self, pipeline, vae_resolution: int | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, spec: str | None = None):
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype if dtype is not None else _default_dtype(self.device)
        self.spec = spec
        self.pipeline = pipeline
        self.kind = "pixel" if type(pipeline).__name__ in PIXEL_PIPELINES or getattr(pipeline, "vae", None) is None else "latent"
        self.unet = pipeline.unet
        self.vae = getattr(pipeline, "vae", None) if self.kind == "latent" else None
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                if module.dtype != self.dtype:  # cast only when needed: diffusers 0.42 warns on any .to(dtype)
                    module.to(dtype=self.dtype)
                module.to(self.device).eval().requires_grad_(False)
        self.network = self.unet
        self.schedule = schedule_from_scheduler_config(pipeline.scheduler.config)
        self.prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise TeacherLoadError(f"teacher {spec or type(pipeline).__name__} has prediction_type "
                                   f"{self.prediction_type!r}: supported are 'epsilon', 'sample', 'v_prediction'")
        self.channels = int(self.unet.config.in_channels)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.kind == "latent":
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            if self.channels != self.vae.config.latent_channels:
                raise TeacherLoadError(f"teacher {spec or type(pipeline).__name__}: the UNet takes {self.channels} "
                                       f"channels but the VAE makes {self.vae.config.latent_channels} (inpainting or "
                                       f"depth models are not text-to-image teachers)")
            if vae_resolution is None:  # the pipeline's native size
                sample_size = self.unet.config.sample_size
                vae_resolution = int(sample_size if isinstance(sample_size, int) else sample_size[0]) * self.vae_scale_factor
            if vae_resolution % (self.vae_scale_factor * unet_factor):
                raise TeacherLoadError(f"bad vae_resolution={vae_resolution}: must be a multiple of "
                                       f"{self.vae_scale_factor * unet_factor} for this VAE and UNet")
            self.vae_resolution = int(vae_resolution)
            self.resolution = self.vae_resolution // self.vae_scale_factor
            self.scaling_factor = float(self.vae.config.scaling_factor)
            self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        else:
            self.vae_scale_factor = 1
            self.vae_resolution = None
            sample_size = self.unet.config.sample_size
            self.resolution = int(sample_size if isinstance(sample_size, int) else sample_size[0])
        # How the pipeline tokenizes: IF lower-cases and caps T5 at 77 tokens with an attention mask; SD pads
        # CLIP to model_max_length and passes a mask only if the text encoder was trained with one.
        if self.kind == "pixel":
            self.text_max_length, self.text_lowercase, self.text_attention_mask = 77, True, True
        else:
            self.text_max_length, self.text_lowercase = int(self.tokenizer.model_max_length), False
            self.text_attention_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, spec: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        vae_resolution: int | None = None, **pipeline_kwargs) -> "DiffusersTeacher":
        """Load a local diffusers folder or a hub id; see `load_diffusers_teacher`."""
        return load_diffusers_teacher(spec, device=device, dtype=dtype, vae_resolution=vae_resolution, **pipeline_kwargs)

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text embeddings; each distinct string goes through the text encoder once per teacher."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            texts = [p.lower().strip() for p in missing] if self.text_lowercase else missing
            tokens = self.tokenizer(texts, padding="max_length", max_length=self.text_max_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
            mask = tokens.attention_mask.to(self.device) if self.text_attention_mask else None
            hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
            for p, row in zip(missing, hidden.to(self.dtype)):
                self._prompt_cache[p] = row
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None) -> Cond:
        """Cond with cond / uncond (B, L, D); the unconditional text is "" unless negative prompts are given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative is None:
            negative = [""] * len(prompts)
        elif isinstance(negative, str) or len(negative) == 1:
            negative = [negative if isinstance(negative, str) else negative[0]] * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative)} negative prompts")
        embeddings = self._embed(prompts + list(negative))  # one text-encoder call for whatever is not cached
        return Cond(prompts=prompts, cond=embeddings[: len(prompts)], uncond=embeddings[len(prompts):])

    # -- images -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> model space, differentiable w.r.t. the images.

        Latent: bilinear resize to vae_resolution, [-1, 1], VAE posterior *mean* times scaling_factor (the mean,
        not a sample: the SDS gradient should not carry the VAE's sampling noise). Pixel: resize to the UNet's size."""
        if self.kind == "pixel":
            return pixels_to_model(images, self.resolution)
        r = self.vae_resolution
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, (r, r), mode="bilinear", align_corners=False, antialias=images.shape[-1] > r)
        x = (images * 2 - 1).to(self.device, self.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return ((latents - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1] (VAE decode for latent teachers)."""
        if self.kind == "pixel":
            return model_to_pixels(x)
        latents = x.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return model_to_pixels(self.vae.decode(latents).sample).to(x.dtype)

    # -- denoising ----------------------------------------------------------------------------
    def _network(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.network(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (IF): [prediction, variance]
            out = out[:, : x.shape[1]]
        return out

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """The network's own output (its `prediction_type`), guided; one UNet call on [uncond, cond]."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(b)
        x = x_t.to(self.device, self.dtype)
        emb_c = cond.cond.to(self.device, self.dtype)
        if emb_c.shape[0] != b:
            raise ValueError(f"predict: {b} images but {emb_c.shape[0]} prompts in cond")
        if guidance_scale == 1.0:
            return self._network(x, t, emb_c).to(x_t.device, x_t.dtype)
        emb_u = cond.uncond.to(self.device, self.dtype)
        out = self._network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb_u, emb_c])).to(x_t.device, x_t.dtype)
        out_u, out_c = out.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)  # combined in the caller's dtype: fp16 loses little at s = 100

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided eps, diffusers convention uncond + s (cond - uncond), in x_t's dtype. Guiding the raw output and
        then converting equals guiding eps: the conversions are affine in the output for a fixed x_t."""
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
        return self.schedule.to_eps(x_t, self.predict(x_t, t, cond, guidance_scale), t, self.prediction_type)

    def __repr__(self) -> str:
        return (f"DiffusersTeacher({self.spec or type(self.pipeline).__name__!s}, {self.kind}, resolution={self.resolution}, "
                f"channels={self.channels}, prediction_type={self.prediction_type}, {self.dtype}, {self.device})")


# --- loading ---------------------------------------------------------------------------------

def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.endswith("/") or spec.count("/") > 1
            or bool(re.match(r"^[A-Za-z]:", spec)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def resolve_spec(spec: str) -> tuple[str, bool, dict | None]:
    """(where to load from, whether it is a local folder, its model_index.json if local) or TeacherLoadError."""
    if not spec:
        raise TeacherLoadError(f"empty teacher: give oracle, embedded, a diffusers pipeline folder or a hub id ({_EXAMPLES})")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise TeacherLoadError(f"teacher {spec} is a file: expected a diffusers pipeline folder with model_index.json "
                                   f"(single-file .ckpt/.safetensors checkpoints must be converted to the diffusers layout)")
        index = path / "model_index.json"
        if not index.is_file():
            raise TeacherLoadError(f"teacher folder {spec} is not a diffusers pipeline: expected model_index.json with "
                                   f"unet/, text_encoder/, tokenizer/, scheduler/ (and vae/), as DiffusionPipeline.save_pretrained writes")
        try:
            return str(path), True, json.loads(index.read_text())
        except (OSError, ValueError) as error:
            raise TeacherLoadError(f"teacher folder {spec}: model_index.json is unreadable ({_first_line(error)})") from None
    if _looks_like_path(spec):
        raise TeacherLoadError(f"teacher folder {spec} does not exist: give a diffusers pipeline folder or a hub id ({_EXAMPLES})")
    if not _HUB_ID.match(spec):
        raise TeacherLoadError(f"unknown teacher {spec!r}: allowed are oracle, embedded, a diffusers pipeline folder "
                               f"or a hub id owner/name ({_EXAMPLES})")
    return spec, False, None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when a TCP connection to it opens.

    One connection attempt of at most `timeout` seconds to HF_ENDPOINT's host (huggingface.co), or to
    the proxy that HTTPS_PROXY / ALL_PROXY names for it (urllib's reading of the environment). Without
    it, a machine with no network spends ~30 s in huggingface_hub's retries (five, backing off 1-8 s)
    before the same answer; a DNS failure or a refused connection is the answer at once."""
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    target = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")
    proxies = getproxies()
    proxy = proxies.get(target.scheme) or proxies.get("all")
    via = target
    if proxy and not proxy_bypass(target.hostname or ""):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = via.hostname or "huggingface.co"
    port = via.port or (443 if via.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached: {error.strerror or str(error) or type(error).__name__}"
    return None


def _hub_model_index(repo_id: str) -> tuple[dict, bool]:
    """model_index.json of a hub pipeline, from the local cache when it is there (no network, no retries), else
    from the hub unless HF_HUB_OFFLINE is set or the hub cannot be reached (`hub_unreachable`: one connection
    attempt, not huggingface_hub's half minute of retries). Returns (index, found in cache)."""
    from diffusers import DiffusionPipeline

    offline = hub_offline()
    hint = (f"download the weights first (`hf download {repo_id}`; cached weights load with HF_HUB_OFFLINE=1) "
            f"or give a local diffusers folder")
    for local_only in ((True,) if offline else (True, False)):
        if not local_only:
            unreachable = hub_unreachable()
            if unreachable:
                raise TeacherLoadError(f"cannot fetch teacher {repo_id!r}: it is not in the local Hugging Face cache "
                                       f"and the hub is out of reach (no network? {unreachable}): {hint}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # diffusers passes hf_hub_download a deprecated argument
                return dict(DiffusionPipeline.load_config(repo_id, local_files_only=local_only)), local_only
        except Exception as error:  # noqa: BLE001 - huggingface_hub raises OSError, HTTP or value errors alike
            last = error
    reason = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else
              f"not in the local cache, and the hub did not answer: no such repository, or a gated model "
              f"without a token ({_first_line(last)})")
    raise TeacherLoadError(f"cannot fetch teacher {repo_id!r} ({reason}): {hint}")


def check_teacher_spec(spec: str) -> None:
    """The checks of a diffusers teacher that cost no weights: a local folder has model_index.json; a hub id is
    in the local cache, or (HF_HUB_OFFLINE unset) the hub answers and has it. TeacherLoadError with one line,
    at once, otherwise; `sds3d generate` calls it before any run folder is made."""
    where, local, _ = resolve_spec(str(spec).strip())
    if not local:
        _hub_model_index(where)


def load_diffusers_teacher(spec: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                           vae_resolution: int | None = None, **pipeline_kwargs) -> DiffusersTeacher:
    """A frozen DiffusersTeacher from a local diffusers folder or a hub id (fp16 on CUDA, fp32 on CPU by default).

    Hub ids load from the local Hugging Face cache when present and are downloaded otherwise; HF_HUB_OFFLINE=1
    forbids the download. The safety checker (and IF's watermarker) are not loaded: they act on sampled images,
    which score distillation never makes. `pipeline_kwargs` go to DiffusionPipeline.from_pretrained (e.g. variant="fp16").
    Every failure a user can fix raises TeacherLoadError with one line."""
    from diffusers import DiffusionPipeline

    spec = str(spec).strip()
    where, local, index = resolve_spec(spec)
    cached = False
    if not local:
        index, cached = _hub_model_index(where)
    class_name = index.get("_class_name", "?")
    if class_name not in SUPPORTED_PIPELINES:
        raise TeacherLoadError(f"teacher {spec} is a {class_name}, which is not supported: supported pipelines are "
                               f"{', '.join(SUPPORTED_PIPELINES)} (SD 1.x/2.x, DeepFloyd IF stage I)")
    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype if dtype is not None else _default_dtype(device)
    kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=dtype)
    if class_name in PIXEL_PIPELINES:
        kwargs["watermarker"] = None
    kwargs.update(pipeline_kwargs)
    attempts = [True] if local or cached or hub_offline() else [False]
    if cached and not hub_offline():
        attempts.append(False)  # model_index.json was cached but not every weight file: download the rest
    for i, local_only in enumerate(attempts):
        unreachable = None if local_only else hub_unreachable()
        if unreachable:
            raise TeacherLoadError(f"cannot load diffusers teacher {spec}: some of its files are not in the local "
                                   f"Hugging Face cache and the hub is out of reach (no network? {unreachable}): "
                                   f"download the weights first (`hf download {where}`) or give a local diffusers folder")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipeline = DiffusionPipeline.from_pretrained(where, local_files_only=local_only, **kwargs)
            break
        except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as error:
            if i + 1 < len(attempts):
                continue
            hint = ("download the weights first (`hf download " + where + "`) or give a local diffusers folder"
                    if not local else "re-save it with DiffusionPipeline.save_pretrained or download it again")
            raise TeacherLoadError(f"cannot load diffusers teacher {spec} ({_first_line(error)}): {hint}") from None
    return DiffusersTeacher(pipeline, vae_resolution=vae_resolution, device=device, dtype=dtype, spec=spec)
