"""Teacher v2 data: two-object scenes in the teacher's training set and its slotted text conditioning.

Caption splitting and paraphrases, the random training compositions, the slot embeddings, the
caption table of a composition, composition renders and their cache, a tiny trainer with
compositions (its images, captions, text table, export and reload) and `check_run`'s gate on the
exported metadata. References are independent of the code under test: a Composition's own fields,
the world's prompt resolver, `render_scene` called directly, hand-built concatenations of a fake
text encoder's vectors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from sds3d.config import make_config
from sds3d.pipelines.text_to_3d import check_run
from sds3d.settings import ConfigError
from sds3d.teachers.embedded import EmbeddedTeacher
from sds3d.teachers.text import slot_embeddings, slot_texts
from sds3d.training.teacher import TeacherTrainer, TrainConfig
from sds3d.world import dataset as dataset_module
from sds3d.world.captions import VIEW_NAMES, strip_view, with_view
from sds3d.world.compositions import RELATIONS, Composition, composition_phrasings, split_caption, training_compositions
from sds3d.world.dataset import (CaptionTable, RenderSpec, composition_renders, scene_cameras, scene_phrasings,
                                 world_renders)
from sds3d.world.prompts import resolve_prompt
from sds3d.world.render import render_scene
from sds3d.world.scenes import Scene, all_scenes, held_out_combinations
from tiny_teachers import TINY_NET, HashText

RED_ON_BLUE = Composition(Scene("cube", "red"), "on top of", Scene("sphere", "blue"))
RED_ON_BLUE_TEXT = "a red cube on top of a blue sphere"


def hash_vec(text: str) -> torch.Tensor:
    """The fake encoder's vector of one text (HashText, independent of the code under test)."""
    return HashText().embed([text])[0]


def hand_slots(prompt: str, first: str | None, second: str | None) -> torch.Tensor:
    """cat(E(prompt), E(first) or 0, E(second) or 0), built by hand."""
    zero = torch.zeros(384)
    return torch.cat([hash_vec(prompt), zero if first is None else hash_vec(first), zero if second is None else hash_vec(second)])


# --- split_caption ---------------------------------------------------------------------------

def test_split_caption_splits_compositions_and_never_a_single_scene():
    compositions = training_compositions(300, seed=0)
    for c in compositions:
        assert split_caption(c.caption) == (c.first.caption, c.relation, c.second.caption), c
    singles = [(s, p) for s in all_scenes() for p in scene_phrasings(s.category, s.color)]
    assert any(" on " in p for _, p in singles), "the world should have a one-object phrasing with ' on '"
    bad = [p for _, p in singles if split_caption(p) is not None]
    assert not bad, f"one-object phrasings split as two objects: {bad[:5]}"
    assert split_caption("a candy on a stick") is None


# --- composition_phrasings ------------------------------------------------------------------

def test_composition_phrasings_resolve_to_their_composition():
    for c in training_compositions(30, seed=1):
        phrasings = composition_phrasings(c)
        assert phrasings[0] == c.caption
        assert len(phrasings) == 4 and len(set(phrasings)) == 4, phrasings
        for p in phrasings:
            assert resolve_prompt(p) == c, (p, c)
    for count in (1, 2, 3, 6):
        out = composition_phrasings(RED_ON_BLUE, count=count)
        assert len(out) == count and len(set(out)) == count and out[0] == RED_ON_BLUE_TEXT, out
        assert all(resolve_prompt(p) == RED_ON_BLUE for p in out), out


# --- training_compositions ------------------------------------------------------------------

def test_training_compositions_are_distinct_seeded_and_avoid_held_out_pairs():
    include = (Composition(Scene("cone", "orange"), "next to", Scene("snowman", "white")), RED_ON_BLUE)
    out = training_compositions(300, seed=0, include=include)
    assert len(out) == 300 and len(set(out)) == 300
    assert all(isinstance(c, Composition) for c in out)
    assert tuple(out[:2]) == include
    held = set(held_out_combinations())
    for c in out:
        assert c.first != c.second, c
        for s in (c.first, c.second):
            assert (s.color, s.category) not in held, c
    assert {c.relation for c in out} == set(RELATIONS)
    assert training_compositions(40, seed=0) == training_compositions(40, seed=0)
    assert training_compositions(40, seed=0) != training_compositions(40, seed=1)
    assert training_compositions(5, seed=3) == training_compositions(40, seed=3)[:5]


