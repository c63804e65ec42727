"""Our samplers on a (tiny) Stable Diffusion teacher reproduce diffusers' own StableDiffusionPipeline,
image for image, from the same initial latents: diffusers is the reference."""

import pytest
import torch

from sds3d.diffusion.solvers import sample
from sds3d.teachers.diffusers import load_diffusers_teacher

from tiny_sd import build_tiny_sd_pipeline

PROMPT = "a red cube"


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folder(request, tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe", prediction_type=request.param)


def pipeline_images(folder, scheduler_cls, latents, steps, guidance, **scheduler_options):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_options)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                    output_type="pt").images


@pytest.mark.parametrize("solver,steps", [("ddim", 10), ("dpmpp-2m", 8), ("dpmpp-3m", 12)])
def test_our_solvers_reproduce_the_stable_diffusion_pipeline(folder, solver, steps):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    teacher = load_diffusers_teacher(folder)
    assert teacher.resolution == 8  # the tiny pipeline's native size: 16 px images, 8x8 latents
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    guidance = 7.5
    config = teacher.pipeline.scheduler.config  # leading spacing, steps_offset 1, set_alpha_to_one False
    if solver == "ddim":
        reference = pipeline_images(folder, DDIMScheduler, latents, steps, guidance)
        ours = sample(teacher, teacher.encode_prompt([PROMPT]), "ddim", steps, guidance, x_T=latents,
                      spacing=config.timestep_spacing, steps_offset=config.steps_offset, prev_timestep="ratio",
                      final_alpha_one=config.set_alpha_to_one)
    else:
        order = 2 if solver == "dpmpp-2m" else 3
        reference = pipeline_images(folder, DPMSolverMultistepScheduler, latents, steps, guidance, solver_order=order)
        ours = sample(teacher, teacher.encode_prompt([PROMPT]), solver, steps, guidance, x_T=latents,
                      spacing=config.timestep_spacing, steps_offset=config.steps_offset)
    assert ours.nfe == 2 * steps  # a guided step is two network evaluations
    assert reference.shape == ours.images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours.images, reference.float(), atol=2e-5, rtol=1e-4)
    assert reference.std() > 0.01  # not a constant image
