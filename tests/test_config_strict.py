"""One strict reader for every config (sds3d.settings): unknown keys are named (with the nearest
known one), values are checked against the field's type, old saved configs still load, and the
CLI's `--set` refuses mistakes with one error line before any run folder exists."""

import argparse
import json

import pytest
import yaml

from sds3d.config import ConfigError, GenerateConfig, make_config
from sds3d.settings import dataclass_from_dict, merge_settings, parse_set_items
from sds3d.teachers.embedded import ASSET_DIR
from sds3d.teachers.unet import LeanUNet, NetConfig
from sds3d.training.teacher import TrainConfig


# --- unknown keys ------------------------------------------------------------------------------

def test_unknown_nested_key_names_it_and_suggests_the_close_one():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"network": {"camrea_dim": 3}})
    assert str(info.value) == "unknown setting network.camrea_dim: did you mean network.camera_dim?"
    with pytest.raises(ConfigError, match=r"^unknown setting stesp: did you mean steps\?$"):
        GenerateConfig.from_dict({"prompt": "a", "stesp": 3})
    with pytest.raises(ConfigError, match=r"^unknown setting batch_sise: did you mean batch_size\?$"):
        TrainConfig.from_dict({"batch_sise": 3})
    # nothing close: the key is still named, NetConfig's few fields are listed
    with pytest.raises(ConfigError, match=r"^unknown setting warp_speed: ") as info:
        GenerateConfig.from_dict({"prompt": "a", "warp_speed": 9})
    assert "did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^unknown setting zzz: allowed are resolution, in_channels, channels"):
        NetConfig.from_dict({"zzz": 1})


def test_configerror_is_the_one_class_and_a_valueerror():
    import sds3d.settings

    assert ConfigError is sds3d.settings.ConfigError and issubclass(ConfigError, ValueError)


# --- types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,value,allowed", [
    ("seed", 1.5, "must be an integer"),                        # int refuses fractions
    ("steps", True, "must be an integer"),                      # ... and bools
    ("render_resolution", "64", "must be an integer"),          # ... and text
    ("guidance_scale", "high", "must be a number"),             # float refuses text
    ("guidance_scale", False, "must be a number"),              # ... and bools
    ("blob_density", float("nan"), "must be a finite number"),
    ("elevation_range", ["low", "high"], "must be a list of 2 numbers"),  # tuple: element type
    ("elevation_range", [0, 10, 20], "must be a list of 2 numbers"),      # tuple: length
    ("elevation_range", "0,30", "must be a list of 2 numbers"),           # tuple: not text
    ("export_formats", ["glb", 3], "must be a list of text values"),
    ("prompt", 5, "must be text"),                              # str refuses numbers
    ("view_dependent_prompting", 1, "must be true or false"),   # bool refuses 0/1
    ("t_max_end", "late", "must be a number or null"),          # Optional: the arm and null
    ("mesh_threshold", True, "must be a number or text"),
])
def test_wrong_types_are_refused_with_field_and_allowed(name, value, allowed):
    with pytest.raises(ConfigError) as info:
        make_config("cpu-fast", explicit={"prompt": "a red cube", name: value})
    message = str(info.value)
    assert message.startswith(f"bad value {name}={value!r}: ") and allowed in message and "\n" not in message


def test_accepted_values_are_converted_to_the_field_type():
    config = make_config("cpu-fast", explicit={"prompt": "a", "guidance_scale": 5, "elevation_range": [0, 30],
                                               "steps": 100.0, "t_max_end": None, "mesh_threshold": 2,
                                               "export_formats": ["glb"]})
    assert config.guidance_scale == 5.0 and type(config.guidance_scale) is float  # float fields take ints
    assert config.elevation_range == (0.0, 30.0) and all(type(v) is float for v in config.elevation_range)
    assert config.steps == 100 and type(config.steps) is int  # a whole float is an int
    assert config.t_max_end is None and config.mesh_threshold == 2.0 and config.export_formats == ("glb",)
    net = TrainConfig.from_dict({"network": {"channels": [16, 32], "attention_levels": []}}).network
    assert net.channels == (16, 32) and net.attention_levels == ()


