"""Sign checks: SDS, NFSD and VSD, run on a free image against a teacher with a known exact score,
pull the image to the teacher's data; the same loop with the loss negated pushes it away.

The teacher is closed-form: every prompt names an isotropic Gaussian N(x*, v I) in model space
(v = 0: the single image x*), whose exact noise prediction under x_t = sqrt(a) x0 + sqrt(1 - a) eps is

    eps(x_t; v) = -sqrt(1 - a) grad log p_t(x_t) = sqrt(1 - a) (x_t - sqrt(a) x*) / (a v + 1 - a)
                = k(v) (x_t - sqrt(a) x*),   k(v) = sqrt(1 - a) / (a v + 1 - a),

so k(0) = 1 / sqrt(1 - a) > k(1) > k(4) > 0. All three prompts (the text "x*", the empty prompt
and the negative prompt) are centred on x*, so x* is the only fixed point of every loss below and
the signs can be read off by hand (x = 2 image - 1, the teacher's input):

- SDS (s = 1): w (eps(x_t; 0) - eps) = w sqrt(a / (1 - a)) (x - x*), exactly, with no noise left.
- NFSD (s = 7.5): w (delta_D + s delta_C) = w [s (k(0) - k(1)) + k(1) - k(4) 1{t >= 200}] (x_t - sqrt(a) x*),
  whose mean over the noise is a positive multiple of (x - x*).
- VSD (s = 7.5, the fake score of the renders = the exact eps of a point mass at the current x,
  i.e. a LoRA trained to its optimum): w (eps_cfg - eps_fake) = w [C sqrt(a) (x - x*) + (C - k(0)) sqrt(1 - a) eps]
  with C = k(1) + s (k(0) - k(1)) > 0.

Each gradient is a positive multiple of (x - x*) (plus zero-mean noise), so descent contracts the
distance to x*. A sign error that flips the whole gradient (eps - eps_hat in SDS, eps_fake -
eps_teacher in VSD, -(delta_D + s delta_C) in NFSD) makes it a negative multiple: descent then runs
away from x* and the distance grows, which each test demonstrates by running the same loop on -loss.
Flipping delta_C alone in NFSD gives the coefficient -s (k(0) - k(1)) + k(1) - ... < 0 at s = 7.5
(delta_C dominates), so that fails too. Checked by mutating score.py: the overall signs of SDS, NFSD
and VSD and NFSD's delta_C sign each fail here. Not caught here, by construction: NFSD's sign of
eps(negative) in delta_D (k(4) < k(1) + s (k(0) - k(1)) keeps the coefficient positive) and the
sign of the LoRA's camera guidance (the fake score is centred on the particle x, so any guidance
of it leaves the mean gradient C sqrt(a) (x - x*)); the formula tests in test_vsd.py catch those.
"""

import pytest
import torch

from sds3d.diffusion.protocol import Cond, cfg_combine, model_to_pixels, pixels_to_model
from sds3d.diffusion.schedule import NoiseSchedule
from sds3d.distill.score import nfsd_loss, sds_loss, vsd_loss

T = 1000
RES = 8
NULL_VAR, NEGATIVE_VAR = 1.0, 4.0  # the empty prompt and the negative prompt: broader around x*


class GaussianTeacher:
    """Teacher protocol with an exact eps: prompt p -> data distribution N(target, variances[p] I)."""

    channels, resolution, dtype, device, network = 3, RES, torch.float32, torch.device("cpu"), None

    def __init__(self, target_pixels: torch.Tensor, variances: dict[str, float]):
        self.schedule = NoiseSchedule.scaled_linear(T)
        self.target = pixels_to_model(target_pixels, RES)  # x*, (1, 3, RES, RES)
        self.variances = variances

    def encode_prompt(self, prompts, negative=None):
        negative = list(negative) * len(prompts) if negative else [""] * len(prompts)
        return Cond(list(prompts), list(prompts), negative)

    def encode(self, images):
        return pixels_to_model(images, RES)

    def decode(self, x):
        return model_to_pixels(x)

    def exact_eps(self, x_t, t, prompts):
        a = self.schedule.abar(t).reshape(-1, 1, 1, 1)
        var = torch.tensor([self.variances[p] for p in prompts]).reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.target) / (a * var + 1 - a)

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        eps_c = self.exact_eps(x_t, t, cond.cond)
        return eps_c if guidance_scale == 1.0 else cfg_combine(self.exact_eps(x_t, t, cond.uncond), eps_c,
                                                               guidance_scale)


class ParticleScore(torch.nn.Module):
    """VSD's LoRA at its optimum for one particle: the exact eps of the renders' distribution, a
    point mass at the current (detached) image, whatever the text and camera."""

    prediction_type = "epsilon"
    camera_dim = 16

    def __init__(self, teacher: GaussianTeacher, image: torch.Tensor):
        super().__init__()
        self.teacher, self.image = teacher, image

    def flatten_camera(self, camera):
        return camera.reshape(camera.shape[0], -1)

    def forward(self, x_t, t, text, camera):
        a = self.teacher.schedule.abar(t).reshape(-1, 1, 1, 1)
        particle = self.teacher.encode(self.image.detach())
        return (x_t - a.sqrt() * particle) / (1 - a).sqrt()


