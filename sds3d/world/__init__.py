"""A small procedural 3D world with ground truth for every asset: SDF objects, their
renders under the shared camera conventions, their meshes and the prompts that name them."""

from .compositions import RELATIONS, Composition
from .captions import (SYNONYMS, bare_caption, caption, captions, paraphrases, split_view,
                       strip_view, with_view)
from .prompts import (SIMILARITY_THRESHOLD, EmptyPromptError, UnknownPromptError, UnsupportedPromptError,
                      nearest_known, normalize_prompt, resolve_prompt, world_prompts)
from .mesh import ground_truth_mesh
from .render import render_scene
from .scenes import (CATEGORIES, COLORS, COMPOSITES, DEFAULT_COLORS, PRIMITIVES, Part, Scene,
                     all_scenes, held_out_combinations, make_scene)

__all__ = [
    "CATEGORIES", "COLORS", "COMPOSITES", "RELATIONS", "Composition", "DEFAULT_COLORS", "PRIMITIVES", "SIMILARITY_THRESHOLD",
    "SYNONYMS", "EmptyPromptError", "Part", "Scene", "UnknownPromptError", "UnsupportedPromptError", "all_scenes",
    "bare_caption", "caption", "captions", "ground_truth_mesh", "held_out_combinations",
    "make_scene", "nearest_known", "normalize_prompt", "paraphrases", "render_scene",
    "resolve_prompt", "split_view", "strip_view", "with_view", "world_prompts",
]

