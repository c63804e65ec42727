"""Conditioning that matches resolution (issue 17): a world teacher reads the canonical caption of
the scene the prompt resolves to, so a paraphrase and its canonical prompt train the same field;
a diffusers teacher reads the user's words. The user's prompt stays what is saved."""

import pytest
import torch
import yaml

from sds3d.config import make_config
from sds3d.pipelines.text_to_3d import TextTo3D, conditioning_note, conditioning_prompt, view_prompts
from sds3d.teachers import load_teacher

pytestmark = pytest.mark.usefixtures("module_oracle_cache")

VIEWS = ["front", "side", "back", "overhead"]


@pytest.mark.parametrize("teacher", ["embedded", "oracle"])
@pytest.mark.parametrize("prompt,canonical", [
    ("a crimson block", "a red cube"),             # synonyms, resolved by the exact table
    ("a navy blue pill", "a blue capsule"),
    ("a ball that is green", "a green sphere"),    # a paraphrase template
    ("a big green ball", "a green sphere"),        # resolved through the sentence embedding
])
def test_world_teachers_read_the_canonical_caption(prompt, canonical, teacher):
    config = make_config("smoke", prompt=prompt, teacher=teacher)
    assert conditioning_prompt(config) == canonical
    assert view_prompts(config, VIEWS) == [f"{canonical}, {view} view" for view in VIEWS]
    assert conditioning_note(config) == (f"sds3d: '{prompt}' is the world's '{canonical}'; "
                                         "the teacher is conditioned on that caption")
    assert config.prompt == prompt


@pytest.mark.parametrize("prompt", ["a red cube", "a snowman", "a white snowman", "a blue snowman, back view"])
def test_canonical_prompts_are_kept_as_written(prompt):
    config = make_config("smoke", prompt=prompt)
    assert conditioning_prompt(config) == prompt and conditioning_note(config) is None


def test_diffusers_teachers_read_the_users_words():
    config = make_config("smoke", prompt="a crimson block", teacher="stabilityai/stable-diffusion-2-1-base")
    assert conditioning_prompt(config) == "a crimson block" and conditioning_note(config) is None
    assert view_prompts(config, VIEWS) == [f"a crimson block, {view} view" for view in VIEWS]
    flat = make_config("smoke", prompt="a crimson block", teacher="stabilityai/stable-diffusion-2-1-base",
                       view_dependent_prompting=False)
    assert view_prompts(flat, VIEWS) == ["a crimson block"] * 4


def test_paraphrase_trains_the_same_field_as_its_canonical_prompt(tmp_path):
    """Same seed, same settings: 'a crimson block' and 'a red cube' give bit-identical fields with
    the embedded teacher, whose text encoder does tell the two apart (so the test can fail)."""
    teacher = load_teacher("embedded")
    raw = teacher.encode_prompt(["a crimson block, front view"]).cond
    canonical = teacher.encode_prompt(["a red cube, front view"]).cond
    assert not torch.equal(raw, canonical)  # the raw words would condition the network differently

    fields = {}
    for prompt in ("a crimson block", "a red cube"):
        config = make_config("smoke", prompt=prompt, steps=4, checkpoint_every=4, preview_every=4, device="cpu")
        run = TextTo3D(config, tmp_path / prompt.replace(" ", "-"), teacher=teacher)
        run.train(show_progress=False)
        fields[prompt] = {k: v.clone() for k, v in run.field.state_dict().items()}
        saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        assert saved["prompt"] == prompt  # what the user typed is what is saved
    a, b = fields["a crimson block"], fields["a red cube"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
