"""Volume rendering of a `NeRFField`: stratified samples in the scene box, occupancy-grid skipping,
nerfacc compositing, albedo / lambertian / textureless shading. The occupancy grids are in
`occupancy.py`; the losses on these renders live with the loop that uses them
(`sds3d.pipelines.regularizers`).

Samples are indexed in a dense (rays, samples) layout because nerfacc's batched functions are the
ones that run on CPU (its packed functions and estimators want CUDA). Empty space still costs
nothing in the field: `occupied_samples` drops the samples in unoccupied cells before the field is
evaluated (on the CPU with a C++ op that writes only the kept ones), the field runs on the kept
samples only, and compositing sees each ray's kept samples in a compact (rays, widest ray) layout.
A field on the fused CPU hash grid is composited by a C++ op instead (`hashgrid_cpp.composite`:
the same weights, shading and per-ray sums, one pass per ray), tested against these nerfacc ops.

On CUDA (a field on a GPU and nerfacc's CUDA extension usable; see `sds3d.nerf.backends`), the
pipeline holds a `CudaOccupancy` (nerfacc's `OccGridEstimator` behind `OccupancyGrid`'s interface)
and `render_image` renders with `render_rays_packed`: nerfacc marches the rays through the grid
(fixed step, empty cells and, with `early_stop_eps`, occluded samples skipped) and composites the
packed samples. Same output dict as `render_rays`, without "weights" (packed, not (R, S)).
"""

from __future__ import annotations

import torch

from ..geometry.cameras import Camera, camera_rays, ray_box_intersect
from ..geometry.shading import light_direction, shade_lambertian
from .occupancy import CudaOccupancy, OccupancyGrid

SHADINGS = ("albedo", "lambertian", "textureless")


