"""The oracle teacher against brute-force posterior means, and SDS on a fixed-image generator."""

import math

import torch

from sds3d.distill.score import NonFiniteGradientError, sds_loss
from sds3d.diffusion.protocol import Teacher
from sds3d.teachers.oracle import OracleTeacher


def brute_force_posterior_mean(x_t, abar, images):
    """E[y | x_t] for y uniform over `images`, x_t ~ N(sqrt(abar) y, (1 - abar) I), one image at a time."""
    log_likelihoods = []
    for y in images:
        normal = torch.distributions.Normal(math.sqrt(abar) * y.double(), math.sqrt(1 - abar))
        log_likelihoods.append(normal.log_prob(x_t.double()).sum())
    weights = torch.softmax(torch.stack(log_likelihoods), 0)
    return sum(w * y.double() for w, y in zip(weights, images)).float()


def small_banks(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, "b": torch.rand(3, 3, 4, 4, generator=g) * 2 - 1}, \
        torch.rand(4, 3, 4, 4, generator=g) * 2 - 1


def test_oracle_x0_matches_brute_force_posterior():
    banks, extra = small_banks()
    teacher = OracleTeacher.from_banks(banks, extra)
    assert isinstance(teacher, Teacher)
    g = torch.Generator().manual_seed(1)
    cond = teacher.encode_prompt(["a", "b", "a"])
    for step in (50, 400, 900):
        t = torch.full((3,), step)
        abar = teacher.schedule.abar(t)[0].item()
        x_t = torch.randn(3, 3, 4, 4, generator=g)
        x0_cond, x0_uncond = teacher.predict_x0(x_t, t, cond)
        everything = torch.cat([extra, banks["a"], banks["b"]])
        for row, key in enumerate(["a", "b", "a"]):
            torch.testing.assert_close(x0_cond[row], brute_force_posterior_mean(x_t[row], abar, banks[key]), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(x0_uncond[row], brute_force_posterior_mean(x_t[row], abar, everything), atol=1e-5, rtol=1e-4)


def test_camera_conditioned_oracle_is_the_posterior_under_a_von_mises_fisher_prior():
    """With camera conditioning, p(i | c) ~ exp(kappa d_i . c), kappa = 1/sigma^2: the brute-force
    posterior mean under that prior, for both branches; at abar -> 0 the prior alone remains."""
    banks, extra = small_banks()
    g = torch.Generator().manual_seed(2)
    dirs = {k: torch.randn(len(v), 3, generator=g) for k, v in banks.items()}
    extra_dirs = torch.randn(len(extra), 3, generator=g)
    sigma = 20.0
    teacher = OracleTeacher.from_banks(banks, extra, dirs, extra_dirs, camera_sigma_deg=sigma)
    kappa = 1.0 / math.radians(sigma) ** 2
    camera = torch.nn.functional.normalize(torch.randn(2, 3, generator=g), dim=-1)
    cond = teacher.encode_prompt(["a", "b"])
    cond.extra["camera_dirs"] = camera

    def prior_posterior(x_t, abar, images, directions, c):
        cos = torch.nn.functional.normalize(directions, dim=-1) @ c
        log_prior = torch.log(torch.exp(kappa * cos.double()) / torch.exp(kappa * cos.double()).sum())
        logs = [torch.distributions.Normal(math.sqrt(abar) * y.double(), math.sqrt(1 - abar)).log_prob(x_t.double()).sum()
                for y in images]
        weights = torch.softmax(torch.stack(logs) + log_prior, 0)
        return sum(w * y.double() for w, y in zip(weights, images)).float()

    everything = torch.cat([extra, banks["a"], banks["b"]])
    all_dirs = torch.cat([extra_dirs, dirs["a"], dirs["b"]])
    for step in (100, 600, 999):
        t = torch.full((2,), step)
        abar = teacher.schedule.abar(t)[0].item()
        x_t = torch.randn(2, 3, 4, 4, generator=g)
        x0_cond, x0_uncond = teacher.predict_x0(x_t, t, cond)
        for row, key in enumerate(["a", "b"]):
            torch.testing.assert_close(x0_cond[row], prior_posterior(x_t[row], abar, banks[key], dirs[key], camera[row]),
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(x0_uncond[row], prior_posterior(x_t[row], abar, everything, all_dirs, camera[row]),
                                       atol=1e-5, rtol=1e-4)
    # the prior matters: without the camera the same x_t gives the plain posterior, which differs
    x_t, t = torch.randn(1, 3, 4, 4, generator=g), torch.tensor([999])
    with_camera = teacher.encode_prompt(["a"])
    with_camera.extra["camera_dirs"] = camera[:1]
    plain = teacher.predict_x0(x_t, t, teacher.encode_prompt(["a"]), need_uncond=False)[0]
    conditioned = teacher.predict_x0(x_t, t, with_camera, need_uncond=False)[0]
    torch.testing.assert_close(plain[0], brute_force_posterior_mean(x_t[0], teacher.schedule.abar(t).item(), banks["a"]),
                               atol=1e-5, rtol=1e-4)
    assert (plain - conditioned).abs().max() > 0.05


def test_oracle_guidance_is_diffusers_cfg():
    banks, extra = small_banks()
    teacher = OracleTeacher.from_banks(banks, extra)
    cond = teacher.encode_prompt(["a"])
    x_t, t = torch.randn(1, 3, 4, 4), torch.tensor([500])
    x0_c, x0_u = teacher.predict_x0(x_t, t, cond)
    a = teacher.schedule.abar(t)
    eps_c = (x_t - a.sqrt() * x0_c) / (1 - a).sqrt()
    eps_u = (x_t - a.sqrt() * x0_u) / (1 - a).sqrt()
    torch.testing.assert_close(teacher.predict_eps(x_t, t, cond, 7.5), eps_u + 7.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.predict_eps(x_t, t, cond, 1.0), eps_c, atol=1e-5, rtol=1e-5)


def test_sds_gradient_is_weighted_noise_residual():
    """d loss / d x equals w(t) (eps_hat - eps), with w = 1 - abar (DreamFusion)."""
    banks, extra = small_banks()
    teacher = OracleTeacher.from_banks(banks, extra)
    cond = teacher.encode_prompt(["a", "a"])
    image = torch.rand(2, 3, 4, 4, requires_grad=True)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 3, 4, 4)
    out = sds_loss(teacher, image, cond, guidance_scale=2.0, timesteps=t, noise=noise)
    out.loss.backward()
    x = image.detach() * 2 - 1
    x_t = teacher.schedule.add_noise(x, noise, t)
    expected = (1 - teacher.schedule.abar(t)).reshape(-1, 1, 1, 1) * (teacher.predict_eps(x_t, t, cond, 2.0) - noise)
    # the loss is averaged over the batch and x = 2 * image - 1
    torch.testing.assert_close(image.grad, 2 * expected / 2, atol=1e-5, rtol=1e-4)


def test_sds_drives_a_free_image_to_the_teachers_data():
    """A generator that is just an image converges, under SDS, to the single image the teacher knows."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 8, 8, generator=g)
    teacher = OracleTeacher.from_banks({"target": target * 2 - 1})
    cond = teacher.encode_prompt(["target"])
    logits = torch.zeros(1, 3, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    start_error = (torch.sigmoid(logits) - target).abs().mean().item()
    for _ in range(300):
        out = sds_loss(teacher, torch.sigmoid(logits), cond, guidance_scale=1.0, generator=g)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    error = (torch.sigmoid(logits) - target).abs().mean().item()
    assert start_error > 0.2 and error < 0.02


def test_sds_refuses_nan_renders():
    banks, extra = small_banks()
    teacher = OracleTeacher.from_banks(banks, extra)
    image = torch.full((1, 3, 4, 4), float("nan"))
    try:
        sds_loss(teacher, image, teacher.encode_prompt(["a"]))
    except NonFiniteGradientError as error:
        assert "not finite" in str(error)
    else:
        raise AssertionError("NaN renders must stop training")


def test_world_banks_know_the_camera_of_every_render():
    """Each bank image's stored camera direction reproduces that image when the world is rendered
    from it (fixed distance and fovy), and front-bucket directions lie within 45 degrees of +x."""
    from sds3d.geometry.cameras import spherical_cameras
    from sds3d.world.prompts import resolve_prompt

    teacher = OracleTeacher(resolution=16, views_per_bucket=4, n_uncond=3, distance_range=(2.75, 2.75),
                            fovy_range=(45.0, 45.0), use_disk_cache=False, camera_sigma_deg=10.0)
    scene = resolve_prompt("a snowman")
    bank = teacher.bank(scene, "front")
    dirs = teacher._bank_dirs["a white snowman, front view"]
    elevation = torch.rad2deg(torch.asin(dirs[:, 2]))
    azimuth = torch.rad2deg(torch.atan2(dirs[:, 1], dirs[:, 0]))
    assert azimuth.abs().max() <= 45.0
    again = teacher._render(scene, spherical_cameras(elevation, azimuth, 2.75, 45.0, 16))
    torch.testing.assert_close(again, bank, atol=2e-3, rtol=0)
    assert teacher.random_bank().shape[0] == teacher._random_dirs.shape[0] == 3
