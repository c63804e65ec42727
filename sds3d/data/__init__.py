"""Datasets built from the procedural world (renders with labels and captions)."""

from .world_dataset import RenderSpec, WorldRenders, caption_vocabulary, sample_caption, scene_phrasings, world_renders

__all__ = ["RenderSpec", "WorldRenders", "caption_vocabulary", "sample_caption", "scene_phrasings", "world_renders"]
