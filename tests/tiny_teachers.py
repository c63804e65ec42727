"""Tiny embedded-style teachers for fast tests: a small LeanUNet with random (non-zero) weights and
a hash text encoder, so nothing loads MiniLM or the shipped weights."""

from __future__ import annotations

import hashlib

import torch

from sds3d.diffusion.schedule import make_schedule
from sds3d.teachers.embedded import EmbeddedTeacher
from sds3d.teachers.unet import LeanUNet, NetConfig

TINY_NET = NetConfig(resolution=16, channels=(16, 32), attention_levels=(1,), emb_dim=32, head_dim=16)


class HashText:
    """A stand-in for MiniLM: a fixed random unit vector per text (fast, deterministic)."""

    dim = 384

    def embed(self, texts):
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16))
            v = torch.randn(384, generator=g)
            rows.append(v / v.norm())
        return torch.stack(rows) if rows else torch.zeros(0, 384)


def tiny_teacher(seed: int = 0, network: NetConfig = TINY_NET, prediction_type: str = "v_prediction") -> EmbeddedTeacher:
    torch.manual_seed(seed)
    net = LeanUNet(network)
    for p in net.parameters():  # non-zero outputs everywhere, so every path is exercised
        p.data.add_(0.01 * torch.randn_like(p))
    return EmbeddedTeacher(net, make_schedule("cosine"), prediction_type, text_encoder=HashText(),
                           meta={"schedule": "cosine"})