# --- slot_texts / slot_embeddings ------------------------------------------------------------

class RecordingText(HashText):
    def __init__(self):
        self.calls = []

    def embed(self, texts):
        self.calls.append(list(texts))
        return super().embed(texts)


def test_slot_embeddings_concatenate_prompt_and_object_phrases():
    comp = f"{RED_ON_BLUE_TEXT}, front view"
    prompts = [comp, "a red cube, side view", "", RED_ON_BLUE_TEXT, comp, "a snowman"]
    enc = RecordingText()
    rows = slot_embeddings(prompts, enc.embed, 3)
    assert rows.shape == (6, 3 * 384)
    assert torch.equal(rows[0], hand_slots(comp, "a red cube", "a blue sphere"))
    assert torch.equal(rows[1], hand_slots("a red cube, side view", "a red cube", None))
    assert torch.equal(rows[2], hand_slots("", None, None))
    assert torch.equal(rows[3], hand_slots(RED_ON_BLUE_TEXT, "a red cube", "a blue sphere"))
    assert torch.equal(rows[4], rows[0])
    assert torch.equal(rows[5], hand_slots("a snowman", "a snowman", None))
    assert torch.count_nonzero(rows[1, 768:]) == 0 and torch.count_nonzero(rows[2, 384:]) == 0
    # one call, on the distinct texts only
    assert len(enc.calls) == 1, enc.calls
    called = enc.calls[0]
    assert len(called) == len(set(called)), called
    assert set(called) == {comp, "a red cube", "a blue sphere", "a red cube, side view", "", RED_ON_BLUE_TEXT, "a snowman"}
    # one slot: the prompt's own embedding
    one = slot_embeddings([comp, "a red cube"], HashText().embed, 1)
    assert torch.equal(one, torch.stack([hash_vec(comp), hash_vec("a red cube")]))
    assert slot_texts(comp, 3) == (comp, "a red cube", "a blue sphere")
    with pytest.raises(ValueError):
        slot_embeddings([comp], HashText().embed, 2)
    with pytest.raises(ValueError):
        slot_texts(comp, 2)


def test_minilm_tells_the_objects_apart_only_in_their_own_slots():
    from sds3d.teachers.text import minilm_embed

    e = minilm_embed([RED_ON_BLUE_TEXT, "a red sphere on top of a blue cube", "a blue sphere", "a blue cube"])
    whole = float(F.cosine_similarity(e[0], e[1], dim=0))
    second = float(F.cosine_similarity(e[2], e[3], dim=0))
    assert whole > 0.98, f"sentence cosine of the swapped pair is {whole:.4f} (expected > 0.98); second-slot cosine {second:.4f}"
    assert second < 0.95, f"second-slot cosine (blue sphere vs blue cube) is {second:.4f} (expected < 0.95); sentence cosine {whole:.4f}"


# --- CaptionTable with a composition ----------------------------------------------------------

def test_caption_table_draws_a_compositions_phrasings_with_its_view():
    table = CaptionTable([Scene("cube", "red"), RED_ON_BLUE])
    view = VIEW_NAMES.index("side")
    phrasings = composition_phrasings(RED_ON_BLUE)
    allowed = set(phrasings) | {with_view(p, "side") for p in phrasings}
    g = torch.Generator().manual_seed(0)
    drawn = [table.texts[table.sample_scene(RED_ON_BLUE, view, g)] for _ in range(300)]
    assert set(drawn) <= allowed, set(drawn) - allowed
    suffixed = sum(d.endswith(", side view") for d in drawn)
    assert 0 < suffixed < 300
    assert 0.6 < suffixed / 300 < 0.9, suffixed  # view_prob 0.75
    canonical = sum(strip_view(d) == RED_ON_BLUE_TEXT for d in drawn)
    # canonical_prob 0.5 plus a quarter of the other half: ~0.625 expected
    assert canonical >= 150, canonical
    assert len({strip_view(d) for d in drawn}) == len(phrasings)  # every paraphrase shows up
    # the one-object scene beside it keeps its own captions
    single = {table.texts[table.sample_scene(Scene("cube", "red"), view, g)] for _ in range(100)}
    assert all(resolve_prompt(strip_view(t)) == Scene("cube", "red") for t in single), single


