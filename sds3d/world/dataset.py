"""Cached, deterministic datasets of world renders with labels and captions.

`world_renders(RenderSpec(...))` renders every scene of the world (or a given subset) from
random cameras, at twice the resolution then 2x2 average-pooled (antialiasing), and keeps the
images as uint8 (N, 3, R, R) with per-image labels: category, color and view indices (into
CATEGORIES, COLORS, VIEW_NAMES), elevation, azimuth, distance and fovy. The result is cached in
one compressed .npz under `$SDS3D_CACHE/world/` (default ~/.cache/sds3d/world/) keyed by the spec
and scene list, so a second call costs a file read. Same spec -> same images, bit for bit.

Splits: "train" excludes the (color, primitive) pairs of `held_out_combinations()` (what the
teacher may see), "held_out" is exactly those pairs, "all" is everything.

Captions: `CaptionTable` lists every phrasing of every scene with and without a view suffix
(the text vocabulary whose MiniLM embeddings training caches) and draws one per image:
a canonical caption with probability `canonical_prob`, otherwise any paraphrase; a view suffix
(", front view") with probability `view_prob`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_path
from ..geometry.views import VIEW_NAMES, view_name
from ..geometry.cameras import spherical_cameras
from .captions import bare_caption, captions, nouns, paraphrases, with_view
from .scenes import CATEGORIES, COLORS, DEFAULT_COLORS, Scene, all_scenes, held_out_combinations
from ..io import tuples_to_lists
from ..settings import dataclass_from_dict

DATASET_VERSION = 1  # bump when world rendering or this file's sampling changes
COLOR_NAMES = tuple(COLORS)


def default_cache_dir() -> Path:
    root = os.environ.get("SDS3D_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sds3d")
    return Path(root)


@dataclass(frozen=True)
class RenderSpec:
    """What to render. Camera ranges are those `sds3d generate` accepts by default (a superset of
    its fixed default distance 2.75 and fovy 45, so the teacher also knows the views a user may
    ask for); `overhead_fraction` of the cameras instead come from `overhead_elevation_range`
    (labelled 'overhead')."""

    resolution: int = 32
    views_per_scene: int = 256
    seed: int = 0
    supersample: int = 2
    elevation_range: tuple[float, float] = (-10.0, 60.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    distance_range: tuple[float, float] = (2.5, 3.0)
    fovy_range: tuple[float, float] = (40.0, 50.0)
    overhead_fraction: float = 0.0
    overhead_elevation_range: tuple[float, float] = (61.0, 89.0)

    def to_dict(self) -> dict:
        return tuples_to_lists(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "RenderSpec":
        return dataclass_from_dict(cls, data)


def is_held_out(category: str, color: str) -> bool:
    return (color, category) in set(held_out_combinations())


def scene_seed(seed: int, scene) -> int:
    """The camera seed of a scene (Scene) or two-object scene (Composition, keyed by its caption)."""
    text = (f"{DATASET_VERSION}/{seed}/{scene.category}/{scene.color}" if isinstance(scene, Scene)
            else f"{DATASET_VERSION}/{seed}/{scene.caption}")
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def scene_cameras(spec: RenderSpec, scene, resolution: int):
    """The spec's cameras for one scene (deterministic in spec.seed and the scene)."""
    gen = torch.Generator().manual_seed(scene_seed(spec.seed, scene))
    n = spec.views_per_scene
    u = lambda lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=gen)
    el, az, dist, fovy = u(spec.elevation_range), u(spec.azimuth_range), u(spec.distance_range), u(spec.fovy_range)
    overhead = torch.rand(n, generator=gen) < spec.overhead_fraction
    el = torch.where(overhead, u(spec.overhead_elevation_range), el)
    return spherical_cameras(el, az, dist, fovy, resolution)