def test_nested_types_and_partial_network():
    with pytest.raises(ConfigError, match=r"^bad value network.channels=\[8, 1.5\]: must be a list of integers$"):
        TrainConfig.from_dict({"network": {"channels": [8, 1.5]}})
    with pytest.raises(ConfigError, match=r"^bad value network=3: must be a mapping of NetConfig settings$"):
        TrainConfig.from_dict({"network": 3})
    with pytest.raises(ConfigError, match=r"^bad value betas=\[0.9\]: must be a list of 2 numbers"):
        TrainConfig.from_dict({"betas": [0.9]})
    with pytest.raises(ConfigError, match=r"^bad value threads=2.5: must be an integer or null$"):
        TrainConfig.from_dict({"threads": 2.5})
    # a partial network mapping changes only its keys; the rest is TrainConfig's default network
    default = TrainConfig().network
    net = TrainConfig.from_dict({"network": {"camera_dim": 3}}).network
    assert net.camera_dim == 3
    assert {k: v for k, v in vars(net).items() if k != "camera_dim"} == \
           {k: v for k, v in vars(default).items() if k != "camera_dim"}


def test_validate_checks_types_of_configs_built_in_code():
    with pytest.raises(ConfigError, match=r"^bad value seed=1.5: must be an integer$"):
        GenerateConfig(prompt="a", seed=1.5).validate()
    with pytest.raises(ConfigError, match=r"^bad value network.camera_dim=1.5: must be an integer$"):
        TrainConfig(network=NetConfig(camera_dim=1.5)).validate()


# --- values that used to slip through -----------------------------------------------------------

@pytest.mark.parametrize("values,name,allowed", [
    ({"seed": 1.5}, "seed", "integer"),
    ({"render_resolution": 48.5}, "render_resolution", "integer"),
    ({"azimuth_range": ["-90", "90"]}, "azimuth_range", "list of 2 numbers"),
    ({"turntable_frames": 0}, "turntable_frames", ">= 1"),
    ({"steps": 10.5}, "steps", "integer"),
    ({"seed": -1}, "seed", "[0, 2**64)"),
    ({"export_resolution": 2}, "export_resolution", ">= 8"),
    ({"base_resolution": 64, "max_resolution": 32}, "max_resolution", "base_resolution <= max_resolution"),
    ({"background": 2.0}, "background", "[0, 1]"),
    ({"albedo_levels": -1}, "albedo_levels", ">= 0"),
])
def test_generate_values_refused_at_config_time(values, name, allowed):
    with pytest.raises(ConfigError) as info:
        make_config("smoke", explicit={"prompt": "a red cube", **values})
    message = str(info.value)
    assert f"{name}=" in message and allowed in message and "\n" not in message


@pytest.mark.parametrize("values,name", [
    ({"network": {"camera_dim": 2}}, "network.camera_dim"),         # the trainer feeds 3-d directions
    ({"network": {"resolution": 30}}, "network.resolution"),        # 30 does not halve twice
    ({"network": {"attention_levels": [5]}}, "network.attention_levels"),
    ({"caption_dropout": 1.5}, "caption_dropout"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"precision": "fp8"}, "precision"),
    ({"batch_size": 0}, "batch_size"),
])
def test_train_values_refused_by_validate(values, name):
    with pytest.raises(ConfigError, match=rf"^bad value {name}="):
        TrainConfig.from_dict(values).validate()


# --- saved configs of earlier versions -------------------------------------------------------------

def test_the_shipped_teachers_saved_configs_load():
    meta = json.loads((ASSET_DIR / "config.json").read_text())
    saved = meta["training"]["config"]
    config = TrainConfig.from_dict(saved).validate()
    loaded = config.to_dict()
    # nothing dropped, nothing changed; settings added since take their defaults, which reproduce the
    # run as it was (no two-object scenes, one text slot)
    assert {k: loaded[k] for k in saved} == {**saved, "network": {**saved["network"], **{
        k: v for k, v in loaded["network"].items() if k not in saved["network"]}}}
    new, defaults = set(loaded) - set(saved), TrainConfig().to_dict()
    assert all(loaded[k] == defaults[k] for k in new) and loaded["compositions"] == 0
    assert loaded["network"]["text_slots"] == 1
    assert config.network.camera_dim == 3 and config.betas == (0.9, 0.99) and config.threads == 2
    net = NetConfig.from_dict(meta["network"])
    assert net == config.network
    # the network it describes has exactly the shapes of the shipped weights
    from safetensors import safe_open

    with safe_open(str(ASSET_DIR / "model.safetensors"), framework="pt") as f:
        shipped = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in LeanUNet(net).state_dict().items()} == shipped


