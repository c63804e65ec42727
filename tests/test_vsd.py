"""NFSD against a closed-form teacher; VSD's LoRA network, its training loss and the VSD gradient on tiny UNets."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from sds3d.distill.lora import make_lora_network, make_lora_optimizer
from sds3d.distill.score import (NFSD_NEGATIVE_PROMPT, NonFiniteGradientError, drop_camera, lora_diffusion_loss,
                                 nfsd_loss, sds_loss, vsd_loss)
from sds3d.diffusion.protocol import Cond, cfg_combine, model_to_pixels, pixels_to_model
from sds3d.diffusion.schedule import NoiseSchedule

T = 1000


# --- NFSD on a closed-form teacher -----------------------------------------------------------

def toy_eps(x_t, t, emb):
    """A known eps 'network': depends on x_t, t and a (B, 4) prompt embedding."""
    scale = (1 + t.float() / T).reshape(-1, 1, 1, 1)
    return torch.tanh(x_t * scale) * (1 + emb[:, :1, None, None]) + emb[:, 1:, None, None]


class ToyTeacher:
    """Identity encode, eps = toy_eps, diffusers CFG."""

    channels, resolution, dtype, device, network = 3, 4, torch.float32, torch.device("cpu"), None

    def __init__(self):
        self.schedule = NoiseSchedule.linear(T)
        self.calls = 0

    def encode(self, images):
        return images

    def decode(self, x):
        return x

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        self.calls += 1
        eps_c = toy_eps(x_t, t, cond.cond)
        return eps_c if guidance_scale == 1.0 else cfg_combine(toy_eps(x_t, t, cond.uncond), eps_c, guidance_scale)


def nfsd_reference(x_t, t, y, neg, null, s):
    """Katzir et al.: w(t) (delta_D + s delta_C), computed prompt by prompt."""
    e_y, e_neg, e_null = toy_eps(x_t, t, y), toy_eps(x_t, t, neg), toy_eps(x_t, t, null)
    delta_c = e_y - e_null
    delta_d = torch.where((t < 200).reshape(-1, 1, 1, 1), e_null, e_null - e_neg)
    w = (1 - NoiseSchedule.linear(T).abar(t)).reshape(-1, 1, 1, 1)
    return w * (delta_d + s * delta_c)


def test_nfsd_gradient_is_the_paper_formula_and_noise_free():
    teacher = ToyTeacher()
    g = torch.Generator().manual_seed(0)
    b = 4
    y, neg, null = (torch.randn(b, 4, generator=g) for _ in range(3))
    cond, null_cond = Cond(["p"] * b, y, neg), Cond([""] * b, null, null)
    t = torch.tensor([50, 199, 200, 800])
    images = torch.rand(b, 3, 4, 4, generator=g).requires_grad_(True)
    noise = torch.randn(b, 3, 4, 4, generator=g)
    out = nfsd_loss(teacher, images, cond, null_cond, guidance_scale=7.5, timesteps=t, noise=noise)
    out.loss.backward()
    x_t = teacher.schedule.add_noise(images.detach(), noise, t)
    expected = nfsd_reference(x_t, t, y, neg, null, 7.5)
    torch.testing.assert_close(images.grad * b, expected, atol=1e-5, rtol=1e-5)  # surrogate averages over the batch
    # rows below the threshold do not see the negative prompt, rows above do
    grad_without_neg = nfsd_reference(x_t, t, y, torch.zeros_like(neg), null, 7.5)
    assert torch.allclose(expected[:2], grad_without_neg[:2]) and not torch.allclose(expected[2:], grad_without_neg[2:])

    # another (image, noise) pair with the same x_t gives the same NFSD gradient; SDS's changes by w * d
    d = torch.randn(b, 3, 4, 4, generator=g)
    a = teacher.schedule.abar(t).reshape(-1, 1, 1, 1)
    images2 = (images.detach() - ((1 - a) / a).sqrt() * d).requires_grad_(True)
    noise2 = noise + d
    torch.testing.assert_close(teacher.schedule.add_noise(images2.detach(), noise2, t), x_t, atol=1e-5, rtol=1e-5)
    nfsd_loss(teacher, images2, cond, null_cond, guidance_scale=7.5, timesteps=t, noise=noise2).loss.backward()
    torch.testing.assert_close(images2.grad, images.grad, atol=1e-5, rtol=1e-4)
    sds = [images.detach().clone().requires_grad_(True), images2.detach().clone().requires_grad_(True)]
    for im, nz in zip(sds, (noise, noise2)):
        sds_loss(teacher, im, cond, guidance_scale=7.5, timesteps=t, noise=nz).loss.backward()
    torch.testing.assert_close((sds[0].grad - sds[1].grad) * b, (1 - a) * d, atol=1e-5, rtol=1e-4)

    # all timesteps early: the negative prompt is not evaluated (one guided teacher call)
    teacher.calls = 0
    nfsd_loss(teacher, images.detach(), cond, null_cond, timesteps=torch.tensor([10, 20, 30, 199]), noise=noise)
    assert teacher.calls == 1
    assert "out of focus" in NFSD_NEGATIVE_PROMPT and NFSD_NEGATIVE_PROMPT.endswith("gloomy")
    with pytest.raises(NonFiniteGradientError, match="NFSD"):
        nfsd_loss(teacher, torch.full((b, 3, 4, 4), float("nan")), cond, null_cond, timesteps=t, noise=noise)
    with pytest.raises(ValueError, match="negative prompt in cond.uncond"):
        nfsd_loss(teacher, images.detach(), Cond(["p"] * b, y, None), null_cond, timesteps=t, noise=noise)


# --- a tiny diffusers UNet behind the Teacher protocol ---------------------------------------

class UNetTeacher:
    """Pixel-space teacher around a diffusers UNet2DConditionModel (cond/uncond: (B, L, D) text states)."""

    channels, resolution, dtype, device = 3, 8, torch.float32, torch.device("cpu")

    def __init__(self, unet, prediction_type="epsilon"):
        self.network = unet.eval().requires_grad_(False)
        self.prediction_type = prediction_type
        self.schedule = NoiseSchedule.scaled_linear(T)

    def encode(self, images):
        return pixels_to_model(images, self.resolution)

    def decode(self, x):
        return model_to_pixels(x)

    def raw(self, x_t, t, text):
        return self.network(x_t, t, encoder_hidden_states=text, class_labels=None).sample

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        out_c = self.raw(x_t, t, cond.cond)
        out = out_c if guidance_scale == 1.0 else cfg_combine(self.raw(x_t, t, cond.uncond), out_c, guidance_scale)
        return self.schedule.to_eps(x_t, out, t, self.prediction_type)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=4)


def setup(prediction_type="epsilon", b=2, seed=0):
    teacher = UNetTeacher(tiny_unet(seed), prediction_type)
    g = torch.Generator().manual_seed(seed + 1)
    cond = Cond(["p"] * b, torch.randn(b, 4, 32, generator=g), torch.randn(b, 4, 32, generator=g))
    c2w = torch.randn(b, 4, 4, generator=g)
    images = torch.rand(b, 3, 8, 8, generator=g)
    return teacher, cond, c2w, images, g


def eps_by_hand(teacher, x_t, t, text):
    out = teacher.network(x_t, t, encoder_hidden_states=text).sample
    if teacher.prediction_type == "epsilon":
        return out
    a = teacher.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return a.sqrt() * out + (1 - a).sqrt() * x_t  # v -> eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fresh_lora_network_equals_teacher_and_vsd_is_zero(prediction_type):
    teacher, cond, c2w, images, g = setup(prediction_type)
    lora = make_lora_network(teacher, rank=4)
    lora_b = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert lora_b and all((p == 0).all() for p in lora_b)
    assert (lora.camera.linear_2.weight == 0).all() and (lora.camera.linear_2.bias == 0).all()
    assert lora.network.class_embedding is lora.camera and lora.prediction_type == prediction_type

    t = torch.tensor([100, 700])
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(lora(x_t, t, cond.cond, c2w), teacher.raw(x_t, t, cond.cond), atol=1e-6, rtol=1e-6)

    # teacher guidance 1: the VSD gradient vanishes at init
    x = images.clone().requires_grad_(True)
    vsd_loss(teacher, lora, x, cond, c2w, guidance_scale=1.0, generator=g).loss.backward()
    assert x.grad.abs().max() <= 1e-7
    # guidance 7.5 against the LoRA: w (eps_cfg - eps_cond), computed from the raw UNet. The LoRA's
    # guidance runs over the camera only (threestudio), and a fresh camera embedding is zero, so
    # lora_guidance_scale changes nothing at init (a text-CFG LoRA at 7.5 would cancel the teacher's)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        xt = teacher.schedule.add_noise(images * 2 - 1, noise, t)
        e_c, e_u = eps_by_hand(teacher, xt, t, cond.cond), eps_by_hand(teacher, xt, t, cond.uncond)
        w = (1 - teacher.schedule.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
        expected = w * (e_u + 7.5 * (e_c - e_u) - e_c)
    assert expected.abs().max() > 1e-3
    for lora_scale in (1.0, 7.5):
        x = images.clone().requires_grad_(True)
        vsd_loss(teacher, lora, x, cond, c2w, guidance_scale=7.5, lora_guidance_scale=lora_scale, timesteps=t,
                 noise=noise).loss.backward()
        torch.testing.assert_close(x.grad, 2 * expected / 2, atol=1e-5, rtol=1e-4)  # d/dimages = 2 d/dx; batch mean /2

    # the LoRA's own loss: MSE against eps or v (per prediction_type) of the detached encoded renders
    with torch.no_grad():
        x0, a = images * 2 - 1, teacher.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        by_hand = ((teacher.raw(xt, t, cond.cond) - target) ** 2).mean()
        torch.testing.assert_close(lora_diffusion_loss(teacher, lora, images, cond, c2w, camera_drop_prob=0.0,
                                                       timesteps=t, noise=noise), by_hand)

    # the camera reaches the network once its embedding is non-zero
    with torch.no_grad():
        torch.nn.init.normal_(lora.camera.linear_2.weight, std=0.5)
        assert (lora(x_t, t, cond.cond, c2w) - lora(x_t, t, cond.cond, torch.zeros_like(c2w))).abs().max() > 1e-4


def test_only_lora_and_camera_parameters_train_and_teacher_is_untouched():
    teacher, cond, c2w, images, g = setup("v_prediction", b=4)
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    lora = make_lora_network(teacher)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    camera = {id(p) for p in lora.camera.parameters()}
    assert {id(p) for p in lora.parameters() if p.requires_grad} == \
        camera | {id(p) for n, p in lora.named_parameters() if "lora_" in n}
    assert any("to_out.0.lora_A" in n for n in trainable) and any("attn2.to_k.lora_B" in n for n in trainable)
    assert not any(p.requires_grad for p in teacher.network.parameters())
    optimized = make_lora_optimizer(lora).param_groups[0]["params"]
    assert {id(p) for p in lora.trainable_parameters()} == {id(p) for p in optimized}
    n_frozen = sum(p.numel() for p in lora.parameters() if not p.requires_grad)
    assert n_frozen == sum(p.numel() for p in teacher.network.parameters())

    # the LoRA's own loss, trained on random t / noise; measured each step on a fixed held-out draw
    opt = make_lora_optimizer(lora, lr=1e-2)
    eval_g = torch.Generator().manual_seed(123)
    t_eval = torch.randint(0, T, (4,), generator=eval_g)
    noise_eval = torch.randn(4, 3, 8, 8, generator=eval_g)
    curve = []
    for _ in range(40):
        with torch.no_grad():
            curve.append(lora_diffusion_loss(teacher, lora, images, cond, c2w, camera_drop_prob=0.0,
                                             timesteps=t_eval, noise=noise_eval).item())
        opt.zero_grad()
        loss = lora_diffusion_loss(teacher, lora, images, cond, c2w, generator=g)
        loss.backward()
        opt.step()
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    print(f"LoRA loss (fixed eval draw) first10={first:.4f} last10={last:.4f}")
    assert last < 0.93 * first and max(curve[-10:]) < min(curve[:3]), curve
    assert (lora.camera.linear_2.weight != 0).any()
    for k, v in teacher.network.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_camera_dropout_rate_and_effect():
    camera = torch.ones(20000, 16)
    dropped = drop_camera(camera, 0.1, torch.Generator().manual_seed(0))
    rate = (dropped.abs().sum(1) == 0).float().mean().item()
    assert abs(rate - 0.1) < 0.01, rate
    assert ((dropped == 0) | (dropped == 1)).all() and ((dropped.sum(1) == 0) | (dropped.sum(1) == 16)).all()
    assert torch.equal(dropped, drop_camera(camera, 0.1, torch.Generator().manual_seed(0)))
    assert torch.equal(drop_camera(camera, 0.0), camera) and not drop_camera(camera, 1.0).any()
    with pytest.raises(ValueError, match="camera_drop_prob"):
        drop_camera(camera, 1.5)

    teacher, cond, c2w, images, g = setup()
    lora = make_lora_network(teacher)
    with torch.no_grad():
        torch.nn.init.normal_(lora.camera.linear_2.weight, std=0.5)
    t, noise = torch.tensor([300, 600]), torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        def loss(cam, p):
            return lora_diffusion_loss(teacher, lora, images, cond, cam, camera_drop_prob=p, timesteps=t,
                                       noise=noise).item()

        assert loss(c2w, 1.0) == pytest.approx(loss(torch.zeros_like(c2w), 0.0), abs=1e-7)
        assert abs(loss(c2w, 0.0) - loss(torch.zeros_like(c2w), 0.0)) > 1e-6


def test_vsd_refuses_teachers_without_a_usable_network():
    from sds3d.teachers.oracle import OracleTeacher

    oracle = OracleTeacher.from_banks({"a": torch.rand(2, 3, 8, 8) * 2 - 1})
    with pytest.raises(ValueError, match="OracleTeacher has none") as info:
        make_lora_network(oracle)
    assert "\n" not in str(info.value) and "VSD" in str(info.value)
    teacher, cond, c2w, images, _ = setup()
    lora = make_lora_network(teacher)
    with pytest.raises(ValueError, match="OracleTeacher has none"):
        vsd_loss(oracle, lora, images, oracle.encode_prompt(["a", "a"]), c2w)
    teacher.network = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="UNetTeacher has a Conv2d"):
        make_lora_network(teacher)
    with pytest.raises(ValueError, match="camera_dim=16"):
        vsd_loss(UNetTeacher(tiny_unet()), lora, images, cond, torch.zeros(2, 3, 4))


def test_vsd_optimizes_a_learnable_image():
    teacher, cond, c2w, images, g = setup(b=2)
    lora = make_lora_network(teacher)
    lora_opt = make_lora_optimizer(lora, lr=1e-3)
    logits = torch.nn.Parameter(torch.logit(images.clamp(0.05, 0.95)))
    start = logits.detach().clone()
    opt = torch.optim.Adam([logits], lr=1e-2)
    lora_start = [p.detach().clone() for p in lora.trainable_parameters()]
    for _ in range(5):
        out = vsd_loss(teacher, lora, torch.sigmoid(logits), cond, c2w, generator=g)
        lora_loss = lora_diffusion_loss(teacher, lora, None, cond, c2w, generator=g, encoded=out.encoded)
        opt.zero_grad(), lora_opt.zero_grad()
        (out.loss + lora_loss).backward()
        assert torch.isfinite(logits.grad).all() and torch.isfinite(lora_loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in lora.trainable_parameters())
        opt.step(), lora_opt.step()
    assert (logits.detach() - start).abs().max() > 1e-3
    assert any(not torch.equal(p, q) for p, q in zip(lora.trainable_parameters(), lora_start))
    assert all(torch.isfinite(p).all() for p in lora.parameters())
    with pytest.raises(NonFiniteGradientError, match="VSD"):
        vsd_loss(teacher, lora, torch.full_like(images, float("nan")), cond, c2w, generator=g)


# --- the embedded teacher's LeanUNet ---------------------------------------------------------

def lean_teacher(camera_dim, prediction_type="v_prediction", seed=0):
    """An EmbeddedTeacher around a tiny random LeanUNet; LeanUNet zero-inits its output layers,
    randomized here so that outputs are non-trivial."""
    from sds3d.teachers.embedded import EmbeddedTeacher
    from sds3d.teachers.unet import LeanUNet, NetConfig

    torch.manual_seed(seed)
    net = LeanUNet(NetConfig(resolution=8, channels=(16, 32), attention_levels=(1,), text_dim=8, emb_dim=32,
                             groups=4, head_dim=8, camera_dim=camera_dim))
    for p in net.parameters():
        if p.dim() > 1 and torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.05)
    return EmbeddedTeacher(net, NoiseSchedule.cosine(T), prediction_type, text_encoder=object())


@pytest.mark.parametrize("camera_dim", [0, 3])
def test_vsd_on_the_embedded_lean_unet(camera_dim):
    """Also for a camera-conditioned LeanUNet: the LoRA copy gives its own camera input the
    direction from c2w, as the teacher gets cond.extra["camera_dirs"], so a fresh LoRA is the teacher."""
    teacher = lean_teacher(camera_dim)
    net = teacher.network
    g = torch.Generator().manual_seed(0)
    cond = Cond(["p", "q"], torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g))
    c2w, images = torch.randn(2, 4, 4, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    directions = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1) if camera_dim else None
    if camera_dim:
        cond.extra["camera_dirs"] = directions
    lora = make_lora_network(teacher)
    assert lora.kind == "lean"
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert {id(p) for p in lora.parameters() if p.requires_grad} == \
        {id(p) for p in lora.camera.parameters()} | {id(p) for n, p in lora.named_parameters() if "lora_" in n}
    assert any("film.lora_A" in n for n in trainable) and any("qkv.lora_B" in n for n in trainable)
    t, x_t = torch.tensor([50, 900]), torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        reference = net(x_t, t, cond.cond, directions)
        assert reference.abs().max() > 1e-3
        if camera_dim:  # the camera matters to this network
            assert (net(x_t, t, cond.cond) - reference).abs().max() > 1e-4
        torch.testing.assert_close(lora(x_t, t, cond.cond, c2w), reference, atol=1e-6, rtol=1e-6)
    x = images.clone().requires_grad_(True)
    vsd_loss(teacher, lora, x, cond, c2w, guidance_scale=1.0, generator=g).loss.backward()
    assert x.grad.abs().max() < 1e-6
    opt = make_lora_optimizer(lora, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        lora_diffusion_loss(teacher, lora, images, cond, c2w, generator=g, camera_drop_prob=0.0).backward()
        opt.step()
    with torch.no_grad():
        assert (lora(x_t, t, cond.cond, c2w) - lora(x_t, t, cond.cond, torch.zeros_like(c2w))).abs().max() > 0
        torch.testing.assert_close(net(x_t, t, cond.cond, directions), reference)  # the teacher's network is untouched


@pytest.mark.parametrize("camera_dim,prediction_type", [(3, "v_prediction"), (0, "epsilon")])
def test_vsd_gradient_is_prolificdreamer_with_view_independent_lora_and_camera_guidance(camera_dim, prediction_type):
    """ProlificDreamer eq. (9) in threestudio's form, from direct network calls:
    w(t) (eps_teacher_cfg(y_view) - [eps_lora(y, 0) + s_l (eps_lora(y, c) - eps_lora(y, 0))]), w = 1 - abar,
    with a LoRA whose adapters and camera embedding are non-zero (a trained one)."""
    teacher = lean_teacher(camera_dim, prediction_type)
    net = teacher.network
    b, s, s_lora = 3, 7.5, 3.0
    g = torch.Generator().manual_seed(5)
    view_text, negative, plain_text = (torch.randn(b, 8, generator=g) for _ in range(3))
    c2w = torch.randn(b, 4, 4, generator=g)
    directions = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)
    cond = Cond(["a cube, front view"] * b, view_text, negative)
    if camera_dim:
        cond.extra["camera_dirs"] = directions
    lora_cond = Cond(["a cube"] * b, plain_text, None)  # the LoRA has no text guidance: no uncond needed
    lora = make_lora_network(teacher)
    with torch.no_grad():
        lora_b = [p for name, p in lora.named_parameters() if "lora_B" in name]
        for p in lora_b + list(lora.camera.linear_2.parameters()):
            torch.nn.init.normal_(p, std=0.3)
    images = torch.rand(b, 3, 8, 8, generator=g)
    t, noise = torch.tensor([30, 400, 870]), torch.randn(b, 3, 8, 8, generator=g)

    x = images.clone().requires_grad_(True)
    vsd_loss(teacher, lora, x, cond, c2w, guidance_scale=s, lora_guidance_scale=s_lora, timesteps=t, noise=noise,
             lora_cond=lora_cond).loss.backward()

    with torch.no_grad():
        a = NoiseSchedule.cosine(T).alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x0 = images * 2 - 1
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        def to_eps(out):  # v = sqrt(a) eps - sqrt(1 - a) x0  =>  eps = sqrt(a) v + sqrt(1 - a) x_t
            return out if prediction_type == "epsilon" else a.sqrt() * out + (1 - a).sqrt() * xt

        cam = directions if camera_dim else None
        teacher_c, teacher_u = net(xt, t, view_text, cam), net(xt, t, negative, cam)
        eps_teacher = to_eps(teacher_u + s * (teacher_c - teacher_u))
        lora_camera, lora_no_camera = lora(xt, t, plain_text, c2w), lora(xt, t, plain_text, torch.zeros_like(c2w))
        eps_lora = to_eps(lora_no_camera + s_lora * (lora_camera - lora_no_camera))
        expected = (1 - a) * (eps_teacher - eps_lora)
        # the pieces the formula distinguishes all matter here
        assert (lora_camera - lora_no_camera).abs().max() > 1e-2
        assert (lora(xt, t, view_text, c2w) - lora_camera).abs().max() > 1e-2
    torch.testing.assert_close(x.grad, 2 * expected / b, atol=1e-5, rtol=1e-4)  # d/dimages = 2 d/dx; batch mean

    # without lora_cond the LoRA reads the teacher's (view-dependent) text, which is another gradient
    x2 = images.clone().requires_grad_(True)
    vsd_loss(teacher, lora, x2, cond, c2w, guidance_scale=s, lora_guidance_scale=s_lora, timesteps=t,
             noise=noise).loss.backward()
    assert (x2.grad - x.grad).abs().max() > 1e-4

    # the LoRA's own loss reads lora_cond's text and the camera: by hand at t, noise (no dropout)
    with torch.no_grad():
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        by_hand = ((lora(xt, t, plain_text, c2w) - target) ** 2).mean()
        torch.testing.assert_close(lora_diffusion_loss(teacher, lora, images, lora_cond, c2w, camera_drop_prob=0.0,
                                                       timesteps=t, noise=noise), by_hand)
