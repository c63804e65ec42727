"""LeanUNet: the embedded teacher's network, a compact ADM-style UNet.

Residual blocks with GroupNorm and FiLM conditioning on (timestep embedding + projected MiniLM
sentence embedding [+ camera direction embedding, as MVDream]), self-attention at the lowest
resolution, optional 2x2 patchify stem. Students that start from the teacher's weights copy it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import tuples_to_lists
from ..settings import dataclass_from_dict


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
    # 1: one sentence embedding of the prompt; 3: also its first and second object's phrase, side by
    # side (teachers/text.py `slot_texts`: which colour belongs to which object of a pair)
    text_slots: int = 1
    # 3: also conditioned on the unit direction to the camera (as MVDream), added to the time and
    # text embedding; a zero vector means "no camera" (camera dropout in training). 0: text only.
    camera_dim: int = 0
    emb_dim: int = 256
    groups: int = 8
    head_dim: int = 32

    @classmethod
    def from_dict(cls, data: dict, prefix: str = "") -> "NetConfig":
        """Strict (sds3d.settings.dataclass_from_dict): an unknown key or a value of the wrong type is
        a ConfigError naming it (under `prefix`, e.g. "network."); lists become tuples."""
        return dataclass_from_dict(cls, data, prefix)

    def to_dict(self) -> dict:
        return tuples_to_lists(asdict(self))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer or float timesteps (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a 1x1 convolution, as one batched matrix product per image.

    The same function as the layer, and the same weights; but oneDNN's 1x1 convolution rounds
    differently at one thread and at several, so a run's result would depend on how many threads it
    got (`sds3d batch --workers N` gives each run a share of the cores). torch's batched matmul
    gives the same bits at 1 and 2 threads (tests/test_thread_invariance.py)."""
    b, c, h, w = x.shape
    weight = conv.weight.flatten(1)  # (out, in)
    out = torch.baddbmm(conv.bias[None, :, None].expand(b, -1, h * w), weight.expand(b, -1, -1), x.flatten(2))
    return out.view(b, -1, h, w)


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
        return (conv1x1(self.skip, x) if isinstance(self.skip, nn.Conv2d) else x) + h


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
        qkv = conv1x1(self.qkv, self.norm(x))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, d)
        return x + conv1x1(self.out, a.transpose(-1, -2).reshape(b, c, h, w))


class LeanUNet(nn.Module):
    """eps/v/x0 network f(x_t, t, text embedding[, camera direction]) -> (B, C, R, R)."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = cfg = config
        ch, E, G = cfg.channels, cfg.emb_dim, cfg.groups
        cin = cfg.in_channels * cfg.patch ** 2
        self.time_mlp = nn.Sequential(nn.Linear(128, E), nn.SiLU(), nn.Linear(E, E))
        self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim * cfg.text_slots, E), nn.SiLU(), nn.Linear(E, E))
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