def test_an_older_config_yaml_loads(tmp_path):
    """An earlier version wrote fewer fields and, from --set, ints into float fields."""
    values = GenerateConfig(prompt="a red cube").to_dict()
    for newer in ("coarse_resolution", "coarse_fraction", "oracle_camera_sigma", "lambda_z_variance", "albedo_levels"):
        del values[newer]
    values["guidance_scale"] = 5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    loaded = GenerateConfig.load(tmp_path / "config.yaml").validate()
    assert loaded.guidance_scale == 5.0 and loaded.coarse_resolution == 0 and loaded.oracle_camera_sigma == 5.0
    assert loaded.elevation_range == (-10.0, 60.0)
    # a field whose default changed the field: a run saved without it keeps what it was made with
    assert GenerateConfig().albedo_levels == 3 and loaded.albedo_levels == 0
    values["albedo_levels"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    assert GenerateConfig.load(tmp_path / "config.yaml").albedo_levels == 2


# --- --set ---------------------------------------------------------------------------------------

def test_parse_set_items_nests_dotted_keys_with_yaml_values():
    got = parse_set_items(["lr=1e-4", "network.camera_dim=3", "network.channels=[64, 128]", "t_max_end=null",
                           "precision=fp32", "batch_size=8", "batch_size=16", "negative_prompt=''"])
    assert got == {"lr": 0.0001, "network": {"camera_dim": 3, "channels": [64, 128]}, "t_max_end": None,
                   "precision": "fp32", "batch_size": 16, "negative_prompt": ""}
    for bad, match in [("lr", "FIELD=VALUE"), ("=3", "FIELD=VALUE"), ("network.=3", "FIELD=VALUE"),
                       ("lr=[1", "VALUE must be YAML")]:
        with pytest.raises(ConfigError, match=match):
            parse_set_items([bad])
    with pytest.raises(ConfigError, match="network was set to 3"):
        parse_set_items(["network=3", "network.camera_dim=3"])
    assert merge_settings({"network": {"channels": [8]}, "lr": 1.0}, {"network": {"camera_dim": 3}}) == \
        {"network": {"channels": [8], "camera_dim": 3}, "lr": 1.0}


def test_teacher_train_set_and_config_file_reach_the_config(tmp_path):
    from sds3d.cli import _config_from_args

    saved = TrainConfig(batch_size=8).to_dict()
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    args = argparse.Namespace(config=str(tmp_path / "train_config.json"), threads=None,
                              set=["lr=5e-4", "network.camera_dim=3", "betas=[0.8, 0.9]"])
    config = _config_from_args(args)
    assert config.batch_size == 8 and config.lr == 5e-4 and config.betas == (0.8, 0.9)
    assert config.network.camera_dim == 3 and config.network.channels == (32, 64, 128)
    assert _config_from_args(argparse.Namespace(config=None, threads=None, set=[])) is None


def test_teacher_train_config_reads_a_teacher_folders_settings():
    """--config sds3d/assets/teacher/config.json: the settings the shipped teacher was trained with (its
    "training" "config"), the start of a fine-tune with --set init_from=embedded."""
    from sds3d.cli import _config_from_args
    from sds3d.teachers.embedded import ASSET_DIR

    shipped = json.loads((ASSET_DIR / "config.json").read_text())
    args = argparse.Namespace(config=str(ASSET_DIR / "config.json"), threads=None, set=["init_from=embedded"])
    config = _config_from_args(args)
    assert config.init_from == "embedded"
    assert config.network.to_dict() == {**config.network.to_dict(), **shipped["network"]}
    assert config.network.camera_dim == 3 and config.min_snr_gamma == shipped["training"]["config"]["min_snr_gamma"]


def run_cli(capsys, *argv):
    from sds3d.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_teacher_train_typo_is_one_error_line_and_no_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "teacher", "train", "--out", str(tmp_path / "run"), "--set", "network.camrea_dim=3")
    assert code == 2 and err == ["error: unknown setting network.camrea_dim: did you mean network.camera_dim?"]
    assert not (tmp_path / "run").exists()
    code, err = run_cli(capsys, "teacher", "train", "--out", str(tmp_path / "run"), "--set", "batch_size=2.5")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: bad value batch_size=2.5")
    assert not (tmp_path / "run").exists()


def test_generate_float_seed_is_one_error_line_and_no_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "a red cube", "--set", "seed=1.5", "--out", str(tmp_path / "run"))
    assert code == 2 and err == ["error: bad value seed=1.5: must be an integer"]
    assert not (tmp_path / "run").exists()


def test_dataclass_from_dict_refuses_a_non_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        dataclass_from_dict(NetConfig, ["resolution", 32])
