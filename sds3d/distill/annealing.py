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


def decayed_lr_factor(step: int, total_steps: int, lr_decay: float = 1.0, decay_start: float = 0.0) -> float:
    """The learning rates' factor at `step`: 1 until the fraction `decay_start` of the run, then falling
    exponentially to `lr_decay` at the end of the run, lr_decay ** progress (stable-dreamfusion's
    LambdaLR 0.1 ** (iter / iters) when decay_start is 0); lr_decay 1.0 keeps the rates constant.
    Why decay: Adam moves every hash-table entry by about its learning rate each step, whatever the
    size of its gradient, and much of the SDS gradient of a pixel is noise (Poole et al. 2022, eq. 3:
    eps_hat - eps). Entries that no render constrains well wander by the sum of those steps, which
    shows as grain; a smaller sum wanders less, at the price of a shape that settles more slowly."""
    if total_steps <= 0 or lr_decay == 1.0:
        return 1.0
    progress = min(max((step / total_steps - decay_start) / max(1e-8, 1 - decay_start), 0.0), 1.0)
    return lr_decay ** progress
