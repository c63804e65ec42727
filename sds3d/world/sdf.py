"""Signed distance functions on points (N, 3), in torch.

Every primitive returns an exact Euclidean signed distance (negative inside), so that a
sphere tracer may step by the returned value without overshooting. The combinators keep
that property as a bound: `union` is exact outside and conservative inside, `intersect`
and `subtract` are conservative (never larger than the true distance, Lipschitz <= 1).

Shapes are placed by moving the *query points* into the shape's local frame:
``sphere(translate(p, (0, 0, 0.5)), 0.2)`` is a sphere centred at z = 0.5, and
``cone(rotate_y(p, 90), r, h)`` is a cone whose axis (+z locally) points along +x.
Most formulas follow Inigo Quilez's reference list of distance functions.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor
DistanceFn = Callable[[Tensor], Tensor]


def _length2(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


# --- primitives -----------------------------------------------------------------------------

def sphere(points: Tensor, radius: float) -> Tensor:
    """Sphere centred at the origin."""
    return points.norm(dim=-1) - radius


def box(points: Tensor, half_size: Sequence[float], rounding: float = 0.0) -> Tensor:
    """Axis-aligned box with half extents `half_size`; `rounding` rounds its edges inward
    (the outer extents stay `half_size`)."""
    half = torch.as_tensor(half_size, dtype=points.dtype, device=points.device)
    q = points.abs() - (half - rounding)
    outside = q.clamp_min(0.0).norm(dim=-1)
    inside = q.amax(dim=-1).clamp_max(0.0)
    return outside + inside - rounding


def cylinder(points: Tensor, radius: float, half_height: float) -> Tensor:
    """Capped cylinder around the z axis, z in [-half_height, half_height]."""
    dr = points[..., :2].norm(dim=-1) - radius
    dz = points[..., 2].abs() - half_height
    return torch.maximum(dr, dz).clamp_max(0.0) + _length2(dr.clamp_min(0.0), dz.clamp_min(0.0))


def capped_cone(points: Tensor, half_height: float, radius_bottom: float, radius_top: float) -> Tensor:
    """Truncated cone around the z axis, z in [-half_height, half_height], with the given
    radii at the bottom and top faces (either may be 0)."""
    h, r1, r2 = half_height, radius_bottom, radius_top
    qx = points[..., :2].norm(dim=-1)
    qy = points[..., 2]
    # Distance to the flat caps (ca) and to the slanted side segment (cb), in the (r, z) plane.
    cap_radius = torch.where(qy < 0.0, torch.full_like(qy, r1), torch.full_like(qy, r2))
    ca_x = qx - torch.minimum(qx, cap_radius)
    ca_y = qy.abs() - h
    k1x, k1y = r2, h
    k2x, k2y = r2 - r1, 2.0 * h
    k2_len2 = k2x * k2x + k2y * k2y
    s = (((k1x - qx) * k2x + (k1y - qy) * k2y) / k2_len2).clamp(0.0, 1.0)
    cb_x = qx - k1x + k2x * s
    cb_y = qy - k1y + k2y * s
    sign = torch.where((cb_x < 0.0) & (ca_y < 0.0), -1.0, 1.0)
    return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def cone(points: Tensor, radius: float, height: float) -> Tensor:
    """Solid cone around the z axis: base disk of `radius` at z = 0, apex at z = `height`."""
    shifted = points - points.new_tensor([0.0, 0.0, 0.5 * height])
    return capped_cone(shifted, 0.5 * height, radius, 0.0)


def torus(points: Tensor, major_radius: float, minor_radius: float) -> Tensor:
    """Torus lying in the xy plane (around the z axis)."""
    ring = points[..., :2].norm(dim=-1) - major_radius
    return _length2(ring, points[..., 2]) - minor_radius


def _unit_pyramid(points: Tensor, height: float) -> Tensor:
    """Pyramid with a 1 x 1 square base centred at the origin in z = 0 and apex at z = height."""
    m2 = height * height + 0.25
    px, pz = points[..., 0].abs(), points[..., 1].abs()  # base-plane coordinates
    py = points[..., 2]  # height coordinate
    swap = pz > px
    px, pz = torch.where(swap, pz, px), torch.where(swap, px, pz)
    px, pz = px - 0.5, pz - 0.5
    qx = pz
    qy = height * py - 0.5 * px
    qz = height * px + 0.5 * py
    s = (-qx).clamp_min(0.0)
    t = ((qy - 0.5 * pz) / (m2 + 0.25)).clamp(0.0, 1.0)
    a = m2 * (qx + s) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0.0, torch.zeros_like(a), torch.minimum(a, b))
    lateral = torch.sqrt((d2 + qz * qz) / m2) * torch.sign(torch.maximum(qz, -py))
    # Quilez's formula measures the slanted faces only: below the base plane the nearest
    # point lies on the base square, and inside the base may be nearer than any face.
    base_xy = (points[..., :2].abs() - 0.5).clamp_min(0.0).norm(dim=-1)
    below = _length2(base_xy, py)
    inside = torch.maximum(lateral, -py)
    return torch.where(py < 0.0, below, torch.where(lateral < 0.0, inside, lateral))


def pyramid(points: Tensor, half_base: float, height: float) -> Tensor:
    """Square pyramid: base [-half_base, half_base]^2 at z = 0, apex at z = `height`."""
    size = 2.0 * half_base
    return _unit_pyramid(points / size, height / size) * size


def capsule(points: Tensor, radius: float, half_length: float) -> Tensor:
    """Capsule around the z axis: the segment z in [-half_length, half_length] thickened by `radius`."""
    z = points[..., 2].clamp(-half_length, half_length)
    axis_point = torch.stack([torch.zeros_like(z), torch.zeros_like(z), z], dim=-1)
    return (points - axis_point).norm(dim=-1) - radius


# --- placement (act on query points) ---------------------------------------------------------

def translate(points: Tensor, offset: Sequence[float]) -> Tensor:
    """Local-frame points of a shape moved by `offset`."""
    return points - points.new_tensor(offset)


def _rotate(points: Tensor, degrees: float, a: int, b: int) -> Tensor:
    # Rotating the shape by +angle in the (a, b) plane = rotating the points by -angle.
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    out = points.clone()
    out[..., a] = c * points[..., a] + s * points[..., b]
    out[..., b] = -s * points[..., a] + c * points[..., b]
    return out


def rotate_z(points: Tensor, degrees: float) -> Tensor:
    """Local-frame points of a shape rotated by `degrees` about +z (x towards y)."""
    return _rotate(points, degrees, 0, 1)


def rotate_y(points: Tensor, degrees: float) -> Tensor:
    """Local-frame points of a shape rotated by `degrees` about +y (z towards x):
    `rotate_y(p, 90)` turns a shape's +z axis into +x."""
    return _rotate(points, degrees, 2, 0)


