"""Samplers (sds3d/diffusion/solvers.py) against diffusers' schedulers, a closed-form Gaussian and the
embedded teacher's original DDIM; NFE accounting; the `sds3d teacher sample` command."""

import hashlib

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler, UNet2DConditionModel

from sds3d.diffusion.solvers import SOLVERS, ddim_sample, ddim_timesteps, dpm_timesteps, dpmpp_2m_sample, dpmpp_3m_sample, heun_sample, karras_timesteps, sample
from sds3d.diffusion.protocol import Cond, cfg_combine, model_to_pixels
from sds3d.diffusion.schedule import NoiseSchedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 __array__ notes from diffusers

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# --- a tiny diffusers UNet behind the Teacher protocol ---------------------------------------

class UNetTeacher:
    """A random tiny UNet2DConditionModel (fixed seed) as a pixel teacher; `output` is the network's own
    guided prediction (eps or v), the thing diffusers' schedulers step on."""

    channels, resolution, dtype, device = 3, 8, torch.float32, torch.device("cpu")

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        torch.manual_seed(0)
        self.network = UNet2DConditionModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2).eval().requires_grad_(False)
        self.schedule = NoiseSchedule(alphas_cumprod.clone())
        self.prediction_type = prediction_type

    def encode_prompt(self, prompts, negative=None):
        def embed(text):
            g = torch.Generator().manual_seed(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16))
            return torch.randn(4, 8, generator=g)

        negative = negative or [""] * len(prompts)
        return Cond(list(prompts), torch.stack([embed(p) for p in prompts]), torch.stack([embed(n) for n in negative]))

    def output(self, x, t, cond, guidance_scale):
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        if guidance_scale == 1:
            return self.network(x, t, cond.cond).sample
        out = self.network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond.uncond, cond.cond])).sample
        out_u, out_c = out.chunk(2)
        return cfg_combine(out_u, out_c, guidance_scale)

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        return self.schedule.to_eps(x_t, self.output(x_t, t, cond, guidance_scale), t, self.prediction_type)

    def encode(self, images):
        return images * 2 - 1

    def decode(self, x):
        return model_to_pixels(x)


_TEACHERS = {}


def unet_teacher(prediction_type):
    if prediction_type not in _TEACHERS:
        alphas = DDIMScheduler(**SD_BETAS).alphas_cumprod
        _TEACHERS[prediction_type] = UNetTeacher(alphas, prediction_type)
    return _TEACHERS[prediction_type]


PROMPTS = ["a red cube", "a blue ball"]
GUIDANCE = 3.0


def start(teacher, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(PROMPTS), teacher.channels, teacher.resolution, teacher.resolution, generator=g)
    return g, x_T


def assert_close(ours, ref, rtol=1e-5):
    """Max error relative to the largest value: the float32 arithmetic of diffusers' step against ours in
    float64, carried through the network for every step."""
    ours, ref = ours.double(), ref.double()
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < rtol, f"relative max error {err:.2e}"


# --- timestep grids ----------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 5, 7, 10, 25, 48, 50, 333])
def test_grids_match_diffusers(spacing, steps):
    offset = 1 if spacing == "leading" else 0
    ddim = DDIMScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(steps)
    assert ddim_timesteps(1000, steps, spacing, offset) == ddim.timesteps.tolist()
    dpm = DPMSolverMultistepScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=offset)
    dpm.set_timesteps(steps)
    assert dpm_timesteps(1000, steps, spacing, offset) == dpm.timesteps.tolist()


def test_grid_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="spacing 'uniform'.*leading, trailing, linspace"):
        ddim_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps must be .* 1 to 1000, got 0"):
        dpm_timesteps(1000, 0)
    with pytest.raises(ValueError, match="unknown solver 'euler': allowed are ddim, dpmpp-2m, dpmpp-3m, heun"):
        sample(unet_teacher("epsilon"), None, "euler")
    assert karras_timesteps(DDIMScheduler(**SD_BETAS).alphas_cumprod, 10)[0] == 999  # SD's sigma_max 14.6 < 80
    cosine = NoiseSchedule.cosine()
    grid = karras_timesteps(cosine.alphas_cumprod, 10)
    assert 70 < cosine.sigma(torch.tensor(grid[0])) < 90 and grid[-1] == 0 and grid == sorted(grid, reverse=True)
    with pytest.raises(ValueError, match="spacing 'uniform' for heun: allowed are karras, leading"):
        heun_sample(unet_teacher("epsilon"), None, 10, spacing="uniform")


# --- against diffusers -----------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps,eta", [("leading", 10, 0.0), ("trailing", 5, 0.0), ("trailing", 7, 0.0),
                                               ("linspace", 25, 0.0), ("leading", 10, 0.7), ("trailing", 25, 1.0)])
