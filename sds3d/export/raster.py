"""A small CPU triangle rasterizer (numpy): mesh renders for the mesh-vs-NeRF check, texels for baking.

Why our own: the maintained rasterizers need a GPU (nvdiffrast) or an OpenGL context (pyrender, through
EGL or OSMesa system libraries that a pip install does not bring); a page of numpy covers what export
needs (coverage, nearest face, perspective-correct barycentrics) with `geometry.cameras`' exact
conventions, at 128^2 views of a 20k-face mesh in a fraction of a second.

Conventions are `sds3d.geometry.cameras`': pixel (i, j) is row i (top to bottom), column j (left to
right), and its centre sits at x = j + 0.5, y = i + 0.5 in pixel coordinates. A pixel is covered by
a triangle when its centre is inside it (edge functions, as in Pineda 1988 / the OpenGL rasterization
rule without the tie-break: a centre exactly on a shared edge goes to either triangle).
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry.cameras import Camera
from ..geometry.shading import light_direction, shade_lambertian

NEAR = 1e-3  # camera-space depth below which a vertex counts as behind the camera


def rasterize(xy: np.ndarray, depth: np.ndarray | None, height: int, width: int,
              max_candidates: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each pixel centre, and where.

    xy (F, 3, 2): the triangles' corners in pixel coordinates (x right, y down). depth (F, 3): the
    corners' camera-space depths (the nearest triangle wins, depth interpolated as 1/z, which is
    linear in screen space), or None for a flat 2D layout (a UV atlas: triangles do not overlap;
    the lowest face index wins where they touch).
    Returns face (H, W) int64, -1 where no triangle covers the pixel, and bary (H, W, 3) float64,
    the perspective-correct barycentric coordinates of the pixel centre in its triangle.

    Every triangle's bounding box of pixel centres is enumerated, `max_candidates` pixels at a time.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n_faces = xy.shape[0]
    face_img = np.full(height * width, -1, dtype=np.int64)
    bary_img = np.zeros((height * width, 3))
    best = np.full(height * width, np.inf)
    if n_faces == 0:
        return face_img.reshape(height, width), bary_img.reshape(height, width, 3)
    a, b, c = xy[:, 0], xy[:, 1], xy[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    x0 = np.clip(np.ceil(xy[..., 0].min(1) - 0.5), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(xy[..., 0].max(1) - 0.5), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(xy[..., 1].min(1) - 0.5), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(xy[..., 1].max(1) - 0.5), -1, height - 1).astype(np.int64)
    nx, ny = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
    keep = (nx > 0) & (ny > 0) & (np.abs(area) > 1e-12)
    if depth is not None:
        depth = np.asarray(depth, dtype=np.float64)
        keep &= (depth > NEAR).all(1)
    faces = np.nonzero(keep)[0]
    counts = nx[faces] * ny[faces]
    # Chunks of faces whose boxes hold at most `max_candidates` pixels (a bigger face goes alone).
    ends = np.cumsum(counts)
    start = 0
    while start < len(faces):
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + max_candidates, "right")))
        _raster_chunk(faces[start:stop], counts[start:stop], xy, area, x0, y0, nx, depth, width,
                      face_img, bary_img, best)
        start = stop
    return face_img.reshape(height, width), bary_img.reshape(height, width, 3)


def _raster_chunk(faces, counts, xy, area, x0, y0, nx, depth, width, face_img, bary_img, best):
    """Rasterize `faces` into the flat buffers, keeping per pixel the nearest (or lowest-index) hit."""
    face_of = np.repeat(faces, counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = x0[face_of] + local % nx[face_of]
    py = y0[face_of] + local // nx[face_of]
    cx, cy = px + 0.5, py + 0.5
    tri = xy[face_of]  # (N, 3, 2)

    def edge(p, q):  # twice the signed area of (p, q, centre), divided by the face's: a barycentric
        return ((q[:, 0] - p[:, 0]) * (cy - p[:, 1]) - (q[:, 1] - p[:, 1]) * (cx - p[:, 0])) / area[face_of]

    w = np.stack([edge(tri[:, 1], tri[:, 2]), edge(tri[:, 2], tri[:, 0]), edge(tri[:, 0], tri[:, 1])], -1)
    inside = (w >= -1e-9).all(1)
    face_of, w, pixel = face_of[inside], w[inside], (py * width + px)[inside]
    if depth is not None:
        inv = w / depth[face_of]  # 1/z is linear in screen space; w_k / z_k normalised is perspective-correct
        inv_z = inv.sum(1)
        key = 1.0 / inv_z
        w = inv / inv_z[:, None]
    else:
        key = face_of.astype(np.float64)
    order = np.lexsort((key, pixel))
    pixel, key, face_of, w = pixel[order], key[order], face_of[order], w[order]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    pixel, key, face_of, w = pixel[first], key[first], face_of[first], w[first]
    better = key < best[pixel]
    pixel = pixel[better]
    best[pixel], face_img[pixel], bary_img[pixel] = key[better], face_of[better], w[better]


def project(vertices: np.ndarray, camera: Camera, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (V, 2) and camera-space depths (V,) of world points seen by camera `index`.

    The inverse of `geometry.cameras.camera_rays`: the ray through pixel coordinate (x, y) has
    camera-space direction ((x - W/2) / f, -(y - H/2) / f, -1), f = H / (2 tan(fovy / 2)).
    """
    c2w = camera.c2w[index].double().numpy()
    rot, eye = c2w[:3, :3], c2w[:3, 3]
    local = (np.asarray(vertices, dtype=np.float64) - eye) @ rot  # world -> camera (rot is orthonormal)
    depth = -local[:, 2]
    focal = 0.5 * camera.height / np.tan(0.5 * float(camera.fovy[index]))
    safe = np.where(np.abs(depth) > 1e-12, depth, 1e-12)
    x = local[:, 0] / safe * focal + 0.5 * camera.width
    y = -local[:, 1] / safe * focal + 0.5 * camera.height
    return np.stack([x, y], -1), depth


