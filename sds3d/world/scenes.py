"""The objects of the procedural world: primitives and composites, each in a named colour.

A `Scene` is just (category, colour name); its geometry is a fixed list of parts, each a
distance function and a colour role ("main", which the prompt sets, or a fixed accent
colour). Objects face +x (a camera at azimuth 0 sees the snowman's nose and the house's
door), stand with z up, are centred on the origin and fit inside a sphere of radius ~0.8, so
the whole world lives comfortably inside the box [-1, 1]^3 that the renderers trace.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import sdf as S

PRIMITIVES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule")
COMPOSITES = ("snowman", "house", "mushroom", "pine tree", "table", "lollipop", "dumbbell", "rocket")
CATEGORIES = PRIMITIVES + COMPOSITES

# Black and white stay off 0 and 1 so that a white object differs from the white background
# and a black one still shows its shading.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.95, 0.50, 0.08),
    "yellow": (0.95, 0.85, 0.15),
    "green": (0.20, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.55, 0.20, 0.70),
    "pink": (0.95, 0.55, 0.70),
    "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08),
    "brown": (0.50, 0.30, 0.12),
    "gray": (0.50, 0.50, 0.50),
}

# The main colour of a category when the prompt names none ("a snowman" is white).
DEFAULT_COLORS: dict[str, str] = {
    **{name: "gray" for name in PRIMITIVES},
    "snowman": "white",
    "house": "yellow",
    "mushroom": "red",
    "pine tree": "green",
    "table": "brown",
    "lollipop": "red",
    "dumbbell": "black",
    "rocket": "white",
}

MAIN = "main"  # colour role of the parts that the prompt's colour paints


@dataclass(frozen=True)
class Part:
    """One piece of an object: a distance function on points (N, 3) and a colour role
    (MAIN, or the name of a fixed accent colour in COLORS)."""

    name: str
    role: str
    distance: Callable[[torch.Tensor], torch.Tensor]


# --- geometry of each category ------------------------------------------------------------

def _primitive_parts(category: str) -> tuple[Part, ...]:
    # Sizes chosen so that every primitive reaches ~0.6-0.75 from the origin.
    shapes = {
        "sphere": lambda p: S.sphere(p, 0.6),
        "cube": lambda p: S.box(p, (0.45, 0.45, 0.45)),
        "cylinder": lambda p: S.cylinder(p, 0.4, 0.5),
        "cone": lambda p: S.cone(S.translate(p, (0.0, 0.0, -0.5)), 0.5, 1.0),
        "torus": lambda p: S.torus(p, 0.45, 0.18),
        "pyramid": lambda p: S.pyramid(S.translate(p, (0.0, 0.0, -0.4)), 0.45, 0.8),
        "capsule": lambda p: S.capsule(p, 0.3, 0.35),
    }
    return (Part(category, MAIN, shapes[category]),)


def _snowman_parts() -> tuple[Part, ...]:
    head_z = 0.44
    parts = [
        Part("bottom", MAIN, lambda p: S.sphere(S.translate(p, (0.0, 0.0, -0.38)), 0.34)),
        Part("middle", MAIN, lambda p: S.sphere(S.translate(p, (0.0, 0.0, 0.08)), 0.25)),
        Part("head", MAIN, lambda p: S.sphere(S.translate(p, (0.0, 0.0, head_z)), 0.18)),
        # Carrot nose: a cone whose axis is turned from +z to +x, base buried in the head.
        Part("nose", "orange", lambda p: S.cone(S.rotate_y(S.translate(p, (0.12, 0.0, head_z - 0.01)), 90.0), 0.05, 0.28)),
    ]
    for side in (-1.0, 1.0):
        parts.append(Part("eye", "black", lambda p, y=0.07 * side: S.sphere(S.translate(p, (0.152, y, head_z + 0.07)), 0.035)))
    for z in (0.16, 0.06, -0.04):
        x = (0.25 ** 2 - (z - 0.08) ** 2) ** 0.5
        parts.append(Part("button", "black", lambda p, x=x, z=z: S.sphere(S.translate(p, (x, 0.0, z)), 0.035)))
    return tuple(parts)


def _house_parts() -> tuple[Part, ...]:
    return (
        Part("walls", MAIN, lambda p: S.box(S.translate(p, (0.0, 0.0, -0.2)), (0.42, 0.42, 0.3))),
        Part("roof", "red", lambda p: S.pyramid(S.translate(p, (0.0, 0.0, 0.1)), 0.52, 0.45)),
        Part("door", "black", lambda p: S.box(S.translate(p, (0.42, 0.0, -0.33)), (0.025, 0.1, 0.17))),
        Part("chimney", "red", lambda p: S.box(S.translate(p, (-0.05, 0.25, 0.4)), (0.06, 0.06, 0.15))),
    )


def _mushroom_parts() -> tuple[Part, ...]:
    cap_centre, cap_radius, cut_z = -0.05, 0.6, 0.0
    parts = [
        # Cap: the part of a sphere above a horizontal plane.
        Part("cap", MAIN, lambda p: S.intersect(S.sphere(S.translate(p, (0.0, 0.0, cap_centre)), cap_radius), cut_z - p[..., 2])),
        Part("stem", "white", lambda p: S.cylinder(S.translate(p, (0.0, 0.0, -0.3)), 0.16, 0.32)),
    ]
    # White spots sitting on the cap surface, one facing the front.
    for el, az in ((55.0, 0.0), (40.0, 60.0), (40.0, 150.0), (45.0, 230.0), (35.0, 300.0), (80.0, 0.0)):
        e, a = torch.deg2rad(torch.tensor(el)), torch.deg2rad(torch.tensor(az))
        centre = (float(cap_radius * torch.cos(e) * torch.cos(a)), float(cap_radius * torch.cos(e) * torch.sin(a)),
                  float(cap_centre + cap_radius * torch.sin(e)))
        parts.append(Part("spot", "white", lambda p, c=centre: S.sphere(S.translate(p, c), 0.08)))
    return tuple(parts)


def _pine_tree_parts() -> tuple[Part, ...]:
    return (
        Part("trunk", "brown", lambda p: S.cylinder(S.translate(p, (0.0, 0.0, -0.5)), 0.1, 0.2)),
        Part("tier", MAIN, lambda p: S.cone(S.translate(p, (0.0, 0.0, -0.35)), 0.5, 0.6)),
        Part("tier", MAIN, lambda p: S.cone(S.translate(p, (0.0, 0.0, -0.05)), 0.4, 0.5)),
        Part("tier", MAIN, lambda p: S.cone(S.translate(p, (0.0, 0.0, 0.25)), 0.3, 0.45)),
    )


def _table_parts() -> tuple[Part, ...]:
    parts = [Part("top", MAIN, lambda p: S.box(S.translate(p, (0.0, 0.0, 0.22)), (0.55, 0.4, 0.04), rounding=0.01))]
    for x in (-0.47, 0.47):
        for y in (-0.32, 0.32):
            parts.append(Part("leg", MAIN, lambda p, x=x, y=y: S.cylinder(S.translate(p, (x, y, -0.14)), 0.04, 0.33)))
    return tuple(parts)


def _lollipop_parts() -> tuple[Part, ...]:
    return (
        # Candy: a disk facing the front (its axis turned from +z to +x).
        Part("candy", MAIN, lambda p: S.cylinder(S.rotate_y(S.translate(p, (0.0, 0.0, 0.3)), 90.0), 0.33, 0.07)),
        Part("swirl", "white", lambda p: S.torus(S.rotate_y(S.translate(p, (0.07, 0.0, 0.3)), 90.0), 0.17, 0.025)),
        Part("stick", "white", lambda p: S.capsule(S.translate(p, (0.0, 0.0, -0.3)), 0.03, 0.38)),
    )


def _dumbbell_parts() -> tuple[Part, ...]:
    # Lying along y, so that the front view shows both weights.
    parts = [Part("handle", "gray", lambda p: S.capsule(S.rotate_x(p, -90.0), 0.06, 0.5))]
    for y in (-0.45, 0.45):
        parts.append(Part("weight", MAIN, lambda p, y=y: S.cylinder(S.rotate_x(S.translate(p, (0.0, y, 0.0)), -90.0), 0.28, 0.1)))
    return tuple(parts)


def _rocket_parts() -> tuple[Part, ...]:
    parts = [
        Part("body", MAIN, lambda p: S.cylinder(S.translate(p, (0.0, 0.0, -0.05)), 0.18, 0.3)),
        Part("nose", "red", lambda p: S.cone(S.translate(p, (0.0, 0.0, 0.25)), 0.18, 0.4)),
        Part("window", "blue", lambda p: S.cylinder(S.rotate_y(S.translate(p, (0.17, 0.0, 0.08)), 90.0), 0.07, 0.025)),
        Part("nozzle", "gray", lambda p: S.capped_cone(S.translate(p, (0.0, 0.0, -0.42)), 0.08, 0.13, 0.09)),
    ]
    for az in (45.0, 135.0, 225.0, 315.0):
        parts.append(Part("fin", "red", lambda p, az=az: S.box(S.translate(S.rotate_z(p, az), (0.24, 0.0, -0.28)), (0.1, 0.015, 0.12))))
    return tuple(parts)


_COMPOSITE_PARTS = {
    "snowman": _snowman_parts,
    "house": _house_parts,
    "mushroom": _mushroom_parts,
    "pine tree": _pine_tree_parts,
    "table": _table_parts,
    "lollipop": _lollipop_parts,
    "dumbbell": _dumbbell_parts,
    "rocket": _rocket_parts,
}


@functools.cache
def category_parts(category: str) -> tuple[Part, ...]:
    """The parts of a category (independent of its colour)."""
    if category in PRIMITIVES:
        return _primitive_parts(category)
    if category in _COMPOSITE_PARTS:
        return _COMPOSITE_PARTS[category]()
    raise KeyError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


# --- scenes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scene:
    """One object of the world: a category painted in a main colour."""

    category: str
    color: str

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; known: {', '.join(CATEGORIES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; known: {', '.join(COLORS)}")

    @property
    def parts(self) -> tuple[Part, ...]:
        return category_parts(self.category)

    @property
    def palette(self) -> torch.Tensor:
        """Colour of each part (K, 3)."""
        return torch.tensor([COLORS[self.color if part.role == MAIN else part.role] for part in self.parts])

    @property
    def caption(self) -> str:
        from .captions import caption

        return caption(self.category, self.color)

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance (N,) only: what sphere tracing needs, without the colour lookup."""
        return S.union(*(part.distance(points) for part in self.parts))

    def sdf(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed distance (N,) and albedo (N, 3) = colour of the nearest part, at points (N, 3)."""
        return S.union_with_albedo([part.distance(points) for part in self.parts], self.palette.to(points))


def make_scene(category: str, color: str | None = None) -> Scene:
    """The scene for a category in a colour (the category's default colour when None)."""
    return Scene(category, DEFAULT_COLORS[category] if color is None and category in DEFAULT_COLORS else color)


def all_scenes() -> list[Scene]:
    """Every category in every colour, in a fixed order."""
    return [Scene(category, color) for category in CATEGORIES for color in COLORS]


def held_out_combinations() -> list[tuple[str, str]]:
    """(color, primitive) pairs kept out of teacher training, ~10% of them.

    Fixed rule, no randomness: pair (color i, primitive j) is held out when
    (3 i + j) % 10 == 0. That picks 8 of the 77 pairs, on a diagonal stride, so that every
    colour and every primitive is still seen in training with other partners.
    """
    return [(color, primitive)
            for i, color in enumerate(COLORS) for j, primitive in enumerate(PRIMITIVES)
            if (3 * i + j) % 10 == 0]
