"""Two-object scenes of the world: 'a red cube on top of a blue sphere'.

A `Composition` places two single-object `Scene`s by a spatial relation, the three of T3Bench's
multiple-object set (He et al., arXiv:2310.02977) that a fixed layout can build:

- "X on top of Y": Y stands at the bottom, X rests on it (X's lowest point at Y's highest point);
- "X next to Y": side by side along y, the horizontal axis of the front camera (azimuth 0 looks
  along -x; objects face +x), X at -y, both standing on one ground plane;
- "X in front of Y": X nearer the front camera (larger x), Y behind it, both on one ground plane.

Each object is scaled by one factor (`OBJECT_SCALE`, smaller when the pair would not fit) so that
the pair lies inside the radius-0.8 sphere the renderers, the NeRF box and the cameras assume, and
the pair's bounding box is centred on the origin. A Composition exposes what a `Scene` does
(`parts`, `palette`, `caption`, `distance`, `sdf`), so `render_scene`, `ground_truth_mesh` and the
oracle teacher take it unchanged; `objects` gives each placed object for per-object scores.
It has no single main colour: `category` is "composition" and `color` the first object's colour,
and its parts carry their real colour names as roles (no MAIN role).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from . import sdf as S
from .scenes import COLORS, MAIN, Part, Scene, category_parts

RELATIONS = ("on top of", "next to", "in front of")
# Words of a prompt that name each relation (the prompt grammar's synonyms).
RELATION_WORDS: dict[str, str] = {
    "on top of": "on top of", "on the top of": "on top of", "on": "on top of", "atop": "on top of",
    "next to": "next to", "beside": "next to",
    "in front of": "in front of",
}
OBJECT_SCALE = 0.55  # each object's size in a pair, relative to its size alone
FIT_RADIUS = 0.78  # the pair stays inside this sphere (the world's objects fit in ~0.8)
GAP = 0.08  # space between side-by-side objects, in the objects' own (unscaled) units
COMPOSITION = "composition"


@functools.cache
def object_bounds(category: str, resolution: int = 96) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Axis-aligned bounds (lo, hi) of a category's solid, each (x, y, z), read off its SDF.

    Two grids: a coarse one over [-1, 1]^3 finds the box (points within half a cell diagonal of the
    solid, so that thin parts such as a lollipop's stick are not missed), a finer one over that box
    (plus two coarse cells) measures it; inside points (distance <= 0) give the bounds, widened by
    half a fine cell. Accurate to about half a fine cell (~0.007 for the world's objects)."""
    distance = lambda p: S.union(*(part.distance(p) for part in category_parts(category)))

    def inside_box(lo, hi, n, coarse):
        axes = [torch.linspace(float(a), float(b), n) for a, b in zip(lo, hi)]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        cell = (torch.as_tensor(hi) - torch.as_tensor(lo)) / (n - 1)
        level = float(cell.norm()) / 2 if coarse else 0.0
        inside = torch.cat([points[chunk][distance(points[chunk]) <= level]
                            for chunk in torch.arange(len(points)).split(1 << 18)])
        return inside.amin(0) - cell / 2, inside.amax(0) + cell / 2, cell

    with torch.no_grad():
        lo, hi, cell = inside_box((-1.0,) * 3, (1.0,) * 3, 48, coarse=True)
        lo, hi, _ = inside_box((lo - cell).tolist(), (hi + cell).tolist(), resolution, coarse=False)
    return tuple(lo.tolist()), tuple(hi.tolist())


def _placed_distance(distance, offset: tuple[float, float, float], factor: float, points: torch.Tensor) -> torch.Tensor:
    """A part scaled by `factor` about the origin, then moved by `offset`."""
    return S.scale(distance, S.translate(points, offset), factor)


@dataclass(frozen=True)
class PlacedObject:
    """One object of a composition: a `Scene` scaled by `factor` and moved by `offset`. It exposes
    what a Scene exposes for rendering (parts, palette, caption, distance, sdf), so it renders alone."""

    scene: Scene
    offset: tuple[float, float, float]
    factor: float

    @property
    def caption(self) -> str:
        return self.scene.caption

    @property
    def color(self) -> str:
        return self.scene.color

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(Part(part.name, part.role, functools.partial(_placed_distance, part.distance, self.offset, self.factor))
                     for part in self.scene.parts)

    @property
    def palette(self) -> torch.Tensor:
        return self.scene.palette

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned bounds (lo, hi) in world coordinates, each (3,)."""
        lo, hi = object_bounds(self.scene.category)
        offset = torch.tensor(self.offset)
        return torch.tensor(lo) * self.factor + offset, torch.tensor(hi) * self.factor + offset

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        return S.union(*(part.distance(points) for part in self.parts))

    def sdf(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return S.union_with_albedo([part.distance(points) for part in self.parts], self.palette.to(points))


@functools.cache
def _layout(first: Scene, relation: str, second: Scene) -> tuple[PlacedObject, PlacedObject]:
    """Where the two objects go: offsets in unscaled units from the relation, then one scale so that
    the pair's bounding box, centred on the origin, has its corners inside FIT_RADIUS."""
    lo = [torch.tensor(object_bounds(s.category)[0]) for s in (first, second)]
    hi = [torch.tensor(object_bounds(s.category)[1]) for s in (first, second)]
    offsets = [torch.zeros(3), torch.zeros(3)]
    if relation == "on top of":  # second on the ground, first resting on it
        offsets[1][2] = -lo[1][2]
        offsets[0][2] = hi[1][2] - lo[1][2] - lo[0][2]
    else:
        axis, sign = (1, -1.0) if relation == "next to" else (0, 1.0)  # first at -y / at +x
        for i in (0, 1):
            offsets[i][2] = -lo[i][2]  # both stand on z = 0
        # second's near face at GAP / 2 on its side of 0, first's at GAP / 2 on the other side
        if sign > 0:
            offsets[0][axis] = GAP / 2 - lo[0][axis]
            offsets[1][axis] = -GAP / 2 - hi[1][axis]
        else:
            offsets[0][axis] = -GAP / 2 - hi[0][axis]
            offsets[1][axis] = GAP / 2 - lo[1][axis]
    box_lo = torch.minimum(lo[0] + offsets[0], lo[1] + offsets[1])
    box_hi = torch.maximum(hi[0] + offsets[0], hi[1] + offsets[1])
    centre = (box_lo + box_hi) / 2
    half = (box_hi - box_lo) / 2
    factor = min(OBJECT_SCALE, FIT_RADIUS / float(half.norm()))
    return tuple(PlacedObject(scene, tuple(((offset - centre) * factor).tolist()), factor)
                 for scene, offset in zip((first, second), offsets))


