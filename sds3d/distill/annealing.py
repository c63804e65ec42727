"""The annealing schedules threestudio uses for score distillation: timestep range and guidance over a run."""

from __future__ import annotations


def annealed_range(step: int, total_steps: int, t_min: float = 0.02, t_max: float = 0.98,
                   t_max_end: float | None = None, anneal_start: float = 0.0) -> tuple[float, float]:
    """The (t_min, t_max) fractions at `step`: t_max moves linearly to `t_max_end` after `anneal_start`.

    With t_max_end=None there is no annealing (DreamFusion); ProlificDreamer anneals 0.98 -> 0.5.
    """
    if t_max_end is None or total_steps <= 0:
        return t_min, t_max
    progress = min(max((step / total_steps - anneal_start) / max(1e-8, 1 - anneal_start), 0.0), 1.0)
    return t_min, t_max + (t_max_end - t_max) * progress


def annealed_guidance(step: int, total_steps: int, guidance_scale: float, guidance_scale_end: float | None = None) -> float:
    """The CFG scale at `step`: linear from `guidance_scale` to `guidance_scale_end` over the run
    (constant when None). Strong guidance early settles the shape; weaker guidance late lets
    colours come back from the over-saturated, darkened ones that high CFG gives."""
    if guidance_scale_end is None or total_steps <= 0:
        return guidance_scale
    progress = min(max(step / total_steps, 0.0), 1.0)
    return guidance_scale + (guidance_scale_end - guidance_scale) * progress
