"""`generate` with every loss (sds, vsd, nfsd) and with a diffusers teacher built offline in the test."""

import pytest
import torch

from sds3d.config import ConfigError, make_config
from sds3d.pipelines.text_to_3d import generate, make_field

from tiny_sd import build_tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", prediction_type="v_prediction")


def tiny_run(teacher, loss, steps=4, **overrides):
    # 16 px renders into the tiny VAE's 16 px input (8x8 latents); a small field keeps this fast
    values = dict(prompt="a red cube", teacher=str(teacher), loss=loss, steps=steps, render_resolution=16,
                  vae_resolution=16, num_samples=16, checkpoint_every=2, preview_every=2)
    values.update(overrides)
    return make_config("smoke", **values)


def initial_field(config):
    torch.manual_seed(config.seed)
    return make_field(config).state_dict()


def checkpoint(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def changed(state, reference):
    return any(not torch.equal(state[k], v) for k, v in reference.items())


@pytest.mark.parametrize("loss", ["sds", "vsd", "nfsd"])
def test_every_loss_trains_the_field_on_a_diffusers_teacher(tmp_path, tiny_sd, loss):
    config = tiny_run(tiny_sd, loss)
    assert config.guidance_scale == (100.0 if loss == "sds" else 7.5)  # Stable Diffusion's defaults per loss
    generate(config, out=tmp_path / "run", show_progress=False, evaluate=False)
    state = checkpoint(tmp_path / "run")
    assert state["step"] == 4
    assert changed(state["field"], initial_field(config))
    assert all(torch.isfinite(v).all() for v in state["field"].values())
    assert (tmp_path / "run" / "mesh.glb").exists()
    if loss == "vsd":
        lora = state["lora"]
        assert lora and all("lora_" in k or "class_embedding" in k for k in lora)  # only trained tensors are saved
        assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # LoRA B starts at 0 and moved
    else:
        assert "lora" not in state


def test_vsd_resume_restores_the_lora_exactly(tmp_path):
    """VSD with the embedded teacher: a run stopped at its step-2 checkpoint and resumed ends bit-equal
    to an uninterrupted one, LoRA and its optimizer included."""
    config = tiny_run("embedded", "vsd", steps=4, render_resolution=32)

    class Stop(Exception):
        pass

    def stop_at_two(event):
        if event.step == 2:
            raise Stop

    generate(config, out=tmp_path / "straight", show_progress=False, evaluate=False)
    with pytest.raises(Stop):
        generate(config, out=tmp_path / "resumed", callback=stop_at_two, show_progress=False, evaluate=False)
    generate(config, out=tmp_path / "resumed", resume=True, show_progress=False, evaluate=False)
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    for part in ("field", "lora"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")


def test_nfsd_and_vsd_refuse_the_oracle():
    for loss in ("vsd", "nfsd"):
        with pytest.raises(ConfigError, match="network teacher"):
            make_config("smoke", prompt="a red cube", teacher="oracle", loss=loss)
    with pytest.raises(ConfigError, match="allowed are sds, vsd, nfsd"):
        make_config("smoke", prompt="a red cube", loss="sjc")