class WorldRenders:
    """Images (N, 3, R, R) uint8 and per-image labels; see the module docstring."""

    FIELDS = ("category", "color", "view", "elevation", "azimuth", "distance", "fovy")

    def __init__(self, images: torch.Tensor, labels: dict[str, torch.Tensor], spec: RenderSpec):
        self.images = images
        self.spec = spec
        self.category = labels["category"].long()
        self.color = labels["color"].long()
        self.view = labels["view"].long()
        self.elevation = labels["elevation"].float()
        self.azimuth = labels["azimuth"].float()
        self.distance = labels["distance"].float()
        self.fovy = labels["fovy"].float()
        pairs = set(held_out_combinations())
        self.held_out = torch.tensor([(COLOR_NAMES[c], CATEGORIES[k]) in pairs
                                      for k, c in zip(self.category.tolist(), self.color.tolist())], dtype=torch.bool)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def indices(self, split: str = "all") -> torch.Tensor:
        """Image indices of a split: 'train' (no held-out pairs), 'held_out' or 'all'."""
        if split == "all":
            return torch.arange(len(self))
        if split == "train":
            return torch.nonzero(~self.held_out).squeeze(-1)
        if split == "held_out":
            return torch.nonzero(self.held_out).squeeze(-1)
        raise ValueError(f"unknown split {split!r}: allowed are 'train', 'held_out', 'all'")

    def float_images(self, index=None) -> torch.Tensor:
        """Images in [0, 1] (float32) for an index tensor/slice (all when None)."""
        images = self.images if index is None else self.images[index]
        return images.float() / 255.0

    def scene(self, i: int) -> Scene:
        return Scene(CATEGORIES[int(self.category[i])], COLOR_NAMES[int(self.color[i])])

    def labels(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def subset(self, index: torch.Tensor) -> "WorldRenders":
        return WorldRenders(self.images[index], {k: v[index] for k, v in self.labels().items()}, self.spec)


def _cache_path(spec: RenderSpec, scenes: list[Scene], cache_dir: Path) -> Path:
    key = json.dumps([DATASET_VERSION, spec.to_dict(), [(s.category, s.color) for s in scenes]], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / "world" / f"renders-{spec.resolution}px-{len(scenes)}x{spec.views_per_scene}-{digest}.npz"


def render_views(spec: RenderSpec, scene) -> tuple[torch.Tensor, object]:
    """One scene's (or composition's) images (V, 3, R, R) uint8 from the spec's cameras, rendered at
    resolution * supersample then average-pooled, and the cameras."""
    from .render import render_scene

    cams = scene_cameras(spec, scene, spec.resolution * spec.supersample)
    rgb = torch.cat([render_scene(scene, cams[i:i + 64])["rgb"] for i in range(0, cams.batch_size, 64)])
    if spec.supersample > 1:
        rgb = F.avg_pool2d(rgb, spec.supersample)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8), cams


def _view_labels(cams) -> dict[str, torch.Tensor]:
    return {"view": torch.tensor([VIEW_NAMES.index(view_name(e, a))
                                  for e, a in zip(cams.elevation_deg.tolist(), cams.azimuth_deg.tolist())]),
            "elevation": cams.elevation_deg, "azimuth": cams.azimuth_deg, "distance": cams.distance,
            "fovy": torch.rad2deg(cams.fovy)}


def render_dataset(spec: RenderSpec, scenes: list[Scene], progress: bool = False) -> WorldRenders:
    """Render (no cache). Rendering is at resolution * supersample, then average-pooled."""
    images, labels = [], {name: [] for name in WorldRenders.FIELDS}
    start = time.time()
    for n, scene in enumerate(scenes):
        rgb, cams = render_views(spec, scene)
        images.append(rgb)
        k = cams.batch_size
        labels["category"].append(torch.full((k,), CATEGORIES.index(scene.category)))
        labels["color"].append(torch.full((k,), COLOR_NAMES.index(scene.color)))
        for name, value in _view_labels(cams).items():
            labels[name].append(value)
        if progress and (n + 1) % 15 == 0:
            print(f"rendered {n + 1}/{len(scenes)} scenes ({time.time() - start:.0f} s)", flush=True)
    return WorldRenders(torch.cat(images), {k: torch.cat(v) for k, v in labels.items()}, spec)


def world_renders(spec: RenderSpec = RenderSpec(), scenes: list[Scene] | None = None, cache_dir: str | Path | None = None,
                  use_cache: bool = True, progress: bool = False) -> WorldRenders:
    """The renders of `spec` for `scenes` (default: every scene), from the disk cache when present."""
    scenes = list(scenes) if scenes is not None else all_scenes()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def make():
        renders = render_dataset(spec, scenes, progress)
        return renders.images, renders.labels()

    images, labels = _cached_renders(_cache_path(spec, scenes, cache_dir), WorldRenders.FIELDS, use_cache, make)
    return WorldRenders(images, labels, spec)


def _cached_renders(path: Path, fields: tuple[str, ...], use_cache: bool, make) -> tuple[torch.Tensor, dict]:
    """(images, labels by field) from the compressed .npz at `path`, else from `make()`, then saved there
    atomically; a damaged file is rebuilt. The one disk cache of `world_renders` and `composition_renders`."""
    if use_cache and path.exists():
        try:
            with np.load(path) as data:
                return torch.from_numpy(data["images"]), {name: torch.from_numpy(data[name]) for name in fields}
        except Exception:
            pass  # a damaged cache file is rebuilt below
    images, labels = make()
    if use_cache:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images.numpy(), **{name: labels[name].numpy() for name in fields})
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    return images, labels


