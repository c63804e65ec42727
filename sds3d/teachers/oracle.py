"""The oracle teacher: the exact denoiser of a finite set of world renders.

For data {y_i} and x_t = sqrt(abar) y + sqrt(1 - abar) eps, the ideal denoiser is the posterior mean

    E[y | x_t] = sum_i softmax_i(-|x_t - sqrt(abar) y_i|^2 / (2 (1 - abar))) y_i,

so this teacher is a perfect diffusion model of its data, with no training. The conditional data
of "a red cube, front view" are renders of the red cube from cameras in the front bucket; the
unconditional data are all the renders the teacher holds (every bank it has built plus a fixed
random sample of other scenes), so classifier-free guidance works as usual. It is the reference
teacher of the tests and of `--teacher oracle`.

Camera conditioning (`camera_sigma_deg` > 0, as MVDream / Zero-1-to-3 condition on the camera):
each image y_i also carries the direction d_i of the camera that rendered it, and the data
distribution given a render's camera direction c weights it by a von Mises-Fisher prior,
p(i | c) ~ exp(kappa d_i . c) with kappa = 1 / sigma^2, so that

    E[y | x_t, c] = sum_i softmax_i(kappa d_i . c - |x_t - sqrt(abar) y_i|^2 / (2 (1 - abar))) y_i.

A text view suffix alone ("front view": 90 degrees of azimuth) leaves a rotationally symmetric
object such as a snowman free to show its face at any azimuth of the bucket, so targets for
front-only details land at a different place at every step; conditioning on the camera removes
that ambiguity (the snowman end-to-end test in tests/test_generate.py measures the face).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..geometry.views import OVERHEAD_ELEVATION_DEG, FRONT_HALF_ANGLE_DEG
from ..geometry.cameras import Camera, camera_directions, spherical_cameras
from ..diffusion.protocol import Cond, cfg_combine, model_to_pixels, pixels_to_model
from ..diffusion.schedule import NoiseSchedule

ORACLE_VERSION = 2  # bump when world rendering changes, to invalidate disk caches


def default_cache_dir() -> Path:
    root = os.environ.get("SDS3D_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sds3d")
    return Path(root)


def bucket_cameras(view: str, count: int, resolution: int, elevation_range, distance_range, fovy_range,
                   generator: torch.Generator) -> Camera:
    """Random cameras whose view bucket is `view`, inside the given camera ranges."""
    lo_el, hi_el = elevation_range
    u = lambda: torch.rand(count, generator=generator)
    if view == "overhead":
        el = max(lo_el, OVERHEAD_ELEVATION_DEG) + (max(hi_el, OVERHEAD_ELEVATION_DEG + 20.0) - max(lo_el, OVERHEAD_ELEVATION_DEG)) * u()
        az = -180.0 + 360.0 * u()
    else:
        hi = min(hi_el, OVERHEAD_ELEVATION_DEG)
        el = lo_el + (hi - lo_el) * u()
        if view == "front":
            az = -FRONT_HALF_ANGLE_DEG + 2 * FRONT_HALF_ANGLE_DEG * u()
        elif view == "back":
            az = 180.0 - FRONT_HALF_ANGLE_DEG + 2 * FRONT_HALF_ANGLE_DEG * u()
        elif view == "side":
            sign = torch.where(u() < 0.5, -1.0, 1.0)
            az = sign * (FRONT_HALF_ANGLE_DEG + (180.0 - 2 * FRONT_HALF_ANGLE_DEG) * u())
        else:
            raise ValueError(f"unknown view {view!r}: allowed are 'front', 'side', 'back', 'overhead'")
    dist = distance_range[0] + (distance_range[1] - distance_range[0]) * u()
    fovy = fovy_range[0] + (fovy_range[1] - fovy_range[0]) * u()
    return spherical_cameras(el, az, dist, fovy, resolution)


class OracleTeacher:
    """Exact posterior-mean denoiser over banks of world renders (pixel space, [-1, 1])."""

    prediction_type = "epsilon"
    channels = 3
    dtype = torch.float32
    device = torch.device("cpu")
    network = None

    def __init__(self, resolution: int = 64, views_per_bucket: int = 64, n_uncond: int = 256, seed: int = 0,
                 elevation_range=(-10.0, 60.0), distance_range=(2.5, 3.0), fovy_range=(40.0, 50.0),
                 supersample: int = 2, cache_dir: str | Path | None = None, use_disk_cache: bool = True,
                 camera_sigma_deg: float = 0.0):
        self.resolution = resolution
        self.camera_sigma_deg = float(camera_sigma_deg)
        self.views_per_bucket = views_per_bucket
        self.n_uncond = n_uncond
        self.seed = seed
        self.elevation_range = tuple(elevation_range)
        self.distance_range = tuple(distance_range)
        self.fovy_range = tuple(fovy_range)
        self.supersample = supersample
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "oracle"
        self.use_disk_cache = use_disk_cache
        self.schedule = NoiseSchedule.linear()
        self._banks: dict[str, torch.Tensor] = {}  # "a red cube, front view" -> renders
        self._prompt_keys: dict[str, str] = {}  # any accepted prompt -> its bank key
        self._random_bank: torch.Tensor | None = None
        self._bank_dirs: dict[str, torch.Tensor] = {}  # bank key -> (K, 3) unit camera directions
        self._random_dirs: torch.Tensor | None = None

    # -- data ---------------------------------------------------------------------------------
    def _cache_key(self, *parts) -> str:
        text = repr((ORACLE_VERSION, self.resolution, self.supersample, self.seed, self.elevation_range,
                     self.distance_range, self.fovy_range) + parts)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def _cached(self, key: str, make) -> torch.Tensor:
        path = self.cache_dir / f"{key}.pt"
        if self.use_disk_cache and path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:
                pass  # a damaged cache file is rebuilt below
        images = make()
        if self.use_disk_cache:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(images, tmp)
            os.replace(tmp, path)
        return images

    def _render(self, scene, camera: Camera) -> torch.Tensor:
        """Premultiplied colour and coverage (K, 4, R, R): any background can be put behind it later."""
        from ..world.render import render_scene

        hi = camera.with_size(self.resolution * self.supersample)
        out = render_scene(scene, hi, background=0.0)
        rgba = torch.cat([out["rgb"], out["mask"]], 1)
        if self.supersample > 1:
            rgba = F.avg_pool2d(rgba, self.supersample)
        return rgba.clamp(0, 1)

    @classmethod
    def from_banks(cls, banks: dict[str, torch.Tensor], extra_uncond: torch.Tensor | None = None,
                   directions: dict[str, torch.Tensor] | None = None, extra_directions: torch.Tensor | None = None,
                   camera_sigma_deg: float = 0.0) -> "OracleTeacher":
        """An oracle over given opaque images (K, 3, R, R) in [-1, 1] per prompt, not over world renders;
        `directions` (K, 3 per prompt) and `extra_directions` give their cameras for camera conditioning."""
        def opaque(images):
            return torch.cat([(images + 1) / 2, torch.ones_like(images[:, :1])], 1)

        first = next(iter(banks.values()))
        teacher = cls(resolution=first.shape[-1], n_uncond=0, use_disk_cache=False, camera_sigma_deg=camera_sigma_deg)
        teacher._banks = {k: opaque(v) for k, v in banks.items()}
        teacher._random_bank = opaque(extra_uncond if extra_uncond is not None else first[:0])
        if directions is not None:
            teacher._bank_dirs = {k: F.normalize(d.float(), dim=-1) for k, d in directions.items()}
            teacher._random_dirs = F.normalize(extra_directions.float(), dim=-1) if extra_directions is not None \
                else torch.zeros(0, 3)
        return teacher

    def bank(self, scene, view: str) -> torch.Tensor:
        """Renders (K, 4, R, R) of `scene` from cameras in the `view` bucket: premultiplied RGB and coverage."""
        from ..world.captions import with_view

        key = with_view(scene.caption, view)
        if key not in self._banks:
            seed_text = f"{self.seed}/{scene.caption}/{view}"
            gen = torch.Generator().manual_seed(int(hashlib.sha1(seed_text.encode()).hexdigest()[:8], 16))

            cams = bucket_cameras(view, self.views_per_bucket, self.resolution, self.elevation_range,
                                  self.distance_range, self.fovy_range, gen)
            self._bank_dirs[key] = camera_directions(cams)
            self._banks[key] = self._cached(self._cache_key("bank", key, self.views_per_bucket),
                                            lambda: self._render(scene, cams))
        return self._banks[key]

    def random_bank(self) -> torch.Tensor:
        """A fixed random sample of renders of all world scenes, part of the unconditional data."""
        if self._random_bank is None:
            from ..world.scenes import all_scenes

            gen = torch.Generator().manual_seed(self.seed + 12345)
            scenes = all_scenes()
            picks = torch.randint(len(scenes), (self.n_uncond,), generator=gen).tolist()
            views = torch.randint(4, (self.n_uncond,), generator=gen).tolist()
            cams = [bucket_cameras(("front", "side", "back", "overhead")[view_index], 1, self.resolution,
                                   self.elevation_range, self.distance_range, self.fovy_range, gen)
                    for view_index in views]
            self._random_dirs = torch.cat([camera_directions(c) for c in cams]) if cams else torch.zeros(0, 3)

            def make():
                images = [self._render(scenes[i], c) for i, c in zip(picks, cams)]
                return torch.cat(images) if images else torch.zeros(0, 4, self.resolution, self.resolution)

            self._random_bank = self._cached(self._cache_key("random", self.n_uncond), make)
        return self._random_bank

    def unconditional_data(self) -> torch.Tensor:
        """Every image (N, 4, R, R) the teacher holds (kept until a new bank arrives)."""
        count = len(self._banks)
        if getattr(self, "_uncond_cache", (None, -1))[1] != count:
            self._uncond_cache = (torch.cat([self.random_bank(), *self._banks.values()]), count)
        return self._uncond_cache[0]

    def _camera_log_prior(self, key: str | None, camera_dir: torch.Tensor | None) -> torch.Tensor | None:
        """kappa d_i . c over the images of bank `key` (None: the unconditional data), or None when
        camera conditioning is off or the images' cameras are unknown (banks given to `from_banks`)."""
        if self.camera_sigma_deg <= 0 or camera_dir is None:
            return None
        if key is None:
            dirs = [self._random_dirs, *(self._bank_dirs.get(k) for k in self._banks)]
            if any(d is None for d in dirs):
                return None
            dirs = torch.cat(dirs)
        elif key in self._bank_dirs:
            dirs = self._bank_dirs[key]
        else:
            return None
        kappa = 1.0 / math.radians(self.camera_sigma_deg) ** 2
        return kappa * (dirs @ camera_dir.to(dirs))

    @staticmethod
    def composite(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """Premultiplied (K, 4, R, R) over a background colour (3,) -> model space [-1, 1]."""
        rgb = rgba[:, :3] + (1 - rgba[:, 3:]) * background.reshape(1, 3, 1, 1).to(rgba)
        return rgb * 2 - 1

    # -- the Teacher protocol -----------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None) -> Cond:
        """Each prompt (with an optional view suffix) -> its (scene, view) bank key.

        Negative prompts are not supported by an oracle: its unconditional data are fixed.
        """
        keys = []
        for prompt in prompts:
            if prompt not in self._prompt_keys:
                if prompt in self._banks:
                    self._prompt_keys[prompt] = prompt
                else:
                    from ..world.captions import split_view, with_view
                    from ..world.prompts import resolve_prompt

                    base, view = split_view(prompt)
                    scene = resolve_prompt(base)
                    self.bank(scene, view or "front")
                    self._prompt_keys[prompt] = with_view(scene.caption, view or "front")
            keys.append(self._prompt_keys[prompt])
        return Cond(prompts=list(prompts), cond=keys, uncond=None)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return pixels_to_model(images, self.resolution)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return model_to_pixels(x)

    def decode_bank(self, key: str, background: float = 1.0) -> torch.Tensor:
        """A bank's images in [0, 1] over a solid background, for looking at what the teacher knows."""
        return self.decode(self.composite(self._banks[key], torch.full((3,), float(background))))

    @staticmethod
    def posterior_mean(x_t: torch.Tensor, abar: torch.Tensor, data: torch.Tensor,
                       log_prior: torch.Tensor | None = None) -> torch.Tensor:
        """E[y | x_t] over the finite set `data` (K, C, H, W), for a batch x_t (B, C, H, W), abar (B,);
        `log_prior` (K,) reweights the set (uniform when None)."""
        x = x_t.flatten(1).double()
        y = data.flatten(1).double()
        a = abar.double().reshape(-1, 1)
        sq = (x * x).sum(1, keepdim=True) - 2 * a.sqrt() * (x @ y.T) + a * (y * y).sum(1)[None]
        logits = -sq / (2 * (1 - a))
        if log_prior is not None:
            logits = logits + log_prior.double()[None]
        weights = torch.softmax(logits, dim=1)
        return (weights @ y).to(x_t.dtype).reshape(x_t.shape)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, need_uncond: bool = True):
        """Conditional and unconditional posterior means (the latter None unless `need_uncond`).

        The data of row i are the bank images composited over row i's background,
        `cond.extra["background"]` (B, 3), white when absent: the render and the teacher's data
        then share their background, so a white object on white cannot hide by turning transparent.
        `cond.extra["camera_dirs"]` (B, 3), the unit directions from the object to each row's camera,
        condition both branches on the camera when `camera_sigma_deg` > 0 (see the module docstring).
        """
        abar = self.schedule.abar(t)
        background = cond.extra.get("background")
        background = torch.ones(x_t.shape[0], 3) if background is None else torch.as_tensor(background).reshape(-1, 3)
        camera_dirs = cond.extra.get("camera_dirs")
        x0_cond = torch.empty_like(x_t)
        x0_uncond = torch.empty_like(x_t) if need_uncond else None
        for row, key in enumerate(cond.cond):
            camera_dir = None if camera_dirs is None else torch.as_tensor(camera_dirs)[row]
            data = self.composite(self._banks[key], background[row])
            x0_cond[row] = self.posterior_mean(x_t[row : row + 1], abar[row : row + 1], data,
                                               self._camera_log_prior(key, camera_dir))[0]
            if need_uncond:
                data = self.composite(self.unconditional_data(), background[row])
                x0_uncond[row] = self.posterior_mean(x_t[row : row + 1], abar[row : row + 1], data,
                                                     self._camera_log_prior(None, camera_dir))[0]
        return x0_cond, x0_uncond

    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        t = t.reshape(-1).expand(x_t.shape[0])
        x0_cond, x0_uncond = self.predict_x0(x_t, t, cond, need_uncond=guidance_scale != 1.0)
        eps_cond = self.schedule.x0_to_eps(x_t, x0_cond, t)
        if guidance_scale == 1.0:
            return eps_cond
        eps_uncond = self.schedule.x0_to_eps(x_t, x0_uncond, t)
        return cfg_combine(eps_uncond, eps_cond, guidance_scale)