@dataclass(frozen=True)
class Composition:
    """Two world objects in a spatial relation: Composition(Scene('cube', 'red'), 'on top of',
    Scene('sphere', 'blue')) is 'a red cube on top of a blue sphere'."""

    first: Scene
    relation: str
    second: Scene

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; known: {', '.join(RELATIONS)}")
        for scene in (self.first, self.second):
            if not isinstance(scene, Scene):
                raise ValueError(f"a composition relates two single objects (Scene), got {scene!r}")

    category = COMPOSITION  # no single category: callers that key on it see this name

    @property
    def color(self) -> str:
        """The first object's colour (a composition has no single main colour)."""
        return self.first.color

    @property
    def objects(self) -> tuple[PlacedObject, PlacedObject]:
        return _layout(self.first, self.relation, self.second)

    @property
    def parts(self) -> tuple[Part, ...]:
        """Both objects' parts, placed; MAIN roles replaced by each object's colour name."""
        return tuple(Part(part.name, obj.color if part.role == MAIN else part.role, part.distance)
                     for obj in self.objects for part in obj.parts)

    @property
    def part_objects(self) -> tuple[int, ...]:
        """For each part, the index (0: first, 1: second) of the object it belongs to."""
        return tuple(i for i, obj in enumerate(self.objects) for _ in obj.scene.parts)

    @property
    def palette(self) -> torch.Tensor:
        return torch.tensor([COLORS[part.role] for part in self.parts])

    @property
    def caption(self) -> str:
        return f"{self.first.caption} {self.relation} {self.second.caption}"

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        return S.union(*(part.distance(points) for part in self.parts))

    def sdf(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return S.union_with_albedo([part.distance(points) for part in self.parts], self.palette.to(points))

    def object_ids(self, points: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the object nearest each point (0: first, 1: second)."""
        return torch.stack([obj.distance(points) for obj in self.objects]).argmin(0)


# --- captions and training sets ----------------------------------------------------------------

# The relation phrases a caption is split at (`split_caption`): the canonical ones and the
# synonyms that cannot occur inside one object's phrase ('on' can: 'candy on a stick').
_SPLIT_RE = re.compile(r"\s(on top of|next to|in front of|atop|beside)\s")
# Relation words the paraphrases of a composition use, beside the canonical phrase.
_RELATION_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "on top of": ("atop",), "next to": ("beside",), "in front of": ("in front of",),
}


def split_caption(text: str) -> tuple[str, str, str] | None:
    """(first object's phrase, relation phrase, second object's phrase) of a two-object caption,
    None for a one-object caption. Purely textual (no resolution): it reads the captions the world
    writes ('a red cube on top of a blue sphere') and their paraphrases; a view suffix stays with
    the second phrase, so callers strip it first."""
    match = _SPLIT_RE.search(text)
    if match is None:
        return None
    first, second = text[:match.start()].strip(), text[match.end():].strip()
    if not first or not second:
        return None
    return first, match.group(1), second


def composition_phrasings(composition: Composition, count: int = 4) -> list[str]:
    """The canonical caption and `count - 1` paraphrases of a two-object scene: each object named
    by one of its own phrasings (`captions.paraphrases`, in turn), the relation by its phrase or a
    synonym ('atop', 'beside'). Deterministic in the composition."""
    from .captions import paraphrases

    first, second = (paraphrases(s.category, s.color) for s in (composition.first, composition.second))
    words = (composition.relation,) + _RELATION_PARAPHRASES[composition.relation]
    out = [composition.caption]
    for k in range(1, 4 * count):
        if len(out) >= count:
            break
        text = f"{first[k % len(first)]} {words[k % len(words)]} {second[(k * 7) % len(second)]}"
        if text not in out:
            out.append(text)
    return out


def training_compositions(count: int, seed: int = 0, include: tuple[Composition, ...] = ()) -> list[Composition]:
    """`include` and then random two-object scenes up to `count`, all distinct: each object any world
    scene whose (colour, primitive) pair is not held out (`held_out_combinations`), the relation any of
    RELATIONS, two different objects. Deterministic in (count, seed, include)."""
    from .scenes import all_scenes, held_out_combinations

    held = set(held_out_combinations())
    scenes = [s for s in all_scenes() if (s.color, s.category) not in held]
    out = list(dict.fromkeys(include))
    seen = set(out)
    gen = torch.Generator().manual_seed(seed)
    while len(out) < count:
        i, j, r = torch.randint(len(scenes), (1,), generator=gen).item(), torch.randint(len(scenes), (1,), generator=gen).item(), \
            torch.randint(len(RELATIONS), (1,), generator=gen).item()
        if i == j:
            continue
        composition = Composition(scenes[i], RELATIONS[r], scenes[j])
        if composition not in seen:
            seen.add(composition)
            out.append(composition)
    return out[:max(count, len(include))]