def test_ddim_matches_diffusers(prediction_type, spacing, steps, eta):
    teacher = unet_teacher(prediction_type)
    cond = teacher.encode_prompt(PROMPTS)
    offset = 1 if spacing == "leading" else 0
    scheduler = DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing,
                              steps_offset=offset, clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    g, x = start(teacher)
    for t in scheduler.timesteps:
        x = scheduler.step(teacher.output(x, t, cond, GUIDANCE), t, x, eta=eta, generator=g).prev_sample
    # "ratio" is DDIMScheduler's step to t - T // steps; "next" (our default) is the same on evenly spaced grids.
    ours = ddim_sample(teacher, cond, steps, GUIDANCE, torch.Generator().manual_seed(0), eta=eta, spacing=spacing,
                       steps_offset=offset, prev_timestep="ratio")
    assert_close(ours.x, x)
    assert ours.nfe == 2 * steps and ours.timesteps == scheduler.timesteps.tolist()
    again = ddim_sample(teacher, cond, steps, GUIDANCE, torch.Generator().manual_seed(0), eta=eta, spacing=spacing,
                        steps_offset=offset)
    evenly_spaced = spacing == "leading" or (spacing == "trailing" and 1000 % steps == 0)
    assert torch.equal(again.x, ours.x) == evenly_spaced