# --- composition_renders --------------------------------------------------------------------

def direct_renders(spec: RenderSpec, comp: Composition) -> torch.Tensor:
    """The documented rule: render at resolution * supersample, average-pool, clamp, *255, round."""
    hi = spec.resolution * spec.supersample
    rgb = render_scene(comp, scene_cameras(spec, comp, hi))["rgb"]
    return (F.avg_pool2d(rgb, spec.supersample).clamp(0, 1) * 255).round().to(torch.uint8)


def test_composition_renders_match_direct_renders_and_cache(tmp_path, monkeypatch):
    spec = RenderSpec(resolution=16, views_per_scene=3, seed=0)
    comps = [RED_ON_BLUE, Composition(Scene("cone", "orange"), "next to", Scene("torus", "green"))]
    renders = composition_renders(spec, comps, cache_dir=tmp_path)
    expected = torch.cat([direct_renders(spec, c) for c in comps])
    assert renders.images.dtype == torch.uint8 and renders.images.shape == (6, 3, 16, 16)
    assert torch.equal(renders.images, expected)
    assert renders.scene.tolist() == [0, 0, 0, 1, 1, 1]
    assert renders.compositions == comps and len(renders) == 6
    files = list((tmp_path / "world").glob("*.npz"))
    assert len(files) == 1, files

    def no_render(*args, **kwargs):
        raise AssertionError("rendered although the cache holds these renders")

    with monkeypatch.context() as m:
        m.setattr(dataset_module, "render_views", no_render)
        cached = composition_renders(spec, comps, cache_dir=tmp_path)
    assert torch.equal(cached.images, expected) and cached.scene.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(cached.azimuth, renders.azimuth) and torch.equal(cached.view, renders.view)

    files[0].write_bytes(b"\x00garbage, not an npz file" * 10)
    rebuilt = composition_renders(spec, comps, cache_dir=tmp_path)
    assert torch.equal(rebuilt.images, expected) and rebuilt.scene.tolist() == [0, 0, 0, 1, 1, 1]
    with monkeypatch.context() as m:  # and the rebuilt file is a good cache again
        m.setattr(dataset_module, "render_views", no_render)
        assert torch.equal(composition_renders(spec, comps, cache_dir=tmp_path).images, expected)


# --- a tiny trainer with compositions --------------------------------------------------------

def slotted_net():
    from dataclasses import replace

    return replace(TINY_NET, text_slots=3)


def tiny_config(**kw):
    base = dict(network=slotted_net(), batch_size=4, lr=2e-3, warmup_steps=1, precision="fp32", eval_every=0,
                log_every=1, checkpoint_every=1000, views_per_scene=4, compositions=3, composition_views=2,
                composition_prompts=(RED_ON_BLUE_TEXT,))
    base.update(kw)
    return TrainConfig(**base)


SINGLES = [Scene("cube", "red"), Scene("sphere", "blue")]


@pytest.fixture(scope="module")
def single_renders(tmp_path_factory):
    return world_renders(RenderSpec(resolution=16, views_per_scene=4, seed=0), scenes=SINGLES,
                         cache_dir=tmp_path_factory.mktemp("world-cache"))


