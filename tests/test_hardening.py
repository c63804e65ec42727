"""Run folders people can trust (issue 15): bad inputs and damaged folders end in one `error: ...`
line and exit status 2 with every pre-existing file unchanged (checksums of the folder before and
after), checkpoints never run code, non-finite losses stop a run without touching its checkpoint,
a failed start leaves no folder, a hub id without network fails at once."""

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sds3d.cli import main
from sds3d.config import make_config
from sds3d.io import atomic_path, prepare_run_folder, remove_atomic_temporaries
from sds3d.pipelines.text_to_3d import TextTo3D, generate

PROMPT = "a red cube"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run folder as `generate` leaves it after training (config.yaml, checkpoints/last.pt at step 2,
    previews); the export is left out, nothing here needs it."""
    run = tmp_path_factory.mktemp("reference") / "run"
    config = make_config("smoke", prompt=PROMPT, steps=2, checkpoint_every=1, preview_every=1, device="cpu")
    TextTo3D(config, run).train(show_progress=False)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    return run


def checksums(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`: its path -> sha256 of its bytes ('folder' for folders)."""
    return {str(p.relative_to(folder)): "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_error_line(code: int, err: list[str], *fragments: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


# --- damaged run folders -----------------------------------------------------------------------

class RunsCode:
    """A pickle payload: unpickling it calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "last.pt"


def empty_checkpoint(run):
    checkpoint(run).write_bytes(b"")


def truncated_checkpoint(run):
    data = checkpoint(run).read_bytes()
    checkpoint(run).write_bytes(data[: len(data) // 3])


def random_checkpoint(run):
    checkpoint(run).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes())


def code_running_checkpoint(run):
    torch.save({"step": 2, "field": {}, "payload": RunsCode(run / "MARKER")}, checkpoint(run))


def raw_pickle_checkpoint(run):
    checkpoint(run).write_bytes(pickle.dumps({"payload": RunsCode(run / "MARKER")}))


def list_checkpoint(run):
    torch.save([1, 2, 3], checkpoint(run))


def checkpoint_without_field(run):
    state = torch.load(checkpoint(run), weights_only=True)
    del state["field"]
    torch.save(state, checkpoint(run))


def nan_checkpoint(run):
    state = torch.load(checkpoint(run), weights_only=True)
    state["field"]["encoding.table"].view(-1)[7] = float("nan")
    torch.save(state, checkpoint(run))


def no_checkpoint(run):
    checkpoint(run).unlink()


def edit_config(old: str, new: str):
    def damage(run):
        text = (run / "config.yaml").read_text()
        assert old in text
        (run / "config.yaml").write_text(text.replace(old, new))
    return damage


def config_not_yaml(run):
    (run / "config.yaml").write_text("prompt: [a red cube\nseed: 0\n")


def config_random_bytes(run):
    (run / "config.yaml").write_bytes(bytes(range(128, 256)) * 4)


def config_a_list(run):
    (run / "config.yaml").write_text("- a red cube\n- 0\n")


def not_a_run(run):
    shutil.rmtree(run)
    run.mkdir()
    (run / "thesis.txt").write_text("a user's own file")


def empty_folder(run):
    shutil.rmtree(run)
    run.mkdir()


def intact(run):
    pass


EVAL, EXPORT = ["eval", "{run}"], ["export", "{run}"]
RESUME = ["generate", PROMPT, "--out", "{run}", "--resume", "--quiet"]
DAMAGED = {
    # id: (damage, command, fragments of the one error line)
    "eval-empty-checkpoint": (empty_checkpoint, EVAL, ["last.pt", "is empty"]),
    "export-empty-checkpoint": (empty_checkpoint, EXPORT, ["last.pt", "is empty"]),
    "resume-empty-checkpoint": (empty_checkpoint, RESUME, ["last.pt", "is empty"]),
    "eval-truncated-checkpoint": (truncated_checkpoint, EVAL, ["last.pt", "damaged"]),
    "resume-truncated-checkpoint": (truncated_checkpoint, RESUME, ["last.pt", "damaged"]),
    # more steps change config.yaml: it must still be as it was after the failed resume
    "resume-longer-truncated-checkpoint": (truncated_checkpoint, RESUME + ["--steps", "5"], ["last.pt", "damaged"]),
    "export-random-checkpoint": (random_checkpoint, EXPORT, ["last.pt", "damaged"]),
    "resume-random-checkpoint": (random_checkpoint, RESUME, ["last.pt", "damaged"]),
    "eval-code-running-checkpoint": (code_running_checkpoint, EVAL, ["last.pt", "refused", "run code"]),
    "export-code-running-checkpoint": (code_running_checkpoint, EXPORT, ["last.pt", "refused", "run code"]),
    "resume-code-running-checkpoint": (code_running_checkpoint, RESUME, ["last.pt", "refused", "run code"]),
    "eval-raw-pickle-checkpoint": (raw_pickle_checkpoint, EVAL, ["last.pt"]),
    "eval-list-checkpoint": (list_checkpoint, EVAL, ["last.pt", "not a run checkpoint"]),
    "resume-checkpoint-without-field": (checkpoint_without_field, RESUME, ["last.pt", "lacks field"]),
    "eval-nan-checkpoint": (nan_checkpoint, EVAL, ["last.pt", "NaN or Inf", "field.encoding.table"]),
    "resume-nan-checkpoint": (nan_checkpoint, RESUME, ["last.pt", "NaN or Inf"]),
    "eval-no-checkpoint": (no_checkpoint, EVAL, ["not a finished run folder"]),
    "eval-config-wrong-type": (edit_config("seed: 0", "seed: zero"), EVAL, ["config.yaml", "seed", "integer"]),
    "export-config-float-seed": (edit_config("seed: 0", "seed: 1.5"), EXPORT, ["config.yaml", "seed"]),
    "resume-config-wrong-type": (edit_config("steps: 2", "steps: [2]"), RESUME, ["config.yaml", "steps"]),
    "resume-config-out-of-range": (edit_config("turntable_frames: 4", "turntable_frames: 0"), RESUME,
                                   ["config.yaml", "turntable_frames"]),
    "eval-config-not-yaml": (config_not_yaml, EVAL, ["config.yaml", "not valid YAML", "line 2"]),
    "resume-config-not-yaml": (config_not_yaml, RESUME, ["config.yaml", "not valid YAML"]),
    "export-config-random-bytes": (config_random_bytes, EXPORT, ["config.yaml", "not a text file"]),
    "eval-config-a-list": (config_a_list, EVAL, ["config.yaml", "not a mapping"]),
    "export-config-of-another-field": (edit_config("hidden_dim: 64", "hidden_dim: 32"), EXPORT,
                                       ["last.pt", "does not fit", "hidden"]),
    "resume-another-prompt": (intact, ["generate", "a snowman", "--out", "{run}", "--resume"],
                              ["prompt='a snowman'", "prompt='a red cube'"]),
    "resume-another-teacher": (intact, RESUME + ["--teacher", "oracle"], ["teacher='oracle'", "teacher='embedded'"]),
    "resume-another-seed": (intact, RESUME + ["--seed", "5"], ["seed=5", "seed=0"]),
    "resume-another-preset": (intact, RESUME + ["--preset", "cpu-quality"], ["preset='cpu-quality'"]),
    "resume-fewer-steps-than-done": (intact, RESUME + ["--steps", "1"], ["steps=1", "step 2"]),
    "resume-with-set": (intact, RESUME + ["--set", "steps=5"], ["--set"]),
    "resume-not-a-run": (not_a_run, RESUME, ["not a run folder", "no config.yaml"]),
    "resume-empty-folder": (empty_folder, RESUME, ["not a run folder"]),
    "generate-into-a-run": (intact, ["generate", PROMPT, "--out", "{run}", "--quiet"], ["already exists", "--resume"]),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_run_folder(case, finished_run, tmp_path, capsys):
    damage, command, fragments = DAMAGED[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = checksums(tmp_path)
    code, err = cli(capsys, *[word.format(run=run) for word in command])
    assert_one_error_line(code, err, *fragments)
    assert checksums(tmp_path) == before
    assert not (run / "MARKER").exists()


def test_the_code_running_payload_is_real(tmp_path):
    """The payload of the code-running cases does run when unpickled without weights_only: the
    refusal above is what keeps its marker from appearing."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    code_running_checkpoint(run)
    torch.load(checkpoint(run), weights_only=False)
    assert (run / "MARKER").exists()


def test_code_running_checkpoint_through_the_real_command(finished_run, tmp_path):
    """The same refusal as a user meets it: a `sds3d eval` process exits 2 with one stderr line."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code_running_checkpoint(run)
    before = checksums(tmp_path)
    done = subprocess.run([sys.executable, "-m", "sds3d", "eval", str(run)], capture_output=True, text=True,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, timeout=120)
    err = done.stderr.strip().splitlines()
    assert_one_error_line(done.returncode, err, "refused", "run code")
    assert "Traceback" not in done.stderr and not (run / "MARKER").exists()
    assert checksums(tmp_path) == before


def test_resume_of_a_missing_folder_makes_none(tmp_path, capsys):
    code, err = cli(capsys, "generate", PROMPT, "--out", tmp_path / "never", "--resume")
    assert_one_error_line(code, err, "does not exist")
    assert list(tmp_path.iterdir()) == []


# --- bad values for a new run ------------------------------------------------------------------

BAD_INPUTS = {
    "float-seed": (["--set", "seed=1.5"], ["seed=1.5", "integer"]),
    "float-resolution": (["--set", "render_resolution=64.5"], ["render_resolution", "integer"]),
    "fractional-steps": (["--set", "steps=10.5"], ["steps", "integer"]),
    "range-of-strings": (["--set", "elevation_range=[low, high]"], ["elevation_range", "2 numbers"]),
    "elevation-beyond-the-pole": (["--set", "elevation_range=[-100, 10]"], ["elevation_range", "[-90, 90]"]),
    "zero-turntable-frames": (["--set", "turntable_frames=0"], ["turntable_frames", ">= 1"]),
    "zero-checkpoint-every": (["--set", "checkpoint_every=0"], ["checkpoint_every"]),
    "infinite-weight": (["--set", "lambda_orientation=.inf"], ["lambda_orientation", "finite"]),
    "device-typo": (["--set", "device=cuda:one"], ["device", "cuda[:N]"]),
    "unknown-preset-in-set": (["--set", "preset=turbo"], ["preset", "cpu-fast"]),
    "missing-teacher-folder": (["--teacher", "./no/such/teacher"], ["does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_values_leave_no_folder(case, tmp_path, capsys):
    extra, fragments = BAD_INPUTS[case]
    code, err = cli(capsys, "generate", PROMPT, "--preset", "smoke", "--out", tmp_path / "new", "--quiet", *extra)
    assert_one_error_line(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []


# --- non-finite losses ---------------------------------------------------------------------------

@pytest.mark.parametrize("setting,fragments", [
    # the total loss is inf: the weight overflows float32 (1e39 > 3.4e38)
    ("lambda_opacity_entropy=1e39", ["step 1 of", "opacity_entropy term", "lambda_opacity_entropy=1e+39", "inf"]),
    # the loss is finite but its gradient's square overflows Adam's second moment
    ("lambda_orientation=1e37", ["step 1 of", "gradient of the orientation term", "lambda_orientation=1e+37"]),
])
def test_non_finite_loss_stops_before_the_first_step(setting, fragments, tmp_path, capsys):
    code, err = cli(capsys, "generate", PROMPT, "--preset", "smoke", "--out", tmp_path / "new", "--quiet", "--no-eval",
                    "--set", setting)
    assert_one_error_line(code, err, *fragments, "no checkpoint")
    assert list(tmp_path.iterdir()) == []  # a failed start leaves nothing behind


class NaNAfter:
    """The embedded teacher, but its eps prediction is NaN from the `calls`-th call on (one per SDS step)."""

    def __init__(self, teacher, calls: int):
        self.teacher, self.calls, self.count = teacher, calls, 0

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def predict_eps(self, *args, **kwargs):
        self.count += 1
        eps = self.teacher.predict_eps(*args, **kwargs)
        return eps * float("nan") if self.count >= self.calls else eps


def test_nan_mid_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from sds3d.teachers import load_teacher

    config = make_config("smoke", prompt=PROMPT, steps=8, checkpoint_every=2, preview_every=2, device="cpu")
    saved = {}

    def remember(event):  # a preview follows its step's checkpoint
        saved[event.step] = checkpoint(tmp_path / "run").read_bytes()

    with pytest.raises(FloatingPointError) as error:
        generate(config, out=tmp_path / "run", teacher=NaNAfter(load_teacher("embedded"), calls=6), callback=remember,
                 show_progress=False, evaluate=False)
    message = str(error.value)
    assert "\n" not in message and "step 6 of 8" in message and "the sds term" in message
    assert "checkpoint of step 4" in message and sorted(saved) == [2, 4]
    assert checkpoint(tmp_path / "run").read_bytes() == saved[4]  # untouched since step 4
    state = torch.load(checkpoint(tmp_path / "run"), weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["field"].values())


def test_a_checkpoint_with_nan_is_never_written(tmp_path):
    from sds3d.config import GenerateConfig

    config = GenerateConfig(prompt=PROMPT, device="cpu", n_levels=2, log2_hashmap_size=8, hidden_dim=16,
                            occupancy_resolution=8)
    run = TextTo3D(config, tmp_path)
    run._init_state()
    run.step = 3
    run._save_checkpoint()
    good = checkpoint(tmp_path).read_bytes()
    with torch.no_grad():
        next(run.field.parameters()).view(-1)[0] = float("inf")
    run.step = 4
    with pytest.raises(FloatingPointError) as error:
        run._save_checkpoint()
    assert "NaN or Inf" in str(error.value) and "checkpoint of step 3" in str(error.value)
    assert checkpoint(tmp_path).read_bytes() == good


# --- starts, restarts and leftovers --------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the tcnn backend cannot start")
def test_a_failed_start_leaves_no_folder_and_overwrite_gives_the_old_one_back(finished_run, tmp_path, capsys):
    # the tcnn hash grid needs CUDA: the run fails when it builds its field, after its folder exists
    code, err = cli(capsys, "generate", PROMPT, "--preset", "smoke", "--out", tmp_path / "a" / "b", "--quiet",
                    "--encoding-backend", "tcnn")
    assert_one_error_line(code, err, "tcnn")
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = checksums(tmp_path)
    code, err = cli(capsys, "generate", PROMPT, "--preset", "smoke", "--out", run, "--overwrite", "--quiet",
                    "--encoding-backend", "tcnn")
    assert_one_error_line(code, err, "tcnn")
    assert checksums(tmp_path) == before  # no run.old-1: the old run is back in its place


def test_leftover_temporaries_are_removed_and_only_they(tmp_path):
    """What a SIGKILL mid-write leaves (atomic_path entered, never left) goes on the next start;
    a user's own hidden or .tmp files stay."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("prompt: a\n")
    stale, contexts = [], []  # the contexts are kept: a collected generator would clean up after itself
    for target in (run / "checkpoints" / "last.pt", run / "previews" / "step-00010.png", run / "metrics.json"):
        contexts.append(atomic_path(target))
        stale.append(contexts[-1].__enter__())  # the process dies here: no __exit__
        stale[-1].write_bytes(b"half")
    mine = [run / ".notes", run / "draft.tmp.txt", run / ".hidden.tmp"]
    for path in mine:
        path.write_text("mine")
    assert all(p.exists() for p in stale)
    prepare_run_folder(run, resume=True)
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "mine" for p in mine)
    assert remove_atomic_temporaries(run) == []


