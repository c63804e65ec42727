"""Adv-KD (sds3d/distill/students/adv_kd.py): the paper's timestep table, the WGAN-GP penalty and
critic against closed forms, the student's size and shapes, a short run that saves, resumes exactly
and loads back, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from sds3d.cli import main
from sds3d.distill.students import METHODS, StudentConfig, StudentRun, load_student
from sds3d.distill.students.adv_kd import (AdversarialKD, AdvKDGenerator, Critic, adv_kd_timesteps, critic_loss,
                                           gradient_penalty, noise_at, submodule_resolutions, submodule_timesteps)
from tiny_teachers import tiny_teacher

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
quiet = lambda *a: None  # noqa: E731


def adv_config(**kw) -> StudentConfig:
    base = dict(method="adv-kd", nfe=1, steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=2,
                checkpoint_every=1000, sample_every=0, guidance=2.0,
                options={"pairs": 8, "teacher_steps": 4, "pair_batch": 8, "width": 16, "critic_width": 8})
    base.update(kw)
    return StudentConfig(**base)


def test_timestep_table_is_the_papers_formula():
    """t_n = 190 n - 10 n^2 + 80 (n = 0..10) in 1000-step indices; t * T / 1000 on another schedule;
    the submodules take them noisiest first."""
    formula = [190 * n - 10 * n ** 2 + 80 for n in range(11)]
    assert adv_kd_timesteps(1000) == formula == [80, 260, 420, 560, 680, 780, 860, 920, 960, 980, 980]
    assert adv_kd_timesteps(100) == [8, 26, 42, 56, 68, 78, 86, 92, 96, 98, 98]
    assert adv_kd_timesteps(2000) == [2 * t for t in formula]
    assert submodule_timesteps(1000) == formula[::-1]


def test_resolutions_double_from_4_px_to_the_teachers():
    assert submodule_resolutions(32) == [4, 4, 4, 8, 8, 16, 16, 16, 32, 32, 32]
    for R in (8, 16, 32, 64, 128):
        rs = submodule_resolutions(R)
        assert len(rs) == 11 and rs[-1] == R and rs[-2] == R
        assert all(b in (a, 2 * a) for a, b in zip([4] + rs, rs))
    for bad in (4, 24, 33):
        with pytest.raises(ValueError, match="power of two >= 8"):
            submodule_resolutions(bad)


@pytest.mark.parametrize("w_norm, expected", [(1.0, 0.0), (2.0, 1.0), (0.5, 0.25)])
def test_gradient_penalty_of_a_linear_critic_is_its_closed_form(w_norm, expected):
    """f(x) = w . x has gradient w everywhere, so (|grad| - 1)^2 = (|w| - 1)^2 on the whole
    interpolation line: 0 for a 1-Lipschitz critic, 1 for |w| = 2."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 8, generator=g)
    w = w * (w_norm / w.norm())
    critic = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    real, fake = torch.randn(64, 3, 8, 8, generator=g) + 2, torch.randn(64, 3, 8, 8, generator=g)
    penalty = gradient_penalty(critic, real, fake, generator=g)
    assert abs(float(penalty) - expected) < 1e-5, float(penalty)