class CompositionRenders:
    """Renders of two-object scenes: images (N, 3, R, R) uint8, `scene` (N,) the index of each
    image's composition in `compositions`, and the camera labels of `WorldRenders`."""

    FIELDS = ("scene", "view", "elevation", "azimuth", "distance", "fovy")

    def __init__(self, images: torch.Tensor, labels: dict[str, torch.Tensor], compositions: list, spec: RenderSpec):
        self.images, self.compositions, self.spec = images, list(compositions), spec
        self.scene = labels["scene"].long()
        self.view = labels["view"].long()
        for name in ("elevation", "azimuth", "distance", "fovy"):
            setattr(self, name, labels[name].float())

    def __len__(self) -> int:
        return self.images.shape[0]


def composition_renders(spec: RenderSpec, compositions: list, cache_dir: str | Path | None = None,
                        use_cache: bool = True, progress: bool = False) -> CompositionRenders:
    """The renders of `spec` (`views_per_scene` each) of two-object scenes, cached like `world_renders`
    (keyed by the spec and the compositions' captions)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = json.dumps([DATASET_VERSION, spec.to_dict(), [c.caption for c in compositions]], sort_keys=True)
    path = cache_dir / "world" / (f"compositions-{spec.resolution}px-{len(compositions)}x{spec.views_per_scene}-"
                                  f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")

    def make():
        images, labels = [], {name: [] for name in CompositionRenders.FIELDS}
        start = time.time()
        for n, composition in enumerate(compositions):
            rgb, cams = render_views(spec, composition)
            images.append(rgb)
            labels["scene"].append(torch.full((cams.batch_size,), n))
            for name, value in _view_labels(cams).items():
                labels[name].append(value)
            if progress and (n + 1) % 100 == 0:
                print(f"rendered {n + 1}/{len(compositions)} two-object scenes ({time.time() - start:.0f} s)", flush=True)
        return torch.cat(images), {k: torch.cat(v) for k, v in labels.items()}

    images, labels = _cached_renders(path, CompositionRenders.FIELDS, use_cache, make)
    return CompositionRenders(images, labels, compositions, spec)


# --- captions --------------------------------------------------------------------------------

def canonical_phrasings(category: str, color: str) -> list[str]:
    """What prompts/world.txt calls a scene: its caption, plus the bare name(s) in the default colour."""
    out = captions(category, color)
    if color == DEFAULT_COLORS.get(category) and bare_caption(category) not in out:
        out.append(bare_caption(category))
    return out


def scene_phrasings(category: str, color: str) -> list[str]:
    """Every phrasing of a scene, canonical ones first: paraphrases, and in the default colour
    the bare nouns ('a cube' is a gray cube, 'a ball' a gray sphere)."""
    out = canonical_phrasings(category, color) + paraphrases(category, color)
    if color == DEFAULT_COLORS.get(category):
        out += [bare_caption(noun) for noun in nouns(category)]
    return list(dict.fromkeys(out))


class CaptionTable:
    """All captions of a set of scenes (phrasings x {no suffix, 4 view suffixes}) and the rule
    that draws one per image. `texts[0]` is the empty caption (caption dropout / unconditional).
    A scene is a `Scene` or a two-object `Composition` (its phrasings: `composition_phrasings`)."""

    def __init__(self, scenes: list | None = None, canonical_prob: float = 0.5, view_prob: float = 0.75):
        from .compositions import composition_phrasings

        scenes = list(scenes) if scenes is not None else all_scenes()
        self.canonical_prob = canonical_prob
        self.view_prob = view_prob
        texts = [""]
        index: dict[str, int] = {"": 0}
        self._phrasings: dict[object, tuple[list[int], list[int]]] = {}  # scene -> (canonical, all) base indices

        def add(text: str) -> int:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            return index[text]

        self._suffixed: dict[tuple[int, int], int] = {}  # (base text index, view index) -> text index
        for scene in scenes:
            if isinstance(scene, Scene):
                all_ = scene_phrasings(scene.category, scene.color)
                canon = canonical_phrasings(scene.category, scene.color)
            else:
                all_ = composition_phrasings(scene)
                canon = all_[:1]
            ids = [add(t) for t in all_]
            for i, text in zip(ids, all_):
                for v, view in enumerate(VIEW_NAMES):
                    self._suffixed[(i, v)] = add(with_view(text, view))
            self._phrasings[scene] = ([index[t] for t in canon], ids)
        self.texts = texts
        self.index = index

    def __len__(self) -> int:
        return len(self.texts)

    def sample_scene(self, scene, view: int, generator: torch.Generator) -> int:
        """Index into `texts` of a random caption of one image of `scene` (4 draws from `generator`)."""
        canon, all_ = self._phrasings[scene]
        r = torch.rand(4, generator=generator).tolist()
        pool = canon if r[0] < self.canonical_prob else all_
        base = pool[min(int(r[1] * len(pool)), len(pool) - 1)]
        return self._suffixed[(base, int(view))] if r[2] < self.view_prob else base

    def sample(self, category: int, color: int, view: int, generator: torch.Generator) -> int:
        """`sample_scene` for the one-object scene of (category, colour) indices."""
        return self.sample_scene(Scene(CATEGORIES[int(category)], COLOR_NAMES[int(color)]), view, generator)


def caption_vocabulary(scenes: list[Scene] | None = None) -> list[str]:
    """Every caption `CaptionTable` can draw for these scenes ('' first)."""
    return CaptionTable(scenes).texts


def sample_caption(category: str, color: str, view: str | None, generator: torch.Generator,
                   canonical_prob: float = 0.5, view_prob: float = 0.75) -> str:
    """One random caption of a scene seen from `view` (text form of `CaptionTable.sample`)."""
    table = CaptionTable([Scene(category, color)], canonical_prob, view_prob)
    v = VIEW_NAMES.index(view) if view is not None else 0
    prob = view_prob if view is not None else 0.0
    table.view_prob = prob
    return table.texts[table.sample(CATEGORIES.index(category), COLOR_NAMES.index(color), v, generator)]