def sample_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Texture (H, W, C) at glTF texture coordinates uv (N, 2): origin at the image's top-left corner,
    u to the right, v down, texel centres at (j + 0.5) / W, (i + 0.5) / H; clamped at the borders."""
    h, w = texture.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0.0, w - 1.0)
    y = np.clip(uv[:, 1] * h - 0.5, 0.0, h - 1.0)
    j0, i0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    j1, i1 = np.minimum(j0 + 1, w - 1), np.minimum(i0 + 1, h - 1)
    fx, fy = (x - j0)[:, None], (y - i0)[:, None]
    tex = np.asarray(texture, dtype=np.float64)
    top = tex[i0, j0] * (1 - fx) + tex[i0, j1] * fx
    bottom = tex[i1, j0] * (1 - fx) + tex[i1, j1] * fx
    return top * (1 - fy) + bottom * fy


def render_mesh(vertices: np.ndarray, faces: np.ndarray, camera: Camera, uv: np.ndarray | None = None,
                texture: np.ndarray | None = None, vertex_colors: np.ndarray | None = None,
                background: float = 1.0, normals: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Renders of a mesh from every camera of the batch: unlit (albedo), as the NeRF's albedo
    renders, or with per-vertex `normals` (V, 3) Lambertian under the light the NeRF and the world
    are shaded with (`geometry.shading`), for pictures.

    Colour per pixel: the texture (H, W, 3) in [0, 1] at the interpolated glTF `uv` (V, 2) of the
    visible face, or the interpolated `vertex_colors` (V, 3) in [0, 1], or white. Returns "mask"
    (B, 1, H, W) in {0, 1} and "rgb" (B, 3, H, W) over `background`.
    """
    vertices, faces = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    masks, images = [], []
    for k in range(camera.batch_size):
        xy, depth = project(vertices, camera, k)
        face, bary = rasterize(xy[faces], depth[faces], camera.height, camera.width)
        covered = face >= 0
        rgb = np.full((camera.height, camera.width, 3), float(background))
        f, w = face[covered], bary[covered]
        corners = faces[f]  # (N, 3)
        if uv is not None and texture is not None:
            uv_pix = (np.asarray(uv, dtype=np.float64)[corners] * w[..., None]).sum(1)
            rgb[covered] = sample_bilinear(texture, uv_pix)[:, :3]
        elif vertex_colors is not None:
            rgb[covered] = (np.asarray(vertex_colors, dtype=np.float64)[corners, :3] * w[..., None]).sum(1)
        else:
            rgb[covered] = 1.0
        if normals is not None:
            n = (np.asarray(normals, dtype=np.float64)[corners] * w[..., None]).sum(1)
            n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
            light = light_direction(camera[k])
            rgb[covered] = shade_lambertian(torch.from_numpy(rgb[covered]), torch.from_numpy(n), light.double()).numpy()
        masks.append(covered.astype(np.float32)[None])
        images.append(rgb.transpose(2, 0, 1).astype(np.float32))
    return {"mask": torch.from_numpy(np.stack(masks)), "rgb": torch.from_numpy(np.stack(images))}