def test_wgan_gp_critic_estimates_the_wasserstein_distance_of_two_gaussians():
    """Real N(m, I), fake N(0, I) in 16 dimensions: W1 = |m| (the optimal critic is the linear
    x . m / |m|). A few hundred WGAN-GP steps of the Adv-KD critic bring E[D(real)] - E[D(fake)]
    on fresh samples within 15% of it (without the penalty it runs away: ~1000)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    critic = Critic(channels=1, resolution=4, text_dim=8, width=16)
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3, betas=(0.0, 0.9))
    mean = torch.full((1, 1, 4, 4), 0.5)
    w1 = float(mean.norm())  # 2.0
    text = torch.zeros(256, 8)
    for _ in range(300):
        real, fake = torch.randn(256, 1, 4, 4, generator=g) + mean, torch.randn(256, 1, 4, 4, generator=g)
        loss, _ = critic_loss(critic, real, fake, text, 10.0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        real, fake = torch.randn(8192, 1, 4, 4, generator=g) + mean, torch.randn(8192, 1, 4, 4, generator=g)
        text = torch.zeros(8192, 8)
        estimate = float(critic(real, text).mean() - critic(fake, text).mean())
    assert abs(estimate - w1) < 0.15 * w1, (estimate, w1)


def test_noise_pyramid_is_block_means_at_unit_variance():
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    low = noise_at(x, 4)
    blocks = x.reshape(64, 3, 4, 8, 4, 8).mean(dim=(3, 5)) * 8  # independent of avg_pool2d
    torch.testing.assert_close(low, blocks)
    assert abs(float(low.std()) - 1) < 0.05 and noise_at(x, 32) is x


def test_student_is_ten_times_smaller_than_the_embedded_teacher_and_teacher_shaped():
    from sds3d.teachers.embedded import ASSET_DIR
    from sds3d.teachers.unet import LeanUNet, NetConfig

    net_config = NetConfig.from_dict(json.loads((ASSET_DIR / "config.json").read_text())["network"])
    teacher_params = sum(p.numel() for p in LeanUNet(net_config).parameters())
    assert 3.3e6 < teacher_params < 3.5e6
    student = AdvKDGenerator(net_config.resolution, 3, net_config.text_dim)
    assert sum(p.numel() for p in student.parameters()) < teacher_params / 10
    for R, C in ((16, 3), (32, 3), (16, 4)):
        net = AdvKDGenerator(R, C, 384, width=16)
        images = net(torch.randn(2, C, R, R), torch.randn(2, 384))
        assert [tuple(x.shape) for x in images] == [(2, C, r, r) for r in submodule_resolutions(R)]


def test_a_short_run_saves_resumes_exactly_and_loads_back(tmp_path):
    """A few steps on a tiny teacher: student.json and a checkpoint; a run interrupted and resumed
    ends with the same generator AND critics (their Adam state is in the checkpoint) as a straight
    one; load_student gives back the same samples for the same x_T, a function of x_T alone."""
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    straight = StudentRun(tmp_path / "a", adv_config(), AdversarialKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    before = {k: v.clone() for k, v in straight.student.network.state_dict().items()}
    straight.train()
    first = StudentRun(tmp_path / "b", adv_config(), AdversarialKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    first.train(max_steps=2)
    resumed = StudentRun(tmp_path / "b", adv_config(), AdversarialKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    assert resumed.loop.step == 2
    resumed.train()
    for a, b in ((straight.student.network, resumed.student.network),
                 (straight.method.critics, resumed.method.critics)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(before[k], v) for k, v in straight.student.network.state_dict().items())
    # the cached targets are the teacher's own guided DDIM samples
    from sds3d.diffusion.solvers import ddim_sample

    cached = torch.load(tmp_path / "a" / "adv_kd_targets.pt", weights_only=True)
    cond = teacher.encode_prompt([PROMPTS[i] for i in cached["index"].tolist()])
    expected = ddim_sample(teacher, cond, 4, 2.0, x_T=cached["x_T"].float(), spacing="trailing", clip_x0=True).x
    torch.testing.assert_close(cached["x_0"].float(), expected, atol=2e-3, rtol=0)

    meta = json.loads((tmp_path / "a" / "student.json").read_text())
    assert meta["nfe"] == 1 and meta["steps_done"] == 4 and meta["parameters"] == sum(before[k].numel() for k in before)
    student, method, _ = load_student(tmp_path / "a", METHODS, teacher=teacher)
    cond = teacher.encode_prompt(PROMPTS)
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    loaded = method.sample(student, cond, 1, None, x_T=x_T)
    trained = straight.method.sample(straight.student, cond, 1, None, x_T=x_T)
    torch.testing.assert_close(loaded.x, trained.x)
    again = method.sample(student, cond, 1, torch.Generator().manual_seed(99), x_T=x_T)
    assert torch.equal(loaded.x, again.x) and loaded.nfe == 1
    assert loaded.images.shape == (3, 3, 16, 16) and loaded.images.min() >= 0 and loaded.images.max() <= 1


@pytest.mark.parametrize("options, message", [
    ({"n_critics": 2}, "unknown adv-kd option(s) n_critics: allowed are pairs"),
    ({"n_critic": 0}, "adv-kd option n_critic=0: must be an integer from 1 to 20"),
    ({"gp_weight": -1.0}, "adv-kd option gp_weight=-1.0: must be a number >= 0"),
    ({"critic_lr": 0}, "adv-kd option critic_lr=0: must be a positive number"),
    ({"width": 4.5}, "adv-kd option width=4.5: must be an integer from 8 to 512"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as error:
        AdversarialKD(adv_config(options=options))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--nfe", "2"], "method adv-kd cannot make a 2-NFE student: Adv-KD makes 1-NFE students only"),
    (["--nfe", "1", "--set", "options.gp=3"], "unknown adv-kd option(s) gp"),
    (["--nfe", "1", "--set", "options.kd_weight=-2"], "adv-kd option kd_weight=-2"),
])
def test_distill_refuses_bad_adv_kd_input_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "student"
    assert main(["distill", "--method", "adv-kd", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_a_latent_diffusers_teacher_gets_a_latent_student(tmp_path):
    """Stable Diffusion's latents (4 channels, 8 x 8 here) and CLIP token states (mean-pooled): the
    same code trains and samples latents of the teacher's shape that its VAE decodes."""
    from sds3d.teachers import load_teacher
    from tiny_sd import build_tiny_sd_pipeline

    torch.set_num_threads(1)
    teacher = load_teacher(str(build_tiny_sd_pipeline(tmp_path / "sd", "epsilon", seed=0)))
    config = adv_config(teacher="tiny-sd", steps=2, batch_size=2, options={"pairs": 4, "teacher_steps": 2, "width": 16})
    run = StudentRun(tmp_path / "adv", config, AdversarialKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    assert run.train()["step"] == 2
    out = run.method.sample(run.student, teacher.encode_prompt(PROMPTS[:2]), 1, torch.Generator().manual_seed(0))
    assert out.x.shape == (2, 4, teacher.resolution, teacher.resolution) and teacher.channels == 4
    assert out.images.shape == (2, 3, teacher.vae_resolution, teacher.vae_resolution)
    assert torch.isfinite(out.images).all()