@pytest.mark.parametrize("clipped_eps", [False, True])
def test_ddim_clip_and_final_alpha_match_diffusers(clipped_eps):
    teacher = unet_teacher("epsilon")
    cond = teacher.encode_prompt(PROMPTS)
    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="leading", clip_sample=True, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    _, x = start(teacher)
    clipped = False
    for t in scheduler.timesteps:
        step = scheduler.step(teacher.output(x, t, cond, GUIDANCE), t, x, use_clipped_model_output=clipped_eps)
        clipped |= bool((step.pred_original_sample.abs() == 1).any())
        x = step.prev_sample
    assert clipped  # the clamp is exercised
    _, x_T = start(teacher)
    ours = ddim_sample(teacher, cond, 10, GUIDANCE, x_T=x_T, spacing="leading", clip_x0=True, clipped_eps=clipped_eps,
                       final_alpha_one=False)
    # A clamped x0 with the raw eps takes the state off the line x = a x0 + b eps, so float32-vs-float64
    # differences are no longer damped: measured 4e-5 here against 3e-6 with clipped_eps and < 1e-6 unclipped.
    assert_close(ours.x, x, rtol=1e-5 if clipped_eps else 1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("spacing,steps", [("linspace", 5), ("trailing", 10), ("leading", 25), ("trailing", 16)])
def test_dpmpp_matches_diffusers(prediction_type, order, spacing, steps):
    teacher = unet_teacher(prediction_type)
    cond = teacher.encode_prompt(PROMPTS)
    offset = 1 if spacing == "leading" else 0
    scheduler = DPMSolverMultistepScheduler(**SD_BETAS, prediction_type=prediction_type, solver_order=order,
                                            timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    _, x = start(teacher)
    for t in scheduler.timesteps:
        x = scheduler.step(teacher.output(x, t, cond, GUIDANCE), t, x).prev_sample
    _, x_T = start(teacher)
    fn = dpmpp_2m_sample if order == 2 else dpmpp_3m_sample
    ours = fn(teacher, cond, steps, GUIDANCE, x_T=x_T, spacing=spacing, steps_offset=offset)
    assert_close(ours.x, x)
    assert ours.nfe == 2 * steps
    assert torch.allclose(ours.images, ((x + 1) / 2).clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_heun_matches_diffusers(prediction_type, spacing):
    teacher = unet_teacher(prediction_type)
    cond = teacher.encode_prompt(PROMPTS)
    offset = 1 if spacing == "leading" else 0
    scheduler = HeunDiscreteScheduler(**SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing,
                                      steps_offset=offset)
    scheduler.set_timesteps(6)
    _, x_T = start(teacher)
    # Our z starts at sqrt(1 + sigma_max^2) x_T; diffusers does that for "leading" only (init_noise_sigma).
    x = x_T * (scheduler.sigmas.max() ** 2 + 1) ** 0.5
    if spacing == "leading":
        assert torch.allclose(x, x_T * scheduler.init_noise_sigma)
    for t in scheduler.timesteps:
        x = scheduler.step(teacher.output(scheduler.scale_model_input(x, t), t, cond, GUIDANCE), t, x).prev_sample
    ours = heun_sample(teacher, cond, 6, GUIDANCE, x_T=x_T, spacing=spacing, steps_offset=offset)
    assert_close(ours.x, x)
    assert ours.nfe == 2 * (2 * 6 - 1) == 2 * len(scheduler.timesteps)


def test_nfe_and_dispatch():
    teacher = unet_teacher("epsilon")
    cond = teacher.encode_prompt(PROMPTS)
    for solver in ("ddim", "dpmpp-2m", "dpmpp-3m"):
        assert sample(teacher, cond, solver, 10, 3.0, torch.Generator().manual_seed(0)).nfe == 20
        assert sample(teacher, cond, solver, 10, 1.0, torch.Generator().manual_seed(0)).nfe == 10
    assert sample(teacher, cond, "heun", 10, 3.0, torch.Generator().manual_seed(0)).nfe == 38
    # Same seed, same samples; the result is decoded images in [0, 1] and the model-space sample.
    a = sample(teacher, cond, "dpmpp-2m", 4, 2.0, torch.Generator().manual_seed(5))
    b = dpmpp_2m_sample(teacher, cond, 4, 2.0, torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x) and a.images.shape == (2, 3, 8, 8) and 0 <= a.images.min() <= a.images.max() <= 1
    assert set(SOLVERS) == {"ddim", "dpmpp-2m", "dpmpp-3m", "heun"}
    with pytest.raises(ValueError, match="x_T has shape"):
        ddim_sample(teacher, cond, 2, x_T=torch.zeros(1, 3, 8, 8))


# --- closed form: Gaussian data ----------------------------------------------------------------

class GaussianTeacher:
    """Data N(mu, s^2 I): the exact eps predictor E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2)."""

    channels, resolution, dtype, device, network = 3, 8, torch.float64, torch.device("cpu"), None

    def __init__(self, schedule="cosine", mu=0.3, s=0.5):
        self.mu, self.s = mu, s
        self.schedule = getattr(NoiseSchedule, schedule)()

    def _ab(self, t):
        abar = self.schedule.alphas_cumprod.double()[t]
        return abar.sqrt().reshape(-1, 1, 1, 1), (1 - abar).sqrt().reshape(-1, 1, 1, 1)

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        a, b = self._ab(t)
        return b * (x_t.double() - a * self.mu) / (a ** 2 * self.s ** 2 + b ** 2)

    def exact(self, x_T, t0, t1):
        """The exact probability-flow ODE from t0 to t1 (the monotone affine map between the Gaussian
        marginals), then E[x0 | x_t1]: what every sampler here converges to, since its last step
        (to sigma = 0 / abar = 1) returns the predicted x0 at the grid's last timestep."""
        (a0, b0), (a1, b1) = self._ab(t0), self._ab(t1)
        mu, s = self.mu, self.s
        x1 = a1 * mu + (a1 ** 2 * s ** 2 + b1 ** 2).sqrt() * (x_T.double() - a0 * mu) / (a0 ** 2 * s ** 2 + b0 ** 2).sqrt()
        return mu + a1 * s ** 2 * (x1 - a1 * mu) / (a1 ** 2 * s ** 2 + b1 ** 2)

    def decode(self, x):
        return model_to_pixels(x)


GAUSS_COND = Cond([""] * 64, None, None)


def gaussian_error(teacher, solver, grid, **options):
    x_T = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample(teacher, GAUSS_COND, solver, len(grid), 1.0, x_T=x_T, timesteps=grid, **options)
    return (out.x.double() - teacher.exact(x_T, grid[0], grid[-1])).abs().max().item()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_gaussian_data_convergence_orders(schedule):
    """Against the exact ODE: DDIM is first order, DPM-Solver++ 2M second, 3M and Heun at least second."""
    teacher = GaussianTeacher(schedule)
    coarse, fine = list(range(999, 48, -50)), list(range(999, 48, -5))  # 20 and 191 steps
    ddim = gaussian_error(teacher, "ddim", coarse), gaussian_error(teacher, "ddim", fine)
    dpm2 = gaussian_error(teacher, "dpmpp-2m", coarse), gaussian_error(teacher, "dpmpp-2m", fine)
    dpm3 = gaussian_error(teacher, "dpmpp-3m", fine)
    assert 5 < ddim[0] / ddim[1] < 20 and ddim[1] < 3e-2
    assert dpm2[0] / dpm2[1] > 25 and dpm2[1] < 1e-3 and dpm3 < 3e-4
    # Heun on its default Karras grid (sigma_max 80): second order, 2 * steps - 1 calls.
    heun = [gaussian_error(teacher, "heun", karras_timesteps(teacher.schedule.alphas_cumprod, n)) for n in (20, 40)]
    assert heun[0] / heun[1] > 3 and heun[1] < 3e-2


@pytest.mark.parametrize("steps", [20, 25])
def test_gaussian_data_dpmpp_2m_moments(steps):
    teacher = GaussianTeacher("cosine", mu=0.3, s=0.5)
    out = sample(teacher, GAUSS_COND, "dpmpp-2m", steps, 1.0, torch.Generator().manual_seed(0))
    assert abs(out.x.mean().item() - teacher.mu) < 0.02 and abs(out.x.std().item() / teacher.s - 1) < 0.02
    x_T = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (out.x.double() - teacher.exact(x_T, out.timesteps[0], out.timesteps[-1])).abs().max() < 3e-2


# --- the embedded teacher's original DDIM ------------------------------------------------------

def legacy_ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """sds3d/teachers/embedded.py before solvers.py, verbatim."""
    ts = torch.linspace(num_train_timesteps, 0, steps + 1)[:-1].round().long() - 1
    return [int(t) for t in ts.clamp(0, num_train_timesteps - 1)]


@torch.no_grad()
def legacy_ddim_sample(teacher, cond, steps=50, guidance=3.0, generator=None, eta=0.0, x_T=None, clip_x0=True,
                       timesteps=None):
    """sds3d/teachers/embedded.py's ddim_sample before solvers.py, verbatim (+ `timesteps` to test other grids)."""
    schedule = teacher.schedule
    b = len(cond.prompts)
    shape = (b, teacher.channels, teacher.resolution, teacher.resolution)
    x = torch.randn(shape, generator=generator) if x_T is None else x_T.clone()
    x = x.to(teacher.device, torch.float32)
    ts = timesteps or legacy_ddim_timesteps(schedule.num_train_timesteps, steps)
    abar = schedule.alphas_cumprod.double()
    for i, t in enumerate(ts):
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        eps = teacher.predict_eps(x, tt, cond, guidance).float()
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        direction = (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps.double()
        x = a_prev.sqrt() * x0 + direction
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(shape, generator=generator).to(x.device, torch.float64)
        x = x.float()
    return teacher.decode(x)


def test_embedded_teacher_ddim_is_reproduced_exactly():
    from sds3d.teachers.embedded import EmbeddedTeacher
    from sds3d.teachers.unet import LeanUNet, NetConfig
    from sds3d.diffusion.schedule import make_schedule
    from tiny_teachers import HashText

    torch.manual_seed(0)
    net = LeanUNet(NetConfig(resolution=16, channels=(16, 32), attention_levels=(1,), emb_dim=32, head_dim=16))
    torch.nn.init.normal_(net.conv_out.weight, std=0.3)  # zero-initialized for training; random here, so clipping bites
    teacher = EmbeddedTeacher(net, make_schedule("cosine"), "v_prediction", text_encoder=HashText())
    cond = teacher.encode_prompt(["a red cube", "a snowman"])
    # Published figures: DDIM-25 (training's periodic eval) and DDIM-50 (`teacher eval`); grids identical.
    for steps in (25, 50, 4, 7):
        assert ddim_timesteps(1000, steps, "trailing") == legacy_ddim_timesteps(1000, steps)
    for steps in (4, 25):
        old = legacy_ddim_sample(teacher, cond, steps, 3.0, torch.Generator().manual_seed(1))
        new = ddim_sample(teacher, cond, steps, 3.0, torch.Generator().manual_seed(1), spacing="trailing", clip_x0=True)
        assert torch.equal(new.images, old)
    # The old grid rounded .5 ties through float32 (111 of 1000 step counts differ by one timestep from
    # diffusers' "trailing", e.g. 48): custom timesteps reproduce it there too.
    old_grid = legacy_ddim_timesteps(1000, 48)
    assert old_grid != ddim_timesteps(1000, 48, "trailing")
    old = legacy_ddim_sample(teacher, cond, 48, 3.0, torch.Generator().manual_seed(2), timesteps=old_grid)
    new = ddim_sample(teacher, cond, 48, 3.0, torch.Generator().manual_seed(2), timesteps=old_grid, clip_x0=True)
    assert torch.equal(new.images, old)


# --- the command line --------------------------------------------------------------------------

def test_teacher_sample_cli(capsys, tmp_path):
    from sds3d.cli import main
    from sds3d.teachers.embedded import ASSET_DIR

    if not (ASSET_DIR / "model.safetensors").exists():
        pytest.skip("no shipped teacher weights")
    out = tmp_path / "samples"
    args = ["teacher", "sample", "a red cube", "--steps", "2", "--num-images", "1", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "NFE 4" in printed[0]
    files = sorted(out.glob("*.png"))
    assert len(files) == 1
    before = files[0].read_bytes()
    assert main(args) == 2  # same names: refused, nothing overwritten
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already" in err[0] and files[0].read_bytes() == before
    assert main(["teacher", "sample", "a red cube", "--solver", "euler", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "euler" in err[0] and "dpmpp-2m" in err[0]
