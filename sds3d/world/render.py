"""Ground-truth renders of world scenes by sphere tracing their SDFs.

Uses the shared camera conventions of `sds3d.geometry` (same rays, same light, same
Lambertian rule as the NeRF), so a world render and a NeRF render from one `Camera` line up
pixel for pixel. Tracing is batched over every ray of every camera; each step evaluates
the SDF only at rays still marching, and only inside the ray's interval through [-1, 1]^3.
"""

from __future__ import annotations

import torch

from ..geometry.cameras import Camera, camera_rays, ray_box_intersect
from ..geometry.shading import light_direction, shade_lambertian

from .scenes import Scene

SCENE_BOX_RADIUS = 1.0  # every scene lies inside [-1, 1]^3
HIT_EPSILON = 1e-4  # a ray has hit when the distance drops below this
GRAZING_EPSILON = 1e-2  # rays out of steps this close to the surface count as hits
NORMAL_EPSILON = 1e-3  # central-difference step for normals


def sphere_trace(distance_fn, origins: torch.Tensor, dirs: torch.Tensor, max_steps: int = 64,
                 box_radius: float = SCENE_BOX_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray distances to the first surface, and hit flags, for rays (N, 3).

    March from where the ray enters the box by the SDF value (safe because the distances
    are exact or conservative), dropping rays as they converge or leave the box.
    """
    t_near, t_far, in_box = ray_box_intersect(origins, dirs, box_radius)
    t = t_near.clone()
    hit = torch.zeros_like(in_box)
    active = torch.nonzero(in_box).squeeze(-1)
    last = torch.full_like(t, float("inf"))
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        t_active = t[active]
        d = distance_fn(origins[active] + t_active[:, None] * dirs[active])
        last[active] = d
        converged = d < HIT_EPSILON
        hit[active[converged]] = True
        t_next = t_active + d.clamp_min(0.0)
        t[active] = torch.where(converged, t_active, t_next)
        active = active[~converged & (t_next <= t_far[active])]
    # Rays that ran out of steps skimming the surface (silhouette edges) still count.
    if active.numel() > 0:
        grazing = last[active] < GRAZING_EPSILON
        hit[active[grazing]] = True
    return t, hit


def estimate_normals(distance_fn, points: torch.Tensor, eps: float = NORMAL_EPSILON) -> torch.Tensor:
    """Unit outward normals (N, 3) by central differences of the SDF (one batched call)."""
    offsets = torch.eye(3, dtype=points.dtype) * eps
    probes = torch.cat([points[None] + offsets[:, None], points[None] - offsets[:, None]], 0)  # (6, N, 3)
    d = distance_fn(probes.reshape(-1, 3)).reshape(2, 3, -1)
    grad = (d[0] - d[1]).T  # (N, 3)
    return torch.nn.functional.normalize(grad, dim=-1)


def _with_angles(camera: Camera) -> Camera:
    """`light_direction` needs elevation/azimuth; recover them from c2w if absent."""
    if camera.elevation_deg is not None and camera.azimuth_deg is not None:
        return camera
    eye = camera.c2w[:, :3, 3]
    el = torch.rad2deg(torch.asin((eye[:, 2] / eye.norm(dim=-1).clamp_min(1e-9)).clamp(-1.0, 1.0)))
    az = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
    return Camera(camera.c2w, camera.fovy, camera.height, camera.width, el, az, eye.norm(dim=-1))


@torch.no_grad()
def render_scene(scene: Scene, camera: Camera, ambient: float = 0.5, background=1.0,
                 max_steps: int = 64) -> dict[str, torch.Tensor]:
    """Render a scene from a batch of cameras.

    Returns float32 images, batch first, channels second:
      rgb (B,3,H,W): Lambertian shading under `light_direction(camera)`, over the background,
      albedo (B,3,H,W): surface colour over the background,
      mask (B,1,H,W): 1 where a ray hits the object, else 0,
      depth (B,1,H,W): distance along the ray to the hit (0 on misses),
      normal (B,3,H,W): world-space unit normals (0 on misses).
    `background` is a float or an RGB triple.
    """
    camera = _with_angles(camera)
    b, h, w = camera.batch_size, camera.height, camera.width
    origins, dirs = camera_rays(camera)
    origins, dirs = origins.reshape(-1, 3).float(), dirs.reshape(-1, 3).float()
    t, hit = sphere_trace(scene.distance, origins, dirs, max_steps)

    n = origins.shape[0]
    albedo = torch.zeros(n, 3)
    normal = torch.zeros(n, 3)
    depth = torch.zeros(n)
    idx = torch.nonzero(hit).squeeze(-1)
    if idx.numel() > 0:
        points = origins[idx] + t[idx, None] * dirs[idx]
        albedo[idx] = scene.sdf(points)[1]
        normal[idx] = estimate_normals(scene.distance, points)
        depth[idx] = t[idx]

    albedo = albedo.reshape(b, h, w, 3)
    normal = normal.reshape(b, h, w, 3)
    mask = hit.reshape(b, h, w, 1).float()
    shaded = shade_lambertian(albedo, normal, light_direction(camera).float(), ambient)
    bg = torch.as_tensor(background, dtype=torch.float32).expand(3)
    rgb = (shaded * mask + bg * (1.0 - mask)).clamp(0.0, 1.0)
    albedo_img = (albedo * mask + bg * (1.0 - mask)).clamp(0.0, 1.0)

    to_bchw = lambda x: x.permute(0, 3, 1, 2).contiguous()
    return {
        "rgb": to_bchw(rgb),
        "albedo": to_bchw(albedo_img),
        "mask": to_bchw(mask),
        "depth": depth.reshape(b, 1, h, w),
        "normal": to_bchw(normal),
    }