def rotate_x(points: Tensor, degrees: float) -> Tensor:
    """Local-frame points of a shape rotated by `degrees` about +x (y towards z):
    `rotate_x(p, -90)` turns a shape's +z axis into +y."""
    return _rotate(points, degrees, 1, 2)


def scale(distance: DistanceFn, points: Tensor, factor: float) -> Tensor:
    """Distance to a shape uniformly scaled by `factor` (uniform scaling keeps distances exact)."""
    return distance(points / factor) * factor


# --- combination ---------------------------------------------------------------------------

def union(*distances: Tensor) -> Tensor:
    """Union of shapes: the minimum distance."""
    out = distances[0]
    for d in distances[1:]:
        out = torch.minimum(out, d)
    return out


def intersect(*distances: Tensor) -> Tensor:
    """Intersection of shapes (a conservative distance bound)."""
    out = distances[0]
    for d in distances[1:]:
        out = torch.maximum(out, d)
    return out


def subtract(distance: Tensor, removed: Tensor) -> Tensor:
    """`distance`'s shape minus `removed`'s shape (a conservative distance bound)."""
    return torch.maximum(distance, -removed)


def union_with_albedo(distances: Sequence[Tensor], albedos: Tensor) -> tuple[Tensor, Tensor]:
    """Union of K parts with distances (K of (N,)) and one colour each (K, 3): the minimum
    distance and the colour of the nearest part, (N,) and (N, 3)."""
    stacked = torch.stack(list(distances), dim=0)
    distance, nearest = stacked.min(dim=0)
    return distance, albedos[nearest]