def test_resume_without_checkpoint_says_it_restarts(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / "config.yaml", run / "config.yaml")
    polls = []

    def stop_after_one_step():
        polls.append(1)
        return len(polls) > 1

    config = make_config("smoke", prompt=PROMPT, steps=2, checkpoint_every=1, preview_every=1, device="cpu")
    result = generate(config, out=run, resume=True, should_stop=stop_after_one_step, show_progress=False)
    err = capsys.readouterr().err
    assert f"sds3d: {run} has no checkpoint yet: the run starts again from step 0" in err
    assert result.stopped and torch.load(checkpoint(run), weights_only=True)["step"] == 1


def test_eval_keeps_train_seconds(finished_run, tmp_path, capsys, monkeypatch):
    import sds3d.eval.ground_truth as ground_truth

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.json").write_text(json.dumps({"iou_mean": 0.1, "train_seconds": 12.3}))
    monkeypatch.setattr(ground_truth, "evaluate_run", lambda *args, **kwargs: {"iou_mean": 0.7})
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text()) == {"iou_mean": 0.7, "train_seconds": 12.3}


# --- hub ids without network -------------------------------------------------------------------

def test_hub_id_with_hf_hub_offline_fails_at_once(tmp_path, capsys, monkeypatch):
    import diffusers  # noqa: F401 - imported before the clock starts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, err = cli(capsys, "generate", PROMPT, "--teacher", "sds3d-tests/not-a-cached-model", "--out", tmp_path / "new")
    assert time.perf_counter() - start < 10
    assert_one_error_line(code, err, "sds3d-tests/not-a-cached-model", "HF_HUB_OFFLINE")
    assert list(tmp_path.iterdir()) == []


def test_hub_id_without_network_fails_at_once(tmp_path, capsys, monkeypatch):
    import diffusers  # noqa: F401

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    code, err = cli(capsys, "generate", PROMPT, "--teacher", "sds3d-tests/not-a-cached-model", "--out", tmp_path / "new")
    assert time.perf_counter() - start < 10  # huggingface_hub's own retries take ~30 s
    assert_one_error_line(code, err, "sds3d-tests/not-a-cached-model", "out of reach", "Name or service not known")
    assert list(tmp_path.iterdir()) == []
