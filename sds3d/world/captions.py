"""The prompt grammar of the world: captions, synonyms, paraphrases and view suffixes.

Canonical captions are "<article> <color> <category>" ("a red cube", "an orange torus"); a
composite in its default colour is also called by its bare name ("a snowman"). Synonyms
and paraphrases give the prompt resolver many phrasings of each scene to match against.
View suffixes follow DreamFusion: "a red cube, front view".
"""

from __future__ import annotations

import re

from ..geometry.views import VIEW_NAMES

from .scenes import CATEGORIES, COLORS, COMPOSITES, DEFAULT_COLORS

# Other names of each category, used by the exact grammar and by the paraphrases.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "sphere": ("ball", "orb"),
    "cube": ("box", "block"),
    "cylinder": ("tube", "column"),
    "cone": ("conical shape",),
    "torus": ("donut", "doughnut", "ring"),
    "pyramid": ("square pyramid",),
    "capsule": ("pill",),
    "snowman": ("snow man",),
    "house": ("cottage", "cabin", "hut", "little house"),
    "mushroom": ("toadstool",),
    "pine tree": ("fir tree", "christmas tree", "evergreen tree", "spruce tree"),
    "table": ("dining table", "coffee table"),
    "lollipop": ("lolly", "candy on a stick"),
    "dumbbell": ("hand weight", "barbell"),
    "rocket": ("rocket ship", "spaceship", "space rocket"),
}

# Other spellings and common shades of the colour names; prompts are read with these
# replaced ("a crimson box" is "a red box"). Multi-word shades are matched first.
COLOR_SYNONYMS: dict[str, str] = {
    "grey": "gray", "silver": "gray", "silvery": "gray",
    "crimson": "red", "scarlet": "red", "ruby": "red", "maroon": "red", "cherry red": "red",
    "tangerine": "orange", "amber": "orange",
    "golden": "yellow", "gold": "yellow", "lemon": "yellow", "lemon yellow": "yellow",
    "emerald": "green", "lime": "green", "lime green": "green", "olive": "green", "olive green": "green",
    "turquoise": "blue", "teal": "blue", "cyan": "blue", "navy": "blue", "navy blue": "blue", "azure": "blue", "sky blue": "blue", "royal blue": "blue", "cobalt": "blue",
    "violet": "purple", "lavender": "purple", "lilac": "purple", "magenta": "purple",
    "hot pink": "pink", "fuchsia": "pink", "salmon": "pink",
    "ivory": "white", "snow white": "white", "snow-white": "white",
    "charcoal": "black", "jet black": "black", "ebony": "black",
    "chocolate": "brown", "tan": "brown", "chestnut": "brown", "wooden": "brown", "wood": "brown",
}

# Paraphrase templates; {a} is the article that goes with the word after it.
_TEMPLATES = (
    "{a_color} {color} {noun}",
    "{a_noun} {noun} that is {color}",
    "{a_color} {color} colored {noun}",
    "{a_noun} {noun} painted {color}",
    "{a_noun} {noun} in {color}",
)

VIEW_SUFFIXES: dict[str, str] = {view: f"{view} view" for view in VIEW_NAMES}
_VIEW_RE = re.compile(r"\s*,?\s*\b(" + "|".join(VIEW_NAMES) + r"|top)\s+view\s*$", re.IGNORECASE)


def article(word: str) -> str:
    """'a' or 'an' for the word (by its first letter; good enough for this vocabulary)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(category: str, color: str) -> str:
    """Canonical caption: caption('cube', 'red') -> 'a red cube'."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}")
    return f"{article(color)} {color} {category}"


def bare_caption(category: str) -> str:
    """The category without colour, 'a snowman'; it means the default colour."""
    return f"{article(category)} {category}"


def captions(category: str, color: str) -> list[str]:
    """Canonical captions of a scene: the coloured one, plus the bare one for a composite in
    its default colour."""
    out = [caption(category, color)]
    if category in COMPOSITES and color == DEFAULT_COLORS[category]:
        out.append(bare_caption(category))
    return out


def nouns(category: str) -> tuple[str, ...]:
    """The category name and its synonyms."""
    return (category,) + SYNONYMS.get(category, ())


def paraphrases(category: str, color: str) -> list[str]:
    """Deterministic list of phrasings of one scene, canonical captions first, no duplicates."""
    out = captions(category, color)
    for noun in nouns(category):
        for template in _TEMPLATES:
            out.append(template.format(a_color=article(color), a_noun=article(noun), color=color, noun=noun))
        if category in COMPOSITES and color == DEFAULT_COLORS[category]:
            out.append(bare_caption(noun))
    return list(dict.fromkeys(out))


def with_view(prompt: str, view: str) -> str:
    """DreamFusion view-dependent prompt: with_view('a red cube', 'front') -> 'a red cube, front view'."""
    if view not in VIEW_SUFFIXES:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEW_NAMES)}")
    return f"{strip_view(prompt)}, {VIEW_SUFFIXES[view]}"


def split_view(prompt: str) -> tuple[str, str | None]:
    """(prompt without its trailing view suffix, the view name or None):
    split_view('a red cube, front view') -> ('a red cube', 'front'); 'top view' is 'overhead'."""
    match = _VIEW_RE.search(prompt.rstrip())
    if match is None:
        return prompt.rstrip(), None
    view = match.group(1).lower()
    return prompt.rstrip()[: match.start()].rstrip(), "overhead" if view == "top" else view


def strip_view(prompt: str) -> str:
    """The prompt without a trailing view suffix (', front view', ' overhead view', ...)."""
    return split_view(prompt)[0]
