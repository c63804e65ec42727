"""Pinhole cameras and rays shared by the NeRF renderer, the synthetic world's renderer, teachers and eval.

Conventions (the same everywhere, so that a world render and a NeRF render from the same
`Camera` line up pixel for pixel):

- World frame: right-handed, **z up**. Objects face **+x**: a camera at azimuth 0 sees an
  object's front.
- A camera at (elevation, azimuth, distance) in degrees sits at
  ``distance * (cos(el) cos(az), cos(el) sin(az), sin(el))`` and looks at the origin.
- Camera-to-world matrices follow OpenGL: camera x right, y up, looking along -z.
- Pixel (i, j) of an H x W image is row i (top to bottom), column j (left to right); rays go
  through pixel centres.
- View buckets (front/side/back/overhead) live in `views.py`, shading in `shading.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class Camera:
    """A batch of pinhole cameras: c2w (B, 4, 4), fovy (B,) in radians, one image size."""

    c2w: torch.Tensor
    fovy: torch.Tensor
    height: int
    width: int
    elevation_deg: torch.Tensor | None = None
    azimuth_deg: torch.Tensor | None = None
    distance: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.c2w.shape[0]

    def with_size(self, height: int, width: int | None = None) -> "Camera":
        """The same cameras at another image size (same field of view)."""
        return Camera(self.c2w, self.fovy, height, width or height, self.elevation_deg, self.azimuth_deg, self.distance)

    def __getitem__(self, index) -> "Camera":
        pick = lambda v: None if v is None else v[index : index + 1] if isinstance(index, int) else v[index]
        return Camera(pick(self.c2w), pick(self.fovy), self.height, self.width,
                      pick(self.elevation_deg), pick(self.azimuth_deg), pick(self.distance))



def concat_cameras(cameras: list[Camera]) -> Camera:
    """One batch of the cameras of several (all of one image size); an optional label (angles,
    distance) is kept only when every batch has it."""
    def cat(name):
        values = [getattr(c, name) for c in cameras]
        return None if any(v is None for v in values) else torch.cat(values)

    first = cameras[0]
    return Camera(cat("c2w"), cat("fovy"), first.height, first.width, cat("elevation_deg"), cat("azimuth_deg"),
                  cat("distance"))

def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """OpenGL camera-to-world matrices (B, 4, 4) for cameras at `eye` (B, 3) looking at `target`."""
    eye = eye.float()
    target = torch.zeros_like(eye) if target is None else target.expand_as(eye).float()
    up = torch.tensor([0.0, 0.0, 1.0]).expand_as(eye) if up is None else up.expand_as(eye).float()
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.cross(forward, up, dim=-1)
    # Straight above or below: any right vector perpendicular to forward will do.
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        right[degenerate] = torch.tensor([0.0, 1.0, 0.0])
    right = torch.nn.functional.normalize(right, dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def camera_directions(camera: Camera | torch.Tensor) -> torch.Tensor:
    """Unit vectors (B, 3) from the object (the origin) to each camera, from a Camera or its c2w
    (B, 4, 4); an all-zero c2w (a dropped camera) gives a zero vector."""
    c2w = camera.c2w if isinstance(camera, Camera) else camera
    return torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)


def unit_directions(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor) -> torch.Tensor:
    """(cos el cos az, cos el sin az, sin el): unit vectors (B, 3) toward cameras at these angles."""
    el_r, az_r = torch.deg2rad(elevation_deg.float()), torch.deg2rad(azimuth_deg.float())
    return torch.stack([torch.cos(el_r) * torch.cos(az_r), torch.cos(el_r) * torch.sin(az_r), torch.sin(el_r)], -1)


def spherical_cameras(elevation_deg, azimuth_deg, distance, fovy_deg, height: int, width: int | None = None) -> Camera:
    """Cameras on spheres around the origin, looking at it; arguments broadcast to one batch."""
    el, az, dist, fovy = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                                                   for v in (elevation_deg, azimuth_deg, distance, fovy_deg)))
    eye = unit_directions(el, az) * dist[:, None]
    return Camera(look_at(eye), torch.deg2rad(fovy), height, width or height, el, az, dist)


def sample_cameras(batch: int, height: int, elevation_range=(-10.0, 60.0), azimuth_range=(-180.0, 180.0),
                   distance_range=(2.5, 3.0), fovy_range=(40.0, 50.0), generator: torch.Generator | None = None,
                   width: int | None = None) -> Camera:
    """Random cameras, uniform in each range (elevation uniform in degrees, as threestudio does)."""
    def uniform(lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    return spherical_cameras(uniform(elevation_range), uniform(azimuth_range), uniform(distance_range),
                             uniform(fovy_range), height, width)


def orbit_cameras(n_views: int, height: int, elevation_deg: float = 15.0, distance: float = 2.75,
                  fovy_deg: float = 45.0, start_azimuth_deg: float = 0.0) -> Camera:
    """`n_views` cameras evenly spaced in azimuth: used for evaluation views and turntables."""
    azimuth = start_azimuth_deg + torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views)
    return spherical_cameras(elevation_deg, azimuth, distance, fovy_deg, height, height)


def camera_rays(camera: Camera, jitter: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions, each (B, H, W, 3), through pixel centres, or with `jitter`
    through a uniformly random point of each pixel: low-resolution renders are then antialiased
    in expectation over training steps, at no extra cost per step."""
    h, w, b = camera.height, camera.width, camera.batch_size
    focal = 0.5 * h / torch.tan(0.5 * camera.fovy)  # (B,) in pixels
    j = torch.arange(w, dtype=torch.float32)
    i = torch.arange(h, dtype=torch.float32)
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    if jitter:
        offsets = torch.rand((2, b, h, w), generator=generator)
        ii, jj = ii[None] + offsets[0], jj[None] + offsets[1]
    else:
        ii, jj = ii[None] + 0.5, jj[None] + 0.5
    x = (jj - 0.5 * w) / focal[:, None, None]
    y = -(ii - 0.5 * h) / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], -1)  # (B, H, W, 3)
    dirs = torch.einsum("bij,bhwj->bhwi", camera.c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = camera.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def ray_box_intersect(origins: torch.Tensor, dirs: torch.Tensor, radius: float = 1.0):
    """Entry and exit distances of rays through the axis-aligned box [-radius, radius]^3.

    Returns (t_near, t_far, hit); t_near is clamped at 0 and hit is False where the ray misses.
    """
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-radius - origins) * inv
    t1 = (radius - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far, t_far > t_near