def tiny_lean_unet():
    """vsd_loss refuses teachers whose network it could not copy into a LoRA (network_kind); the
    closed-form teacher carries this tiny LeanUNet only to pass that check: nothing calls it."""
    from sds3d.teachers.unet import LeanUNet, NetConfig

    return LeanUNet(NetConfig(resolution=RES, channels=(8,), attention_levels=(), text_dim=4, emb_dim=8, groups=4,
                              head_dim=8))


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = 0.1 + 0.8 * torch.rand(1, 3, RES, RES, generator=g)
    teacher = GaussianTeacher(target, {"x*": 0.0, "": NULL_VAR, "blurry": NEGATIVE_VAR})
    return teacher, target, g


def optimize(loss_fn, target, g, sign, steps=200, batch=8, lr=0.03):
    """Adam on a free image (start: flat grey), `batch` noise draws per step, the learning rate
    decaying linearly to 0 so that the noisy losses settle; returns the distance to `target` at
    the start and at the end."""
    image = torch.full_like(target, 0.5).requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    start = (image - target).norm().item()
    for _ in range(steps):
        loss = loss_fn(image, image.expand(batch, -1, -1, -1), g)
        optimizer.zero_grad()
        (sign * loss).backward()
        optimizer.step()
        decay.step()
    return start, (image.detach() - target).norm().item()


def check(loss_fn, target, g):
    start, end = optimize(loss_fn, target, g, sign=1.0)
    print(f"distance to x*: start {start:.3f} -> end {end:.3f}")
    assert end < 0.2 * start, (start, end)
    # the same loop with the loss negated (the effect of a sign error) runs away from x*
    start, flipped = optimize(loss_fn, target, g, sign=-1.0)
    print(f"with the loss negated: start {start:.3f} -> end {flipped:.3f}")
    assert flipped > 2.0 * start, (start, flipped)


def test_the_closed_form_teacher_is_exact():
    """For v = 0 it returns the very noise that made x_t; for v > 0 it is Tweedie's eps of the
    Gaussian posterior mean E[x0 | x_t] = x* + sqrt(a) v (x_t - sqrt(a) x*) / (a v + 1 - a)."""
    teacher, _, g = setup()
    t = torch.tensor([20, 500, 980])
    a = teacher.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noise = torch.randn(3, 3, RES, RES, generator=g)
    x_t = a.sqrt() * teacher.target + (1 - a).sqrt() * noise
    torch.testing.assert_close(teacher.exact_eps(x_t, t, ["x*"] * 3), noise, atol=1e-4, rtol=1e-4)
    x_t = torch.randn(3, 3, RES, RES, generator=g)
    for prompt, v in (("", NULL_VAR), ("blurry", NEGATIVE_VAR)):
        x0 = teacher.target + a.sqrt() * v * (x_t - a.sqrt() * teacher.target) / (a * v + 1 - a)
        torch.testing.assert_close(teacher.exact_eps(x_t, t, [prompt] * 3), (x_t - a.sqrt() * x0) / (1 - a).sqrt())


def test_sds_pulls_a_free_image_to_the_data():
    teacher, target, g = setup()

    def loss(image, images, g):
        cond = teacher.encode_prompt(["x*"] * images.shape[0])
        return sds_loss(teacher, images, cond, guidance_scale=1.0, generator=g).loss

    check(loss, target, g)


@pytest.mark.parametrize("guidance_scale", [7.5, 100.0])
def test_guided_sds_pulls_a_free_image_to_the_data(guidance_scale):
    """With guidance the SDS gradient keeps a noise term, w (C sqrt(1 - a) - 1) eps; its mean is
    still C w sqrt(a) (x - x*) with C = k(1) + s (k(0) - k(1)) > 0."""
    teacher, target, g = setup(1)

    def loss(image, images, g):
        cond = teacher.encode_prompt(["x*"] * images.shape[0])
        return sds_loss(teacher, images, cond, guidance_scale=guidance_scale, generator=g).loss

    check(loss, target, g)


def test_nfsd_pulls_a_free_image_to_the_data():
    teacher, target, g = setup(2)

    def loss(image, images, g):
        b = images.shape[0]
        cond = teacher.encode_prompt(["x*"] * b, negative=["blurry"])
        null_cond = teacher.encode_prompt([""] * b)
        return nfsd_loss(teacher, images, cond, null_cond, guidance_scale=7.5, generator=g).loss

    check(loss, target, g)


def test_vsd_pulls_a_free_image_to_the_data():
    teacher, target, g = setup(3)
    teacher.network = tiny_lean_unet()
    c2w = torch.eye(4).expand(8, 4, 4)

    def loss(image, images, g):
        b = images.shape[0]
        cond = teacher.encode_prompt(["x*"] * b)
        return vsd_loss(teacher, ParticleScore(teacher, images), images, cond, c2w[:b], guidance_scale=7.5,
                        generator=g).loss

    check(loss, target, g)
