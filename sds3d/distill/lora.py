"""VSD's second network: a camera-conditioned LoRA copy of the teacher's denoiser (ProlificDreamer).

`make_lora_network(teacher)` deep-copies `teacher.network`, injects peft LoRA adapters (LoRA B = 0
at init) and adds a camera embedding of the flattened camera-to-world matrix to the network's
conditioning embedding (last layer zero-initialised). At construction the copy therefore predicts
exactly what the teacher's network predicts. Only LoRA and camera-embedding parameters train; the
copied base weights are frozen and the teacher's own network is never touched.

Supported networks:
- diffusers `UNet2DConditionModel` (Stable Diffusion 1.x/2.x, DeepFloyd IF): LoRA on the attention
  projections `to_q, to_k, to_v, to_out.0`; the camera embedding becomes the UNet's
  `class_embedding`, so diffusers adds it to the time embedding (threestudio's recipe), called as
  `unet(x_t, t, encoder_hidden_states=text, class_labels=camera)`.
- sds3d's `LeanUNet` (the embedded teacher, `network(x, t, text)`): LoRA on the FiLM linears, the
  attention projections and the residual convs; its `text_mlp` is wrapped so that the text
  argument carries [text | camera] and the camera embedding is added to the same (time + text)
  embedding every block reads.

Train it with its own optimizer (`make_lora_optimizer`) on `score.lora_diffusion_loss`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

DIFFUSERS_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LEAN_LORA_TARGETS = ("qkv", "out", "film", "conv1", "conv2")


class CameraEmbedding(nn.Module):
    """Camera (B, camera_dim) -> (B, out_dim): Linear-SiLU-Linear (diffusers' TimestepEmbedding layout).

    Kept in float32 whatever the network's dtype; the last layer starts at zero so a fresh LoRA
    network equals its teacher.
    """

    def __init__(self, camera_dim: int, out_dim: int):
        super().__init__()
        self.camera_dim = camera_dim
        self.linear_1 = nn.Linear(camera_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(camera.float())))


class _TextPlusCamera(nn.Module):
    """LeanUNet's text_mlp, fed [text | camera]: returns text_mlp(text) + camera_embedding(camera)."""

    def __init__(self, text_mlp: nn.Module, camera: CameraEmbedding, text_dim: int):
        super().__init__()
        self.text_mlp, self.camera, self.text_dim = text_mlp, camera, text_dim

    def forward(self, text_and_camera: torch.Tensor) -> torch.Tensor:
        text, camera = text_and_camera[:, :self.text_dim], text_and_camera[:, self.text_dim:]
        out = self.text_mlp(text)
        return out + self.camera(camera).to(out.dtype)


class LoraNetwork(nn.Module):
    """A teacher network copy with LoRA adapters and a camera embedding.

    forward(x_t, t, text, camera) -> the network's raw output in `prediction_type` (eps / v / x0),
    where `text` is one row of `Cond.cond` per image (for VSD the view-independent prompt, as in
    threestudio) and `camera` is (B, camera_dim) or anything that flattens to it, e.g. c2w (B, 4, 4);
    zeros mean "no camera" (the branch VSD's camera guidance compares against).
    """

    def __init__(self, network: nn.Module, camera: CameraEmbedding, kind: str, prediction_type: str):
        super().__init__()
        self.network, self.camera, self.kind, self.prediction_type = network, camera, kind, prediction_type

    @property
    def camera_dim(self) -> int:
        return self.camera.camera_dim

    def flatten_camera(self, camera: torch.Tensor) -> torch.Tensor:
        flat = camera.reshape(camera.shape[0], -1)
        if flat.shape[1] != self.camera_dim:
            raise ValueError(f"camera has {flat.shape[1]} values per image ({tuple(camera.shape)}); "
                             f"this LoRA network was built with camera_dim={self.camera_dim}")
        return flat

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        weight = next(self.network.parameters())
        camera = self.flatten_camera(camera).to(weight.device, torch.float32)
        t = torch.as_tensor(t, device=weight.device).reshape(-1).expand(x_t.shape[0])
        x, text = x_t.to(weight.device, weight.dtype), text.to(weight.device, weight.dtype)
        if self.kind == "diffusers":
            out = self.network(x, t, encoder_hidden_states=text, class_labels=camera).sample
        else:
            out = self.network(x, t, torch.cat([text, camera.to(text.dtype)], dim=1), self._base_camera(camera))
        return out.to(x_t.dtype)

    def _base_camera(self, camera: torch.Tensor) -> torch.Tensor | None:
        """For a camera-conditioned LeanUNet, its own camera input: the unit direction to the camera
        from a flattened c2w (zero rows, dropped cameras, stay zero = no camera), as the teacher gets."""
        if not getattr(self.network.config, "camera_dim", 0) or self.camera_dim != 16:
            return None
        from ..geometry.cameras import camera_directions

        return camera_directions(camera.reshape(-1, 4, 4))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _refuse(teacher, why: str) -> ValueError:
    return ValueError(f"VSD needs a teacher network it can copy into a camera-conditioned LoRA (a diffusers "
                      f"UNet2DConditionModel or sds3d's LeanUNet); teacher {type(teacher).__name__} {why}")


def network_kind(teacher) -> str:
    """'diffusers' or 'lean' for a teacher whose network VSD can use; one-line ValueError otherwise."""
    network = getattr(teacher, "network", None)
    if network is None:
        raise _refuse(teacher, "has none (network=None): use sds_loss or nfsd_loss with it")
    from ..teachers.unet import LeanUNet

    if isinstance(network, LeanUNet):
        return "lean"
    from diffusers import UNet2DConditionModel

    if not isinstance(network, UNet2DConditionModel):
        raise _refuse(teacher, f"has a {type(network).__name__}")
    if network.class_embedding is not None:
        raise _refuse(teacher, f"has a UNet that already uses class labels (class_embed_type="
                               f"{network.config.class_embed_type!r}), which the camera embedding would replace")
    if network.config.addition_embed_type not in (None, "text"):
        raise _refuse(teacher, f"has a UNet with addition_embed_type={network.config.addition_embed_type!r} "
                               "(it needs added_cond_kwargs, e.g. SDXL), which VSD does not pass")
    return "diffusers"


def make_lora_network(teacher, rank: int = 4, lora_alpha: float | None = None, camera_dim: int = 16,
                      target_modules: list[str] | None = None) -> LoraNetwork:
    """A trainable LoRA copy of `teacher.network` for `vsd_loss` (see the module docstring).

    lora_alpha defaults to `rank` (LoRA scale 1). Raises ValueError (one line) for teachers without
    a network (the oracle) or with a network of another kind.
    """
    from peft import LoraConfig, inject_adapter_in_model

    kind = network_kind(teacher)
    network = teacher.network
    prediction_type = getattr(teacher, "prediction_type", "epsilon")

    def config(default_targets):
        return LoraConfig(r=rank, lora_alpha=lora_alpha if lora_alpha is not None else rank, init_lora_weights=True,
                          target_modules=list(target_modules or default_targets))

    lora = copy.deepcopy(network).requires_grad_(False)
    device = next(lora.parameters()).device
    if kind == "lean":
        inject_adapter_in_model(config(LEAN_LORA_TARGETS), lora)
        camera = CameraEmbedding(camera_dim, network.config.emb_dim).to(device)
        lora.text_mlp = _TextPlusCamera(lora.text_mlp, camera, network.config.text_dim * network.config.text_slots)
    else:
        lora.add_adapter(config(DIFFUSERS_LORA_TARGETS))
        camera = CameraEmbedding(camera_dim, lora.time_embedding.linear_2.out_features).to(device)
        lora.class_embedding = camera  # diffusers adds class_embedding(class_labels) to the time embedding
    for name, param in lora.named_parameters():
        is_lora = "lora_" in name
        if is_lora and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()  # train adapters in float32 on a half-precision base (peft casts inputs)
        param.requires_grad_(is_lora)
    camera.requires_grad_(True)
    lora.eval()  # no dropout: the copy's predictions are deterministic, like the teacher's
    return LoraNetwork(lora, camera, kind, prediction_type)


def make_lora_optimizer(lora_network: LoraNetwork, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                        eps: float = 1e-15, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the LoRA and camera parameters only; defaults are threestudio's prolificdreamer.yaml
    (guidance lr 1e-4, betas (0.9, 0.99), eps 1e-15, AdamW's default weight decay)."""
    return torch.optim.AdamW(lora_network.trainable_parameters(), lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay)
