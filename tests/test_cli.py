"""Bad input gets one clear error line and exit code 2; nothing a user made is lost."""

import pytest

from sds3d.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_empty_prompt(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "   ", "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "prompt" in err[0]
    assert not (tmp_path / "run").exists()


def test_unknown_prompt_names_nearest_known(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "a photograph of a giraffe", "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1
    assert "unknown prompt" in err[0] and "'a " in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,name", [("--steps", "-5", "steps"), ("--steps", "0", "steps"),
                                             ("--guidance-scale", "-1", "guidance_scale"),
                                             ("--preset", "turbo", "preset"),
                                             ("--distance-range", "1.0,1.2", "distance_range")])
def test_bad_values(capsys, tmp_path, flag, value, name):
    code, err = run_cli(capsys, "generate", "a red cube", flag, value, "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and name in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item,name", [("steps=many", "steps"), ("nosuch=1", "nosuch"), ("steps", "FIELD=VALUE"),
                                       ("steps=[1", "VALUE"), ("lambda_z_variance=-1", "lambda_z_variance"),
                                       ("oracle_camera_sigma=-5", "oracle_camera_sigma"),
                                       ("elevation_range=[60,-10]", "elevation_range")])
def test_bad_set_overrides(capsys, tmp_path, item, name):
    code, err = run_cli(capsys, "generate", "a red cube", "--set", item, "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and name in err[0]
    assert not (tmp_path / "run").exists()


def test_set_overrides_reach_the_config_and_refuse_resume(capsys, tmp_path):
    from sds3d.config import make_config, parse_overrides

    overrides = parse_overrides(["lambda_z_variance=250", "azimuth_range=[-90, 90]", "t_max_end=null", "teacher=oracle"])
    config = make_config("smoke", explicit=overrides, prompt="a red cube")
    assert config.lambda_z_variance == 250.0 and config.azimuth_range == (-90.0, 90.0) and config.t_max_end is None
    assert config.guidance_scale == 1.0  # the oracle's defaults still apply under --set teacher=oracle
    code, err = run_cli(capsys, "generate", "a red cube", "--resume", "--set", "steps=5", "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "--set" in err[0]


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    code, err = run_cli(capsys, "generate", "a red cube", "--out", str(blocker / "run"))
    assert code == 2 and len(err) == 1 and "not writable" in err[0]
    assert blocker.read_text() == "mine"


def test_existing_run_folder_is_kept(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("user data")
    code, err = run_cli(capsys, "generate", "a red cube", "--out", str(run))
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert (run / "precious.txt").read_text() == "user data"


def test_eval_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and len(err) == 1 and "not a finished run folder" in err[0]
