"""The world classifier: a small CNN that names the category, colour and view of an image.

It scores generated images without any ground truth: prompt accuracy (does the image show the
category and colour its prompt asks for) and FD_world (Frechet distance between image sets in its
penultimate features, sds3d/eval/fd.py). Trained on world renders (sds3d.world.dataset) of every scene,
including the (color, primitive) pairs held out of teacher training, so it can judge those too.
Weights ship as sds3d/assets/classifier.safetensors with classifier.json (config + accuracy).
Training is in sds3d/training/classifier.py:

    python -m sds3d.training.classifier train     # minutes on one CPU thread; rewrites the shipped weights
    python -m sds3d.training.classifier evaluate  # accuracy of the shipped weights on fresh renders
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..geometry.views import VIEW_NAMES
from ..world.scenes import CATEGORIES, COLORS
from ..io import tuples_to_lists
from ..settings import dataclass_from_dict

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_PATH = ASSET_DIR / "classifier.safetensors"
CONFIG_PATH = ASSET_DIR / "classifier.json"
COLOR_NAMES = tuple(COLORS)


class ClassifierWeightsError(RuntimeError):
    """The classifier's weights are missing or unreadable; the message says which file and what to do."""


@dataclass
class ClassifierConfig:
    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128

    def to_dict(self) -> dict:
        return tuples_to_lists(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierConfig":
        return dataclass_from_dict(cls, data)


class WorldClassifier(nn.Module):
    """Images (B, 3, H, W) in [0, 1], any size (resized to `resolution` with antialiasing) ->
    logits for category (15), color (11) and view (4); `features` are the penultimate activations."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        layers, cin = [], 3
        for c in config.channels:
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, config.feature_dim)
        self.category_head = nn.Linear(config.feature_dim, len(CATEGORIES))
        self.color_head = nn.Linear(config.feature_dim, len(COLOR_NAMES))
        self.view_head = nn.Linear(config.feature_dim, len(VIEW_NAMES))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        r = self.config.resolution
        images = images.float()
        if images.shape[-1] != r or images.shape[-2] != r:
            images = F.interpolate(images, (r, r), mode="bilinear", align_corners=False, antialias=True)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images in [0, 1]."""
        h = self.body(self.prepare(images)).mean(dim=(2, 3))
        return F.relu(self.fc(h))

    def heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"category": self.category_head(features), "color": self.color_head(features),
                "view": self.view_head(features)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predicted indices {category, color, view} (B,) each, in eval mode."""
        was_training = self.training
        self.eval()
        out = {"category": [], "color": [], "view": []}
        for i in range(0, images.shape[0], batch_size):
            logits = self(images[i:i + batch_size])
            for k in out:
                out[k].append(logits[k].argmax(-1))
        self.train(was_training)
        return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in out.items()}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features of many images, in eval mode, batched."""
        was_training = self.training
        self.eval()
        feats = [self.features(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        self.train(was_training)
        return torch.cat(feats) if feats else torch.zeros(0, self.config.feature_dim)


# --- loading ---------------------------------------------------------------------------------

def load_classifier_from(weights: str | Path, config_path: str | Path | None = None) -> WorldClassifier:
    from safetensors.torch import load_file

    weights = Path(weights)
    config_path = Path(config_path) if config_path else weights.with_suffix(".json")
    if not weights.exists():
        raise ClassifierWeightsError(f"classifier weights {weights} not found: reinstall sds3d or retrain with "
                                     f"`python -m sds3d.eval.classifier train`")
    try:
        meta = json.loads(config_path.read_text()) if config_path.exists() else {}
        model = WorldClassifier(ClassifierConfig.from_dict(meta.get("config", {})))
        model.load_state_dict(load_file(str(weights)))
    except Exception as error:
        raise ClassifierWeightsError(f"classifier weights {weights} are unreadable or corrupted "
                                     f"({type(error).__name__}): reinstall sds3d or retrain with "
                                     f"`python -m sds3d.eval.classifier train`") from None
    return model.eval()


@functools.cache
def load_classifier() -> WorldClassifier:
    """The shipped classifier (loaded once per process, eval mode)."""
    return load_classifier_from(WEIGHTS_PATH, CONFIG_PATH)


# --- prompt accuracy -------------------------------------------------------------------------

def prompt_targets(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(category, color) indices that each prompt asks for (view suffixes ignored)."""
    from ..world.prompts import resolve_prompt

    scenes = [resolve_prompt(p) for p in prompts]
    return (torch.tensor([CATEGORIES.index(s.category) for s in scenes]),
            torch.tensor([COLOR_NAMES.index(s.color) for s in scenes]))


@torch.no_grad()
def prompt_accuracy(images: torch.Tensor, prompts: list[str], classifier: WorldClassifier | None = None) -> dict:
    """Share of images (B, 3, H, W) in [0, 1] whose predicted category / colour / both match
    their prompt (one prompt per image). Also returns per-image predictions."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompt_accuracy: {images.shape[0]} images but {len(prompts)} prompts")
    classifier = classifier or load_classifier()
    category, color = prompt_targets(prompts)
    pred = classifier.predict(images)
    ok_category = pred["category"] == category
    ok_color = pred["color"] == color
    return {
        "n": len(prompts),
        "category": float(ok_category.float().mean()) if prompts else float("nan"),
        "color": float(ok_color.float().mean()) if prompts else float("nan"),
        "both": float((ok_category & ok_color).float().mean()) if prompts else float("nan"),
        "predicted_category": [CATEGORIES[i] for i in pred["category"].tolist()],
        "predicted_color": [COLOR_NAMES[i] for i in pred["color"].tolist()],
    }


def _accuracy(model: WorldClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    pred = model.predict(images)
    return {k: float((pred[k] == labels[k]).float().mean()) for k in ("category", "color", "view")}


def evaluation_sets(seed: int = 2, views_per_scene: int = 32):
    """Fresh renders for evaluation: generate's camera ranges, a seed no training set uses."""
    from ..world.dataset import RenderSpec, world_renders

    return world_renders(RenderSpec(resolution=32, views_per_scene=views_per_scene, seed=seed))


def evaluate(model: WorldClassifier, renders) -> dict:
    """Accuracy on all renders and on the teacher's held-out (color, primitive) pairs."""
    labels = {"category": renders.category, "color": renders.color, "view": renders.view}
    held = renders.indices("held_out")
    return {"all": _accuracy(model, renders.float_images(), labels),
            "held_out_pairs": _accuracy(model, renders.float_images(held), {k: v[held] for k, v in labels.items()}),
            "n_all": len(renders), "n_held_out_pairs": int(held.numel())}


def is_held_out_prompt(prompt: str) -> bool:
    """Does the prompt name a (colour, primitive) pair that the embedded teacher never saw?"""
    from ..world.dataset import is_held_out
    from ..world.prompts import resolve_prompt

    scene = resolve_prompt(prompt)
    return is_held_out(scene.category, scene.color)


def score_samples(images: torch.Tensor, prompts: list[str]) -> dict:
    """Classifier prompt accuracy overall and on the held-out (color, primitive) pairs."""
    acc = prompt_accuracy(images, prompts)
    held = torch.tensor([is_held_out_prompt(p) for p in prompts])
    ok_cat = torch.tensor([c == s.category for c, s in zip(acc["predicted_category"], map(_resolve, prompts))])
    ok_col = torch.tensor([c == s.color for c, s in zip(acc["predicted_color"], map(_resolve, prompts))])
    out = {"n": acc["n"], "category": acc["category"], "color": acc["color"], "both": acc["both"]}
    for name, mask in (("held_out", held), ("seen", ~held)):
        if mask.any():
            out[f"{name}_category"] = float(ok_cat[mask].float().mean())
            out[f"{name}_color"] = float(ok_col[mask].float().mean())
            out[f"{name}_both"] = float((ok_cat & ok_col)[mask].float().mean())
        else:
            out[f"{name}_category"] = out[f"{name}_color"] = out[f"{name}_both"] = float("nan")
    return out


def _resolve(prompt: str):
    from ..world.prompts import resolve_prompt

    return resolve_prompt(prompt)