@pytest.fixture(scope="module")
def trained(module_oracle_cache, single_renders, tmp_path_factory):
    """A tiny slotted trainer (compositions rendered into a tmp $SDS3D_CACHE), 2 steps, exported."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("teacher")
    trainer = TeacherTrainer(root / "run", tiny_config(), lambda *a: None, single_renders, HashText())
    trainer.train(max_steps=2)
    folder = trainer.export(root / "export")
    return trainer, folder


def test_trainer_appends_composition_renders_and_their_scenes(trained, single_renders):
    trainer, _ = trained
    cfg = trainer.config
    singles = single_renders.indices("train").numel()
    assert singles == 8
    assert len(trainer.images) == singles + 3 * 2 == len(trainer.scene_ids) == len(trainer.labels["view"])
    assert trainer.scenes[-3] == RED_ON_BLUE
    expected = training_compositions(3, cfg.data_seed, include=(RED_ON_BLUE,))
    assert trainer.scenes[-3:] == expected
    # one-object images point at their own scene
    for i in range(singles):
        assert trainer.scenes[int(trainer.scene_ids[i])] == single_renders.scene(i)
    # composition images: their scene, and the pixels render_scene gives for it
    spec = RenderSpec(resolution=16, views_per_scene=2, seed=cfg.data_seed, overhead_fraction=cfg.overhead_fraction)
    for k, comp in enumerate(expected):
        rows = range(singles + 2 * k, singles + 2 * k + 2)
        assert all(trainer.scenes[int(trainer.scene_ids[i])] == comp for i in rows)
        assert torch.equal(trainer.images[singles + 2 * k: singles + 2 * k + 2], direct_renders(spec, comp)), comp


def test_trainer_captions_of_composition_images_resolve_to_them(trained, single_renders):
    trainer, _ = trained
    singles = single_renders.indices("train").numel()
    expected = training_compositions(3, trainer.config.data_seed, include=(RED_ON_BLUE,))
    g = torch.Generator().manual_seed(0)
    resolved = {}
    for i in range(singles, len(trainer.images)):
        comp = expected[(i - singles) // 2]
        sid, view = int(trainer.scene_ids[i]), int(trainer.labels["view"][i])
        for _ in range(50):
            text = trainer.captions.texts[trainer.captions.sample_scene(trainer.scenes[sid], view, g)]
            assert text, "a caption draw gave the empty caption"
            bare = strip_view(text)
            if bare not in resolved:
                resolved[bare] = resolve_prompt(bare)
            assert resolved[bare] == comp, (text, comp)
            assert text == bare or text == with_view(bare, VIEW_NAMES[view]), (text, VIEW_NAMES[view])


def test_trainer_text_table_holds_slot_embeddings(trained):
    trainer, _ = trained
    for text in (RED_ON_BLUE_TEXT, with_view(RED_ON_BLUE_TEXT, "back"), "a red cube", "a blue sphere, front view", ""):
        row = trainer.text_table[trainer.captions.index[text]]
        assert torch.equal(row, slot_embeddings([text], HashText().embed, 3)[0]), text
    assert torch.equal(trainer.text_table[trainer.captions.index[RED_ON_BLUE_TEXT]],
                       hand_slots(RED_ON_BLUE_TEXT, "a red cube", "a blue sphere"))
    assert trainer.text_table.shape == (len(trainer.captions.texts), 3 * 384)
    assert torch.equal(trainer.text_base["a blue sphere"], hash_vec("a blue sphere"))


def test_exported_slotted_teacher_says_it_knows_compositions(trained):
    _, folder = trained
    meta = json.loads((folder / "config.json").read_text())
    assert meta["compositions"] is True
    assert meta["network"]["text_slots"] == 3
    assert meta["training"]["config"]["composition_prompts"] == [RED_ON_BLUE_TEXT]
    expected_cond = hand_slots(RED_ON_BLUE_TEXT, "a red cube", "a blue sphere")
    expected_uncond = hand_slots("", None, None)
    teacher = EmbeddedTeacher.load(folder, text_encoder=HashText())
    cond = teacher.encode_prompt([RED_ON_BLUE_TEXT])
    assert torch.equal(cond.cond[0], expected_cond) and torch.equal(cond.uncond[0], expected_uncond)
    # the shipped prompt table alone (no encoder given) holds the prompt and both objects' phrases
    from_table = EmbeddedTeacher.load(folder)
    cond = from_table.encode_prompt([RED_ON_BLUE_TEXT, f"{RED_ON_BLUE_TEXT}, front view"])
    assert torch.equal(cond.cond[0], expected_cond)
    assert torch.equal(cond.cond[1], hand_slots(f"{RED_ON_BLUE_TEXT}, front view", "a red cube", "a blue sphere"))
    # and it samples at the trained size with the 3 * 384 conditioning
    x = torch.randn(1, 3, 16, 16)
    assert teacher.predict_eps(x, torch.tensor([500]), teacher.encode_prompt([RED_ON_BLUE_TEXT]), 3.0).shape == x.shape


def test_composition_settings_are_checked(tmp_path, single_renders, monkeypatch):
    with pytest.raises(ConfigError):
        TrainConfig(compositions=0, composition_prompts=(RED_ON_BLUE_TEXT,)).validate()
    monkeypatch.setenv("SDS3D_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        TeacherTrainer(tmp_path / "run", tiny_config(composition_prompts=("a red cube",)), lambda *a: None,
                       single_renders, HashText())
    assert "composition_prompts" in str(info.value) and "a red cube" in str(info.value), str(info.value)


# --- check_run ------------------------------------------------------------------------------

def test_check_run_follows_the_exported_compositions_flag(trained, tmp_path):
    """Learnt as a whole, a two-object scene needs `compositions: true`; learnt by layout it does not."""
    _, folder = trained
    whole = {"composition_guidance": "whole"}
    check_run(make_config("smoke", prompt=RED_ON_BLUE_TEXT, teacher=str(folder), explicit=whole))
    copy = tmp_path / "no-compositions"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "config.json").read_text())
    del meta["compositions"]
    (copy / "config.json").write_text(json.dumps(meta))
    config = make_config("smoke", prompt=RED_ON_BLUE_TEXT, teacher=str(copy), explicit=whole)
    with pytest.raises(ValueError) as info:
        check_run(config)
    message = str(info.value)
    assert "two-object" in message and "\n" not in message, message
    check_run(make_config("smoke", prompt=RED_ON_BLUE_TEXT, teacher=str(copy)))  # auto: by layout
    check_run(make_config("smoke", prompt="a red cube", teacher=str(copy)))  # one object stays fine


def test_teacher_eval_of_a_composition_teacher_scores_seen_and_unseen_two_object_scenes(trained, tmp_path):
    """`sds3d teacher eval` of a teacher trained on compositions adds their own measure to eval.json: its
    trained composition prompts and 12 compositions it never saw (none of its training set), and the
    model card quotes those figures."""
    from sds3d.cli import main

    trainer, folder = trained
    out = tmp_path / "eval"
    assert main(["teacher", "eval", "--teacher", str(folder), "--out", str(out), "--samples-per-prompt", "1",
                 "--steps", "1", "--threads", "1"]) == 0
    record = json.loads((out / "eval.json").read_text())["compositions"]
    assert [r["prompt"] for r in record["seen"]["per_prompt"]] == [RED_ON_BLUE_TEXT]
    unseen = [r["prompt"] for r in record["unseen"]["per_prompt"]]
    trained_set = {c.caption for c in trainer.scenes if isinstance(c, Composition)}
    assert len(unseen) == 12 and not set(unseen) & trained_set
    assert all(isinstance(resolve_prompt(p), Composition) for p in unseen)
    for part in ("seen", "unseen"):
        rows = record[part]["per_prompt"]
        bound = [r["bound"] for r in rows if r["bound"] is not None]
        # the part's figure is the mean of its prompts' (each the share of its views bound right)
        assert record[part]["bound"] == pytest.approx(sum(bound) / len(bound))
        assert all(len(r["views"]) == 4 for r in rows)
    card = (out / "MODEL_CARD.md").read_text()
    assert f"**{100 * record['unseen']['bound']:.1f}%**" in card and "compositions not in training" in card
