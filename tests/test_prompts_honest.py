"""Honest prompt resolution (issue 17): a prompt that asks for what the procedural world cannot
build (a negation, a count, two objects or a relation between them, two colours for one object,
a part the object lacks or a part colour it never has) fails with one line naming the words it
did not understand and prompts that would work, instead of resolving to a different scene.

The references are independent of the resolver: prompt files are parsed here, and their expected
scene is read off the words of a canonical caption ('<article> [<colour>] <category>')."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sds3d.cli import main
from sds3d.world.prompts import (UnknownPromptError, UnsupportedPromptError, known_phrasings, resolve_prompt,
                                 world_prompts)
from sds3d.world.scenes import CATEGORIES, COLORS, DEFAULT_COLORS, Scene

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILES = ["world.txt", "primitives.txt", "composites.txt", "six.txt", "smoke.txt"]


def caption_scene(text: str) -> Scene:
    """The scene a canonical caption names, read off its words: 'a red cube' -> (cube, red),
    'a snowman' -> (snowman, its default colour)."""
    words = text.split()
    assert words[0] in ("a", "an"), text
    words = words[1:]
    color = words.pop(0) if words[0] in COLORS else None
    category = " ".join(words)
    assert category in CATEGORIES, text
    return Scene(category, color or DEFAULT_COLORS[category])


def file_prompts(name: str) -> list[str]:
    """The prompts of a prompt file: the part of each line before '|', no comments or blanks."""
    lines = [line.strip() for line in (REPO / "prompts" / name).read_text().splitlines()]
    return [line.split("|")[0].strip() for line in lines if line and not line.startswith("#")]


def examples_in(message: str) -> list[str]:
    """The prompts a message proposes after its 'try'."""
    tail = message.split("; try ", 1)[1]
    return re.findall(r"'([^']+)'", tail.split(" (see ")[0])


def assert_honest_error(prompt: str, words: list[str]) -> str:
    with pytest.raises(UnsupportedPromptError) as info:
        resolve_prompt(prompt)
    message = str(info.value)
    assert isinstance(info.value, UnknownPromptError) and isinstance(info.value, ValueError)
    assert "\n" not in message and message.startswith(repr(prompt))
    for word in words:
        assert word in message, (word, message)
    examples = examples_in(message)
    assert examples, message
    for example in examples:  # every proposed prompt works, as the world's own captions do
        assert example in world_prompts(), (example, message)
        assert resolve_prompt(example) == caption_scene(example)
    return message


# --- the cases of the issue, and more -------------------------------------------------------

@pytest.mark.parametrize("prompt,words,suggested", [
    # the three (its relation prompt now resolves: a relation the world does not build instead)
    ("a red cube under a blue sphere", ["'under'"], ["a red cube", "a blue sphere"]),
    ("two red cubes", ["'two'"], ["a red cube"]),
    ("a cube that is not red", ["'not'"], ["a cube"]),
    # negation
    ("a non-red cube", ["'non-'"], ["a cube"]),
    ("a cube that isn't red", ["isn't"], ["a cube"]),
    ("a snowman with no nose", ["'no'"], ["a snowman"]),
    ("a house without a door", ["'without'"], ["a house"]),
    # counts and plurals
    ("2 cubes", ["'2'"], ["a cube"]),
    ("three blue spheres", ["'three'"], ["a blue sphere"]),
    ("a pair of dumbbells", ["'pair of'"], ["a dumbbell"]),
    ("several pine trees", ["'several'"], ["a pine tree"]),
    ("many green cones", ["'many'"], ["a green cone"]),
    ("red cubes", ["'cubes'"], ["a red cube"]),
    ("snowmen", ["'snowmen'"], ["a snowman"]),
    # relations between two objects
    ("a snowman on a house on a table", ["not 3"], ["a snowman", "a house"]),
    ("a red cube behind a green torus", ["'behind'"], ["a red cube", "a green torus"]),
    ("a sphere under a pyramid", ["'under'"], ["a sphere", "a pyramid"]),
    ("a rocket above a house", ["'above'"], ["a rocket", "a house"]),
    ("a cube inside a sphere", ["'inside'"], ["a cube", "a sphere"]),
    ("a cone to the left of a cylinder", ["'to the left of'"], ["a cone", "a cylinder"]),
    # a relation to something the world does not have
    ("a snowman on a mat", ["'on a mat'"], ["a snowman"]),
    # two objects joined by 'and' / 'with'
    ("a cube and a sphere", ["'cube'", "'sphere'"], ["a cube", "a sphere"]),
    ("a red house with a green pine tree", ["'house'", "'pine tree'"], ["a red house", "a green pine tree"]),
    # two colours for the main object
    ("a red blue cube", ["'red'", "'blue'"], ["a red cube", "a blue cube"]),
    ("a cube that is red and green", ["'red'", "'green'"], ["a red cube", "a green cube"]),
    # parts: one the object lacks, a colour the world never paints it
    ("a snowman with a top hat", ["'top hat'"], ["a snowman"]),
    ("a house with a blue roof", ["'a blue roof'", "red"], ["a house"]),
    ("a table with red legs", ["'red legs'", "brown"], ["a table", "a red table"]),
])
def test_unbuildable_prompts_fail_with_one_line(prompt, words, suggested):
    message = assert_honest_error(prompt, words)
    assert examples_in(message)[:len(suggested)] == suggested, message


def test_honest_errors_do_not_load_the_embedding_model():
    """The words alone show what is wrong: the error comes before the sentence encoder loads."""
    code = (
        "import sys\n"
        "from sds3d.world.prompts import UnsupportedPromptError, embedding_model_loaded, resolve_prompt\n"
        "for p in ['a red cube under a blue sphere', 'two red cubes', 'a cube that is not red', 'a red blue cube',\n"
        "          'a cube and a sphere', 'a house with a blue roof', 'a snowman with a top hat']:\n"
        "    try:\n"
        "        resolve_prompt(p)\n"
        "    except UnsupportedPromptError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(p + ' resolved')\n"
        "assert not embedding_model_loaded() and 'sentence_transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --- what still resolves, and to what ---------------------------------------------------------

@pytest.mark.parametrize("name", PROMPT_FILES)
def test_prompt_file_prompts_resolve_as_their_captions_say(name):
    prompts = file_prompts(name)
    assert prompts
    for prompt in prompts:
        assert resolve_prompt(prompt) == caption_scene(prompt), prompt


def test_every_known_phrasing_still_resolves_to_its_scene():
    """Every phrasing the world's grammar generates (captions, synonyms, paraphrase templates) maps
    to the scene it was generated from, as before; with a view suffix too."""
    phrasings = known_phrasings()
    assert len(phrasings) > 2000
    for text, scene in phrasings:
        assert resolve_prompt(text) == scene, text
        assert resolve_prompt(f"{text}, back view") == scene, text


def test_honest_checks_accept_every_known_phrasing():
    """The word checks alone (not only the exact table in front of them) accept every phrasing
    the grammar generates and read its colour; the table is no mask over false alarms."""
    from sds3d.world.prompts import _understand, normalize_prompt

    for text, scene in known_phrasings():
        category, color = _understand(text, normalize_prompt(text))
        assert category == scene.category and (color or DEFAULT_COLORS[category]) == scene.color, text


@pytest.mark.parametrize("prompt,category,color", [
    ("a snowman with a carrot nose", "snowman", "white"),
    ("a red mushroom with white spots", "mushroom", "red"),
    ("a mushroom with white spots", "mushroom", "red"),      # spots are white: the cap keeps its default
    ("a house with a red roof", "house", "yellow"),          # the roof is red: the walls keep theirs
    ("a snowman with an orange nose", "snowman", "white"),
    ("a mushroom with a blue cap", "mushroom", "blue"),      # the cap is the mushroom's main colour
    ("a rocket with a red nose cone", "rocket", "white"),    # a cone that is a part, not a second object
    ("a donut shaped ring", "torus", "gray"),                # a shape word, not a second object
    ("a red and white lollipop", "lollipop", "red"),         # white: its swirl and stick
    ("a red cube on a white background", "cube", "red"),     # framing, not a second colour
    ("a yellow wooden sphere", "sphere", "yellow"),          # wood is the material here, not a colour
    ("a cube with a green finish", "cube", "green"),
    ("a table with four legs", "table", "brown"),            # a count of parts, not of tables
    ("a snowman, red", "snowman", "red"),
])
def test_parts_and_shapes_still_resolve(prompt, category, color):
    assert resolve_prompt(prompt) == Scene(category, color)


# --- the CLI: one line, exit code 2, no folder ------------------------------------------------

@pytest.mark.parametrize("prompt,word", [("two red cubes", "'two'"),
                                         ("a red cube under a blue sphere", "'under'")])
def test_cli_prints_one_line_and_makes_no_folder(capsys, tmp_path, prompt, word):
    code = main(["generate", prompt, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert word in err[0] and "try 'a " in err[0], err[0]
    assert not (tmp_path / "run").exists()
