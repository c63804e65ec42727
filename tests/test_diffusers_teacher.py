"""DiffusersTeacher on tiny pipelines built offline (tests/tiny_sd.py), checked against diffusers' own components.

References are independent of the teacher's code: a separately loaded pipeline's `encode_prompt`, `unet`, `vae`
and `scheduler`, with guidance and the v -> eps conversion written out here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_sd import build_tiny_if_pipeline, build_tiny_sd_pipeline  # noqa: E402

from sds3d.distill.score import sds_loss  # noqa: E402
from sds3d.diffusion.schedule import NoiseSchedule
from sds3d.diffusion.protocol import Teacher  # noqa: E402
from sds3d.teachers.diffusers import DiffusersTeacher, TeacherLoadError, load_diffusers_teacher  # noqa: E402

PROMPTS = ["a red cube", "a blue ball on a table"]


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"epsilon": build_tiny_sd_pipeline(root / "sd-eps", "epsilon", seed=0),
            "v_prediction": build_tiny_sd_pipeline(root / "sd-v", "v_prediction", seed=1)}


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
    return build_tiny_if_pipeline(tmp_path_factory.mktemp("tiny-if") / "if")


def reference_pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def noisy_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.tensor([50, 700])


# --- loading ---------------------------------------------------------------------------------

def test_load_by_path_fields(sd_folders):
    folder = sd_folders["epsilon"]
    teacher = load_diffusers_teacher(str(folder), vae_resolution=16)
    ref = reference_pipeline(folder)
    assert isinstance(teacher, Teacher)
    assert (teacher.kind, teacher.resolution, teacher.channels) == ("latent", 8, 4)
    assert teacher.dtype == torch.float32 and teacher.device == torch.device("cpu")
    assert teacher.prediction_type == "epsilon" and teacher.network is teacher.unet
    torch.testing.assert_close(teacher.schedule.alphas_cumprod, ref.scheduler.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(teacher.schedule.alphas_cumprod, NoiseSchedule.scaled_linear().alphas_cumprod)
    for module in (teacher.unet, teacher.vae, teacher.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    again = DiffusersTeacher.from_pretrained(folder, vae_resolution=32)
    assert again.resolution == 16 and again.vae_resolution == 32


# --- guided prediction against the pipeline's own unet -----------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_eps_matches_pipeline_unet(sd_folders, prediction_type):
    folder = sd_folders[prediction_type]
    teacher = load_diffusers_teacher(folder, vae_resolution=16)
    assert teacher.prediction_type == prediction_type
    ref = reference_pipeline(folder)
    x_t, t = noisy_inputs((2, 4, 8, 8))
    abar = ref.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)

    def to_eps(out):
        return out if prediction_type == "epsilon" else abar.sqrt() * out + (1 - abar).sqrt() * x_t

    for negative in (None, ["blue"]):
        with torch.no_grad():
            cond_emb, uncond_emb = ref.encode_prompt(PROMPTS, "cpu", 1, True,
                                                     negative_prompt=None if negative is None else negative * 2)
            out = ref.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond_emb, cond_emb])).sample
            out_u, out_c = out.chunk(2)
            cond = teacher.encode_prompt(PROMPTS, negative=negative)
            torch.testing.assert_close(cond.cond, cond_emb)
            torch.testing.assert_close(cond.uncond, uncond_emb)
            for s in (7.5, 100.0):
                expected = to_eps(out_u + s * (out_c - out_u))
                torch.testing.assert_close(teacher.predict_eps(x_t, t, cond, s), expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(teacher.predict_eps(x_t, t, cond, 1.0), to_eps(out_c), rtol=1e-5, atol=1e-5)


def test_guidance_one_is_a_single_conditional_call(sd_folders):
    teacher = load_diffusers_teacher(sd_folders["epsilon"], vae_resolution=16)
    batches = []
    teacher.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    cond = teacher.encode_prompt(PROMPTS)
    x_t, t = noisy_inputs((2, 4, 8, 8))
    with torch.no_grad():
        teacher.predict_eps(x_t, t, cond, 1.0)
        teacher.predict_eps(x_t, t, cond, 7.5)
    assert batches == [2, 4]


# --- VAE -------------------------------------------------------------------------------------

def test_encode_decode_match_the_pipeline_vae(sd_folders):
    folder = sd_folders["epsilon"]
    teacher = load_diffusers_teacher(folder, vae_resolution=16)
    ref = reference_pipeline(folder)
    sf = ref.vae.config.scaling_factor
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.vae.encode(images * 2 - 1).latent_dist.mean * sf
        torch.testing.assert_close(teacher.encode(images), expected, rtol=1e-5, atol=1e-5)
        decoded = ((ref.vae.decode(expected / sf).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(teacher.decode(expected), decoded, rtol=1e-5, atol=1e-5)
        # renders at another size are resized bilinearly to vae_resolution first
        big = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
        up = F.interpolate(big, (16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(teacher.encode(big), ref.vae.encode(up * 2 - 1).latent_dist.mean * sf, rtol=1e-5, atol=1e-5)

    renders = torch.rand(2, 3, 8, 8, requires_grad=True)
    teacher.encode(renders).square().sum().backward()
    assert renders.grad is not None and torch.isfinite(renders.grad).all() and renders.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.vae.parameters())


# --- v-prediction and eps-prediction give the same SDS gradient -------------------------------

class EpsAsV(torch.nn.Module):
    """The same denoiser, reporting v = (eps - sqrt(1 - abar) x_t) / sqrt(abar) instead of eps."""

    def __init__(self, eps_unet, alphas_cumprod):
        super().__init__()
        self.inner, self.alphas_cumprod, self.config = eps_unet, alphas_cumprod, eps_unet.config

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        eps = self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        a = self.alphas_cumprod[timestep].reshape(-1, 1, 1, 1)
        return ((eps - (1 - a).sqrt() * sample) / a.sqrt(),)


def test_v_and_eps_teachers_give_the_same_sds_gradient(sd_folders):
    from diffusers import DDIMScheduler

    pipe = reference_pipeline(sd_folders["epsilon"])
    eps_teacher = DiffusersTeacher(pipe, vae_resolution=16)
    v_pipe = reference_pipeline(sd_folders["epsilon"])
    v_pipe.scheduler = DDIMScheduler.from_config(v_pipe.scheduler.config, prediction_type="v_prediction")
    v_teacher = DiffusersTeacher(v_pipe, vae_resolution=16)
    assert v_teacher.prediction_type == "v_prediction"
    v_teacher.network = EpsAsV(v_teacher.unet, v_pipe.scheduler.alphas_cumprod)

    renders = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for teacher in (eps_teacher, v_teacher):
        images = renders.clone().requires_grad_(True)
        out = sds_loss(teacher, images, teacher.encode_prompt(PROMPTS), guidance_scale=100.0,
                       timesteps=torch.tensor([100, 900]), noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)))
        out.loss.backward()
        grads.append(images.grad.flatten())
    cosine = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.9999 and grads[0].norm() > 0
    torch.testing.assert_close(grads[1].norm(), grads[0].norm(), rtol=1e-3, atol=0)


# --- DeepFloyd IF stage I (pixel space, learned variance) ------------------------------------

def test_if_stage_one_pixel_teacher(if_folder):
    teacher = load_diffusers_teacher(if_folder)
    ref = reference_pipeline(if_folder)
    assert (teacher.kind, teacher.resolution, teacher.channels, teacher.prediction_type) == ("pixel", 16, 3, "epsilon")
    assert ref.unet.config.out_channels == 6
    torch.testing.assert_close(teacher.schedule.alphas_cumprod, ref.scheduler.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(teacher.schedule.alphas_cumprod, NoiseSchedule.cosine().alphas_cumprod)

    prompts = ["A Red Cube ", "a blue ball"]  # IF lower-cases and strips, like its pipeline
    x_t, t = noisy_inputs((2, 3, 16, 16), seed=1)
    with torch.no_grad():
        cond_emb, uncond_emb = ref.encode_prompt(prompts, do_classifier_free_guidance=True, device="cpu")
        out = ref.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond_emb, cond_emb])).sample
        eps_u, eps_c = out[:, :3].chunk(2)
        cond = teacher.encode_prompt(prompts)
        torch.testing.assert_close(cond.cond, cond_emb)
        torch.testing.assert_close(teacher.predict_eps(x_t, t, cond, 20.0), eps_u + 20.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)

    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    x = teacher.encode(images)
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    x.sum().backward()
    assert images.grad.abs().sum() > 0
    torch.testing.assert_close(teacher.decode(x.detach()), (x.detach() + 1) / 2)


# --- prompt cache ----------------------------------------------------------------------------

def test_prompt_cache_calls_the_text_encoder_once_per_string(sd_folders):
    teacher = load_diffusers_teacher(sd_folders["epsilon"], vae_resolution=16)
    batches = []
    teacher.text_encoder.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    first = teacher.encode_prompt(["a red cube"])
    second = teacher.encode_prompt(["a red cube"])
    assert batches == [2]  # "a red cube" and the unconditional "" in one call, none the second time
    assert torch.equal(first.cond, second.cond) and torch.equal(first.uncond, second.uncond)
    teacher.encode_prompt(["a red cube", "a green cone"])
    assert batches == [2, 1]


# --- errors ----------------------------------------------------------------------------------

def one_line_error(spec, match):
    with pytest.raises(TeacherLoadError, match=match) as info:
        load_diffusers_teacher(spec)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_errors_are_one_clear_line(tmp_path, monkeypatch):
    one_line_error("/no/such/dir", "does not exist")
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "notapipe" / "config.json").write_text("{}")
    assert "model_index.json" in one_line_error(str(tmp_path / "notapipe"), "not a diffusers pipeline")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    one_line_error(str(tmp_path / "weights.safetensors"), "is a file")
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert "StableDiffusionPipeline" in one_line_error(str(tmp_path / "sdxl"), "not supported")
    one_line_error("embeddd", "unknown teacher")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error("sds3d-tests/no-such-pipeline", "cannot fetch")
    assert "HF_HUB_OFFLINE" in message and "download" in message and "local" in message


def test_cli_reports_a_bad_teacher_in_one_line(capsys, tmp_path, monkeypatch):
    from sds3d.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["generate", "a red cube", "--teacher", "/no/such/dir", "--out", str(tmp_path / "run"), "--quiet",
                 "--no-eval", "--encoding-backend", "torch", "--preset", "smoke"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "/no/such/dir" in err[0]


def test_config_accepts_a_path_or_hub_id_but_not_an_empty_teacher():
    from sds3d.config import ConfigError, make_config

    assert make_config("cpu-fast", prompt="a", teacher="stabilityai/stable-diffusion-2-1-base").teacher.startswith("stab")
    with pytest.raises(ConfigError, match="teacher"):
        make_config("cpu-fast", prompt="a", teacher="  ")


def test_generate_runs_a_diffusers_teacher_at_its_native_size(sd_folders):
    """A run's config leaves vae_resolution at null, so the teacher is the pipeline's own size (the
    tiny pipeline's UNet sample_size times the VAE factor), not Stable Diffusion's 512."""
    from sds3d.config import make_config
    from sds3d.pipelines.text_to_3d import make_teacher

    config = make_config("smoke", prompt="a red cube", teacher=str(sd_folders["epsilon"]))
    assert config.vae_resolution is None
    teacher = make_teacher(config)
    unet_size = teacher.network.config.sample_size
    assert teacher.resolution == unet_size and teacher.vae_resolution == unet_size * teacher.vae_scale_factor
    assert teacher.vae_resolution < 512
