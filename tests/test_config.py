import pytest
import torch

from sds3d.config import ConfigError, GenerateConfig, make_config
from sds3d.io import RunFolderError, prepare_run_folder


def test_yaml_round_trip(tmp_path):
    config = make_config("cpu-fast", prompt="a red cube", seed=3, elevation_range=(0.0, 30.0))
    config.save(tmp_path / "config.yaml")
    loaded = GenerateConfig.load(tmp_path / "config.yaml")
    assert loaded == config and loaded.elevation_range == (0.0, 30.0)


def test_unknown_field_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="^unknown setting warp_speed: "):
        GenerateConfig.from_dict({"prompt": "a", "warp_speed": 9})
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="not a mapping"):
        GenerateConfig.load(tmp_path / "bad.yaml")


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "mesh.glb").write_text("old")
    with pytest.raises(RunFolderError):
        prepare_run_folder(run)
    prepare_run_folder(run, overwrite=True)
    assert (tmp_path / "run.old-1" / "mesh.glb").read_text() == "old"
    assert run.exists() and not any(run.iterdir())
    with pytest.raises(RunFolderError, match="does not exist"):
        prepare_run_folder(tmp_path / "never-made", resume=True)


def test_teacher_defaults_sit_between_preset_and_overrides():
    default = make_config("cpu-fast", prompt="a")
    assert default.teacher == "embedded"
    assert default.random_background_prob == 0.0 and default.guidance_scale == 3.0
    oracle = make_config("cpu-fast", prompt="a", teacher="oracle")
    assert oracle.random_background_prob == 0.5 and oracle.guidance_scale == 1.0
    assert make_config("cpu-fast", prompt="a", teacher="oracle", guidance_scale=5.0).guidance_scale == 5.0


def test_device_and_backend_values():
    assert make_config("cpu-fast", prompt="a", encoding_backend="tcnn").encoding_backend == "tcnn"
    for bad, match in [(dict(device="gpu"), "allowed are auto, cpu, cuda"),
                       (dict(teacher="oracle", device="cuda"), "oracle teacher runs on the CPU"),
                       (dict(encoding_backend="fast"), "allowed are auto, cpp, torch, tcnn"),
                       (dict(coarse_fraction=1.5), "coarse_fraction")]:
        with pytest.raises(ConfigError, match=match):
            make_config("cpu-fast", prompt="a", **bad)


def test_auto_device_is_the_cpu_without_cuda_and_explicit_cuda_is_refused(monkeypatch):
    from sds3d.pipelines.text_to_3d import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_device(make_config("cpu-fast", prompt="a")).type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_device(make_config("cpu-fast", prompt="a", device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_device(make_config("cpu-fast", prompt="a")).type == "cuda"
    assert run_device(make_config("cpu-fast", prompt="a", teacher="oracle")).type == "cpu"  # the oracle is CPU-only