def field_device(field) -> torch.device:
    """The device of the field's parameters (CPU for a field without any)."""
    params = getattr(field, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def stratified_samples(origins: torch.Tensor, dirs: torch.Tensor, num_samples: int, radius: float,
                       stratified: bool = True, generator: torch.Generator | None = None):
    """Equal intervals over each ray's chord through the box, one sample per interval.

    Returns t_starts, t_ends, t (R, S) (t is uniform in its interval, or its midpoint when not
    stratified) and hit (R,). Rays that miss the box get zero-length intervals.
    """
    t_near, t_far, hit = ray_box_intersect(origins, dirs, radius)
    t_far = torch.where(hit, t_far, t_near)
    edges = torch.linspace(0.0, 1.0, num_samples + 1, device=origins.device)
    edges = t_near[:, None] + (t_far - t_near)[:, None] * edges
    t_starts, t_ends = edges[:, :-1], edges[:, 1:]
    if stratified:  # drawn on the generator's device (a CPU generator serves CUDA rays too)
        u = torch.rand(t_starts.shape, generator=generator,
                       device=origins.device if generator is None else generator.device).to(origins.device)
    else:
        u = torch.full_like(t_starts, 0.5)
    return t_starts, t_ends, t_starts + u * (t_ends - t_starts), hit


def occupied_samples(origins: torch.Tensor, dirs: torch.Tensor, num_samples: int, radius: float,
                     occupancy: OccupancyGrid | None = None, stratified: bool = True,
                     generator: torch.Generator | None = None, fused: bool = False) -> tuple[torch.Tensor, ...]:
    """The samples of `stratified_samples` that can hold density: on rays that hit the box and, given
    an occupancy grid, in its occupied cells. Returns index (N,), the kept samples' flat indices in
    the dense (rays, samples) layout in row-major order, and their t_starts, t_ends, t (N,) and
    points (N, 3).

    fused: the C++ op (`hashgrid_cpp.occupied_samples`) instead of these torch ops, for an
    `OccupancyGrid` on the CPU. It draws the same offsets from `generator` and computes the same
    float32 operations in the same order, so the samples are bit-identical (tests/test_hashgrid_cpp.py);
    it writes only the kept samples (about a tenth) where the torch ops pass over all of them a
    dozen times.
    """
    if fused:
        from . import hashgrid_cpp

        if not isinstance(occupancy, OccupancyGrid):
            raise ValueError("occupied_samples(fused=True) needs an OccupancyGrid (the torch ops take none)")

        u = None
        if stratified:
            u = torch.rand((origins.shape[0], num_samples), generator=generator)
        lin = torch.linspace(0.0, 1.0, num_samples + 1)
        return hashgrid_cpp.occupied_samples(origins, dirs, u, lin, radius, occupancy.mask, occupancy.radius,
                                             occupancy.cell_size)
    t_starts, t_ends, t, hit = stratified_samples(origins, dirs, num_samples, radius, stratified, generator)
    positions = origins[:, None, :] + dirs[:, None, :] * t[..., None]  # (R, S, 3)
    keep = hit[:, None].expand(origins.shape[0], num_samples)
    if occupancy is not None:
        keep = keep & occupancy.occupied(positions)
    index = keep.reshape(-1).nonzero().squeeze(1)
    return (index, t_starts.reshape(-1)[index], t_ends.reshape(-1)[index], t.reshape(-1)[index],
            positions.reshape(-1, 3)[index])


def _fused_sampling(field, origins: torch.Tensor, dirs: torch.Tensor, occupancy) -> bool:
    """Whether `occupied_samples` runs fused: a field on the fused CPU hash grid (backend "cpp"; the
    "torch" backend keeps every op in torch), float32 CPU rays without a gradient, an `OccupancyGrid`
    whose cells an int32 indexes (the kernel's; at most 1290 a side)."""
    encoding = getattr(field, "encoding", None)
    return (getattr(encoding, "backend", None) == "cpp" and isinstance(occupancy, OccupancyGrid)
            and origins.device.type == "cpu" and origins.dtype == torch.float32 and dirs.dtype == torch.float32
            and occupancy.mask.device.type == "cpu" and occupancy.resolution ** 3 < 2 ** 31
            and not (torch.is_grad_enabled() and (origins.requires_grad or dirs.requires_grad)))


def _fused_compositing(field, out: dict[str, torch.Tensor], rays: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether `render_rays` composites with the C++ op: a field on the fused CPU hash grid (backend
    "cpp", as `_fused_sampling`) that gave float32 CPU outputs, and rays (origins, dirs, light) that
    need no gradient (the op differentiates the field's outputs only)."""
    encoding = getattr(field, "encoding", None)
    return (getattr(encoding, "backend", None) == "cpp"
            and all(v.device.type == "cpu" and v.dtype == torch.float32 for v in out.values())
            and not (torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in rays)))


def _scatter(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Dense (size, ...) tensor with `values` at `index` and zeros elsewhere (differentiable)."""
    return values.new_zeros((size,) + values.shape[1:]).index_copy(0, index, values)


def transmittance_before(sigmas: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor) -> torch.Tensor:
    """T_i = exp(-sum_{j<i} sigma_j delta_j), the light reaching each sample (R, S) from the camera."""
    optical = sigmas * (t_ends - t_starts)
    return torch.exp(-(torch.cumsum(optical, dim=-1) - optical))


def render_rays(field, origins: torch.Tensor, dirs: torch.Tensor, num_samples: int = 64,
                occupancy: OccupancyGrid | None = None, shading: str = "albedo", light: torch.Tensor | None = None,
                background=1.0, generator: torch.Generator | None = None, stratified: bool = True,
                need_normals: bool = False, ambient: float = 0.5, early_stop_eps: float = 0.0,
                fused_sampling: bool = True, fused_compositing: bool = True) -> dict[str, torch.Tensor]:
    """Volume-render rays (R, 3) through `field` (radius from `field.radius`).

    shading: "albedo" (colour = albedo), "lambertian" (albedo * (ambient + (1 - ambient) n.l)),
    "textureless" (the same with a white albedo); the last two need normals. light (R, 3) points to
    the light; None means a headlight (-dirs). background: scalar, (3,) or (R, 3).
    Returns rgb (R, 3), opacity (R, 1), depth (R, 1), albedo (R, 3), weights (R, S), and when normals
    were computed normal (R, 3) (the weighted sum of unit normals) and backfacing (R, 1).

    early_stop_eps > 0 drops samples whose transmittance T is below it (nerfacc's `early_stop_eps`,
    Instant-NGP's early ray termination): a cheap density-only pass without gradients finds T at
    every kept sample, then the full field (albedo, normals, autograd) runs only where T > eps.
    Such a sample changes the colour and every gradient by at most T, so the image moves by less
    than eps per ray, while the samples hidden behind an opaque surface, often most of them, cost
    nothing.

    fused_sampling: `occupied_samples` runs its C++ op (the same samples, bit for bit) where
    `_fused_sampling` says it applies (a field on the fused CPU grid); False keeps the torch ops.
    fused_compositing: the same for the compositing (`hashgrid_cpp.composite`: the same function,
    tested against these nerfacc and torch ops, which it replaces by one pass per ray).
    """
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    with_normals = need_normals or shading != "albedo"
    n_rays = origins.shape[0]
    fused = fused_sampling and _fused_sampling(field, origins, dirs, occupancy)
    index, starts, ends, t, points = occupied_samples(origins, dirs, num_samples, getattr(field, "radius", 1.0),
                                                      occupancy, stratified, generator, fused)
    # On a GPU the compact layout is num_samples wide (a bound known on the host) instead of the
    # widest ray's count, whose read-back would stall the device twice a render; on the CPU the
    # exact width is the cheaper layout (and the read costs nothing).
    width_bound = None if index.device.type == "cpu" else num_samples
    if early_stop_eps > 0 and index.numel() > 0:
        with torch.no_grad():
            rays, slot, width = compact_samples(index, num_samples, width_bound)
            sigmas = _gather_compact(field.density(points), slot, len(rays), width)
            transmittance = transmittance_before(sigmas, _gather_compact(starts, slot, len(rays), width),
                                                 _gather_compact(ends, slot, len(rays), width))
            visible = transmittance.reshape(-1)[slot] > early_stop_eps
            index, starts, ends, t, points = index[visible], starts[visible], ends[visible], t[visible], points[visible]
    # The field runs on kept samples only (even none: the graph to its parameters stays intact).
    out = field(points, with_normals=with_normals)
    if fused_compositing and _fused_compositing(field, out, (origins, dirs, light)):
        return _composite_fused(out, index, starts, ends, t, origins, dirs, num_samples, shading, light, background,
                                ambient, with_normals)

    if shading == "albedo":
        colors = out["albedo"]
    else:
        light = -dirs if light is None else light
        base = out["albedo"] if shading == "lambertian" else torch.ones_like(out["albedo"])
        colors = shade_lambertian(base, out["normal"], light[index // num_samples], ambient)

    from nerfacc.volrend import accumulate_along_rays, render_weight_from_density  # slow import: lazy

    # Composite in the compact layout: only rays with a kept sample, only their kept samples.
    rays, slot, width = compact_samples(index, num_samples, width_bound)
    m = len(rays)

    def compact(values):
        return _gather_compact(values, slot, m, width)

    def to_all_rays(values):  # (m, C) -> (R, C), zeros for rays without samples
        return values.new_zeros((n_rays,) + values.shape[1:]).index_copy(0, rays, values)

    weights, _, _ = render_weight_from_density(compact(starts), compact(ends), compact(out["density"]))
    opacity = accumulate_along_rays(weights, None)
    rgb = to_all_rays(accumulate_along_rays(weights, compact(colors)))
    t_mid = compact(t)
    depth = accumulate_along_rays(weights, t_mid[..., None])
    background = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
    result = {
        "rgb": rgb + (1.0 - to_all_rays(opacity)) * background,
        "opacity": to_all_rays(opacity),
        "depth": to_all_rays(depth),
        "z_variance": to_all_rays(depth_variance(weights, t_mid, depth, opacity)),
        "albedo": to_all_rays(accumulate_along_rays(weights, compact(out["albedo"]))),
        "weights": _scatter(weights.reshape(-1)[slot], index, n_rays * num_samples).view(n_rays, num_samples),
    }
    if with_normals:
        normals = compact(out["normal"])
        result["normal"] = to_all_rays(accumulate_along_rays(weights, normals))
        result["backfacing"] = to_all_rays(backfacing(weights, normals, dirs[rays]))
    return result


def _composite_fused(out: dict[str, torch.Tensor], index: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                     t: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, num_samples: int, shading: str,
                     light: torch.Tensor | None, background, ambient: float,
                     with_normals: bool) -> dict[str, torch.Tensor]:
    """`render_rays`' result from the field's outputs at the kept samples, composited by the C++ op."""
    from . import hashgrid_cpp

    n_rays = origins.shape[0]
    offsets = hashgrid_cpp.ray_offsets(index, num_samples, n_rays)
    if shading != "albedo" and light is None:
        light = -dirs
    rgb, opacity, depth, z_variance, albedo, normal, backfacing, weights = hashgrid_cpp.composite(
        offsets, starts, ends, t, out["density"], out["albedo"], out["normal"] if with_normals else None,
        light if shading != "albedo" else None, dirs if with_normals else None, shading, ambient)
    opacity, depth, z_variance = opacity[:, None], depth[:, None], z_variance[:, None]
    background = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
    result = {
        "rgb": rgb + (1.0 - opacity) * background,
        "opacity": opacity,
        "depth": depth,
        "z_variance": z_variance,
        "albedo": albedo,
        "weights": _scatter(weights, index, n_rays * num_samples).view(n_rays, num_samples),
    }
    if with_normals:
        result["normal"] = normal
        result["backfacing"] = backfacing
    return result


def compact_samples(index: torch.Tensor, num_samples: int,
                    width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The compact (rays with samples) x (their samples) layout of kept samples.

    `index` (N,) are kept samples of a dense (R, S) layout in row-major order. Returns `rays` (M,),
    the rays holding at least one, `slot` (N,), each sample's position in an (M, width) layout
    where a ray's samples come first, in order, and `width`, the most samples any ray keeps (or the
    `width` given, an upper bound of it such as S, which saves reading the maximum back from the
    device). Padding slots get zero-length intervals and zero density, so compositing there is
    exact, at a fraction of the dense layout's cost when most samples are empty space (the usual case).
    """
    ray_of = torch.div(index, num_samples, rounding_mode="floor")
    rays, row, counts = torch.unique_consecutive(ray_of, return_inverse=True, return_counts=True)
    if index.numel() == 0:
        return rays, row, 1
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(index.numel(), device=index.device) - starts[row]
    if width is None:
        width = int(counts.max())
    return rays, row * width + rank, width


def _gather_compact(values: torch.Tensor, slot: torch.Tensor, m: int, width: int) -> torch.Tensor:
    """Values (N, ...) of kept samples -> (m, width, ...) with zeros in the padding (differentiable)."""
    return _scatter(values, slot, m * width).view(m, width, *values.shape[1:])


def render_rays_packed(field, origins: torch.Tensor, dirs: torch.Tensor, num_samples: int = 64,
                       occupancy: CudaOccupancy | None = None, shading: str = "albedo",
                       light: torch.Tensor | None = None, background=1.0, generator: torch.Generator | None = None,
                       stratified: bool = True, need_normals: bool = False, ambient: float = 0.5,
                       early_stop_eps: float = 0.0, alpha_thre: float = 0.0) -> dict[str, torch.Tensor]:
    """`render_rays` on CUDA with nerfacc's packed samples (same arguments and outputs, no "weights").

    `occupancy.estimator` (nerfacc's OccGridEstimator) marches each ray through the occupied cells of
    the box with step `occupancy.render_step_size(num_samples)`, the dense renderer's spacing for a
    ray crossing the box face to face, at most a cell (stratified: a random offset per ray); with early_stop_eps > 0 or alpha_thre > 0 a density pass without gradients drops samples
    whose transmittance is below early_stop_eps (or whose alpha is below alpha_thre). The field
    then runs once on the packed samples, and weights and per-ray sums come from nerfacc's
    `render_weight_from_density` / `accumulate_along_rays` with `ray_indices`. Depth is sum(w t)
    (not divided by the opacity), as in `render_rays`. `generator` is unused (nerfacc draws from
    the global CUDA generator).
    """
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    if occupancy is None or not hasattr(occupancy, "estimator"):
        raise ValueError("render_rays_packed needs a CudaOccupancy (nerfacc's OccGridEstimator)")
    from nerfacc.volrend import accumulate_along_rays, render_weight_from_density  # slow import: lazy

    with_normals = need_normals or shading != "albedo"
    n_rays = origins.shape[0]
    origins, dirs = origins.contiguous(), dirs.contiguous()

    def sigma_fn(t_starts, t_ends, ray_indices):
        t_mid = (t_starts + t_ends)[:, None] * 0.5
        return field.density(origins[ray_indices] + dirs[ray_indices] * t_mid)

    ray_indices, t_starts, t_ends = occupancy.estimator.sampling(
        origins, dirs, sigma_fn=sigma_fn if (early_stop_eps > 0 or alpha_thre > 0) else None,
        render_step_size=occupancy.render_step_size(num_samples), stratified=stratified,
        early_stop_eps=early_stop_eps, alpha_thre=alpha_thre)
    ray_indices = ray_indices.long()
    t_mid = (t_starts + t_ends) * 0.5
    # The field runs on the packed samples (even none: the graph to its parameters stays intact).
    out = field(origins[ray_indices] + dirs[ray_indices] * t_mid[:, None], with_normals=with_normals)

    if shading == "albedo":
        colors = out["albedo"]
    else:
        light = -dirs if light is None else light
        base = out["albedo"] if shading == "lambertian" else torch.ones_like(out["albedo"])
        colors = shade_lambertian(base, out["normal"], light[ray_indices], ambient)

    if t_starts.numel() > 0:
        weights, _, _ = render_weight_from_density(t_starts, t_ends, out["density"], ray_indices=ray_indices,
                                                   n_rays=n_rays)
    else:  # no sample on any ray: skip nerfacc's scans (no empty CUDA launches)
        weights = out["density"] * 0.0

    def accumulate(values):
        return accumulate_along_rays(weights, values, ray_indices=ray_indices, n_rays=n_rays)

    opacity = accumulate(None)
    rgb = accumulate(colors)
    background = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
    result = {
        "rgb": rgb + (1.0 - opacity) * background,
        "opacity": opacity,
        "depth": accumulate(t_mid[:, None]),
        "albedo": accumulate(out["albedo"]),
    }
    mean_depth = result["depth"] / opacity.clamp_min(1e-6)
    result["z_variance"] = accumulate((t_mid[:, None] - mean_depth[ray_indices]) ** 2)
    if with_normals:
        result["normal"] = accumulate(out["normal"])
        # DreamFusion's orientation term (see `backfacing`), per packed sample then per ray.
        cos = (out["normal"] * dirs[ray_indices]).sum(-1)
        result["backfacing"] = accumulate_along_rays(weights.detach(), (cos.clamp_min(0.0) ** 2)[:, None],
                                                     ray_indices=ray_indices, n_rays=n_rays)[:, 0]
    return result


def render_image(field, camera: Camera, chunk: int | None = None, light: torch.Tensor | None = None,
                 background=1.0, jitter: bool = False, **kwargs) -> dict[str, torch.Tensor]:
    """Render every pixel of `camera`: a dict of (B, C, H, W) images (weights: C = samples; not packed).

    light (B, 3) defaults to `light_direction(camera)`, the rule the synthetic world renders with.
    background: scalar, (3,), (B, 3) or (B, 3, H, W). `chunk` bounds the rays per field call.
    jitter: rays through random points of their pixels (drawn from kwargs' `generator`).
    Rays go to the field's device; with a `CudaOccupancy` on a CUDA field they are rendered by
    `render_rays_packed` (nerfacc's estimator), otherwise by `render_rays`.
    """
    b, h, w = camera.batch_size, camera.height, camera.width
    device = field_device(field)
    origins, dirs = (v.reshape(-1, 3).to(device) for v in camera_rays(camera, jitter, kwargs.get("generator")))
    needs_light = kwargs.get("shading", "albedo") != "albedo"
    if light is None and needs_light:
        light = light_direction(camera)
    if light is not None:
        light = light.to(device)[:, None, :].expand(b, h * w, 3).reshape(-1, 3)
    background = torch.as_tensor(background, dtype=torch.float32, device=origins.device)
    if background.dim() == 4:
        background = background.permute(0, 2, 3, 1).reshape(-1, 3)
    elif background.dim() == 2:
        background = background[:, None, :].expand(b, h * w, 3).reshape(-1, 3)

    packed = getattr(kwargs.get("occupancy"), "packed", False) and device.type == "cuda"
    render = render_rays_packed if packed else render_rays
    if packed:
        kwargs.pop("fused_sampling", None)  # nerfacc's estimator samples there and its packed ops composite
        kwargs.pop("fused_compositing", None)
    chunk = chunk or origins.shape[0]
    parts = []
    for start in range(0, origins.shape[0], chunk):
        sl = slice(start, start + chunk)
        parts.append(render(field, origins[sl], dirs[sl], light=None if light is None else light[sl],
                            background=background[sl] if background.dim() == 2 else background, **kwargs))
    images = {}
    for key in parts[0]:
        v = torch.cat([p[key] for p in parts])
        v = v.reshape(b, h, w, -1)
        images[key] = v.permute(0, 3, 1, 2)
    return images


def depth_variance(weights: torch.Tensor, t: torch.Tensor, depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Per ray sum_i w_i (t_i - z)^2 with z = depth / opacity, the weighted mean sample distance.

    HiFA's z-variance (threestudio's `lambda_z_variance`): small when a ray's weight sits on a thin
    shell, so penalising it turns a soft, fog-like density into a surface that every view sees at
    the same place. Shapes: weights and t (R, S), depth and opacity (R, 1) -> (R, 1).
    """
    mean = depth / opacity.clamp_min(1e-6)
    return (weights * (t - mean) ** 2).sum(-1, keepdim=True)


def backfacing(weights: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Per ray sum_i stop_grad(w_i) max(0, n_i . d)^2: how much visible surface faces away from the
    camera (d is the ray direction, camera -> scene). DreamFusion's orientation penalty is its mean
    (`sds3d.pipelines.regularizers.orientation_loss`); the weights are detached as in DreamFusion /
    threestudio, so the penalty moves normals, not opacity.
    Shapes: weights (R, S), normals (R, S, 3), dirs (R, 3) -> (R,).
    """
    cos = (normals * dirs[:, None, :]).sum(-1)
    return (weights.detach() * cos.clamp_min(0.0) ** 2).sum(-1)
