"""NoiseSchedule against diffusers' DDPMScheduler, the field's reference implementation."""

import pytest
import torch
from diffusers import DDPMScheduler

from sds3d.distill.annealing import annealed_guidance, annealed_range, decayed_lr_factor
from sds3d.diffusion.schedule import sample_timesteps
from sds3d.diffusion.schedule import NoiseSchedule


@pytest.mark.parametrize("name,ours", [
    ("linear", NoiseSchedule.linear()),
    ("scaled_linear", NoiseSchedule.scaled_linear()),
    ("squaredcos_cap_v2", NoiseSchedule.cosine()),
])
def test_alphas_cumprod_match_diffusers(name, ours):
    kwargs = {} if name != "scaled_linear" else {"beta_start": 0.00085, "beta_end": 0.012}
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs).alphas_cumprod
    torch.testing.assert_close(ours.alphas_cumprod, reference.float(), rtol=1e-5, atol=1e-6)


def test_noise_velocity_and_conversions_match_diffusers():
    schedule = NoiseSchedule.scaled_linear()
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, reference.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    v = schedule.velocity(x0, eps, t)
    torch.testing.assert_close(v, reference.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    # Every parameterization recovers the same eps and x0.
    torch.testing.assert_close(schedule.to_eps(x_t, eps, t, "epsilon"), eps)
    torch.testing.assert_close(schedule.to_eps(x_t, x0, t, "sample"), eps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(schedule.to_eps(x_t, v, t, "v_prediction"), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.v_to_x0(x_t, v, t), x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="allowed are"):
        schedule.to_eps(x_t, v, t, "flow")


def test_sigma_roundtrip_and_log_snr():
    schedule = NoiseSchedule.linear()
    t = torch.tensor([3, 100, 500, 990])
    assert torch.equal(schedule.t_from_sigma(schedule.sigma(t)), t)
    a = schedule.abar(t)
    torch.testing.assert_close(schedule.log_snr(t), torch.log(a / (1 - a)))


def test_timestep_sampling_and_annealing():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(10000, 1000, 0.02, 0.98, g)
    assert t.min() == 20 and t.max() == 980
    assert abs(t.float().mean().item() - 500) < 10
    assert annealed_range(0, 100, 0.02, 0.98, 0.5) == (0.02, 0.98)
    assert annealed_range(100, 100, 0.02, 0.98, 0.5)[1] == pytest.approx(0.5)
    assert annealed_range(50, 100, 0.02, 0.98, 0.5)[1] == pytest.approx(0.74)
    assert annealed_range(50, 100, 0.02, 0.98, None) == (0.02, 0.98)
    with pytest.raises(ValueError, match="t_min"):
        sample_timesteps(1, 1000, 0.9, 0.1)


def test_guidance_annealing_is_linear_over_the_run():
    assert annealed_guidance(0, 800, 3.0, 1.0) == 3.0
    assert annealed_guidance(200, 800, 3.0, 1.0) == 2.5
    assert annealed_guidance(800, 800, 3.0, 1.0) == 1.0
    assert annealed_guidance(900, 800, 3.0, 1.0) == 1.0  # a resumed run past its steps stays at the end
    assert annealed_guidance(400, 800, 7.5, None) == 7.5


def test_lr_decay_follows_torch_exponential_lr():
    """decayed_lr_factor(k, N, d) is the rate torch's ExponentialLR (gamma = d ** (1 / N)) gives at step k,
    reaching d at the last step, and it stays there past it (a resumed run extended with --steps)."""
    steps, decay = 40, 0.1
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay ** (1 / steps))
    for step in range(steps + 1):
        assert decayed_lr_factor(step, steps, decay) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert decayed_lr_factor(steps, steps, decay) == pytest.approx(decay)
    assert decayed_lr_factor(steps + 10, steps, decay) == pytest.approx(decay)
    assert decayed_lr_factor(17, steps, 1.0) == 1.0


def test_teacher_defaults_for_guidance():
    from sds3d.config import make_config

    assert make_config(prompt="a red cube").guidance_scale_end == 1.0  # the embedded network
    assert make_config(prompt="a red cube", teacher="oracle").guidance_scale_end is None
    assert make_config(prompt="a red cube", guidance_scale=5.0).guidance_scale_end == 1.0
    assert make_config(prompt="a red cube", explicit={"guidance_scale_end": None}).guidance_scale_end is None


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2"])
def test_min_snr_weights_are_hang_et_al(name):
    """Min-SNR-gamma (Hang et al., ICCV 2023): the per-timestep weight that turns each
    parameterization's plain MSE into the x0-loss weighted by min(SNR, gamma):
    eps: min(SNR, gamma) / SNR, v: min(SNR, gamma) / (SNR + 1), x0: min(SNR, gamma), SNR = abar / (1 - abar),
    with abar from diffusers' DDPMScheduler and SNR from diffusers' own `compute_snr`."""
    from diffusers.training_utils import compute_snr

    from sds3d.diffusion.schedule import min_snr_weights

    kwargs = {} if name != "scaled_linear" else {"beta_start": 0.00085, "beta_end": 0.012}
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs)
    ours = NoiseSchedule.scaled_linear() if name == "scaled_linear" else NoiseSchedule.cosine()
    t, gamma = torch.tensor([0, 10, 100, 300, 600, 999]), 5.0
    abar = reference.alphas_cumprod.double()[t]
    snr = abar / (1 - abar)
    torch.testing.assert_close(snr, compute_snr(reference, t).double(), rtol=1e-5, atol=0)
    assert snr.max() > gamma > snr.min()  # both sides of the clip are exercised
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    for prediction_type, weights in expected.items():
        got = min_snr_weights(ours, t, prediction_type, gamma)
        torch.testing.assert_close(got.double(), weights, rtol=1e-4, atol=1e-7, msg=prediction_type)
    torch.testing.assert_close(min_snr_weights(ours, t, "epsilon", None), torch.ones(len(t)))


def test_min_snr_weights_at_known_timesteps():
    """Stable Diffusion's schedule, gamma 5, hand-checked numbers: at t = 100 SNR = 8.4539 (clipped),
    at t = 999 SNR = 4.6819e-3 (not clipped)."""
    from sds3d.diffusion.schedule import min_snr_weights

    schedule, t = NoiseSchedule.scaled_linear(), torch.tensor([100, 999])
    snr_100, snr_999 = 8.4539, 4.6819e-3
    torch.testing.assert_close(min_snr_weights(schedule, t, "epsilon", 5.0), torch.tensor([5 / snr_100, 1.0]),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(min_snr_weights(schedule, t, "v_prediction", 5.0),
                               torch.tensor([5 / (snr_100 + 1), snr_999 / (snr_999 + 1)]), rtol=1e-4, atol=0)
    torch.testing.assert_close(min_snr_weights(schedule, t, "sample", 5.0), torch.tensor([5.0, snr_999]),
                               rtol=1e-4, atol=0)
