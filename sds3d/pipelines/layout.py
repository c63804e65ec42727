"""Layout-guided score distillation of a two-object scene: each object learnt from its own prompt.

A teacher that knows single objects can still mix up a pair: the embedded teacher trained on
two-object scenes draws "a red cube on top of a blue sphere" with the shapes in place but the
colours swapped or merged (its model card: binding of trained pairs 0.38, of unseen ones 0.14).
Attribute binding is the known weak point of text-conditioned diffusion, and the 3D field's answer
is a layout: Set-the-Scene (Cohen-Bar et al., ICCV 2023) and CompoNeRF (Bai et al., 2023) give each
object a box and a local score-distillation loss with its own prompt; GraphDreamer (Gao et al.,
CVPR 2024) reads the objects and their relation off the prompt. Here the world's prompt grammar
gives the scene graph and `world/compositions.py` its fixed layout (where each object goes and how
much it is scaled), so:

- the field keeps density only inside the objects' boxes (`NeRFField(regions=...)`), each object
  starting from the single-object blob scaled into its box;
- every training image looks at one object alone (`NeRFField.only_region`) from a camera moved and
  scaled with it (`object_cameras`): the image a single-object render of that object would be, which
  is what the teacher knows best; its prompt is the object's own caption with the view suffix;
- preview, export and evaluation see the whole field: both objects in their places.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry.cameras import Camera

LAYOUT_MARGIN = 0.06
"""Space kept around each object's true box, in the object's own (unscaled) units: room for a shape
that is drawn a little large, without taking much of its neighbour's."""


@dataclass(frozen=True)
class ObjectRegion:
    """One object of a layout: its caption, the centre and scale of its frame in the scene (the
    object's own origin goes to `centre`, its size times `scale`), and its box (lo, hi) in the scene."""

    caption: str
    centre: tuple[float, float, float]
    scale: float
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]


def layout_regions(composition, margin: float = LAYOUT_MARGIN) -> list[ObjectRegion]:
    """The regions of a world `Composition`'s objects (`Composition.objects`), boxes widened by
    `margin` of each object's own units."""
    regions = []
    for placed in composition.objects:
        lo, hi = placed.bounds()
        pad = margin * placed.factor
        regions.append(ObjectRegion(placed.caption, tuple(placed.offset), float(placed.factor),
                                    tuple((lo - pad).tolist()), tuple((hi + pad).tolist())))
    return regions


def region_tensors(regions: list[ObjectRegion]) -> dict[str, torch.Tensor]:
    """The `regions` argument of `NeRFField`: "lo", "hi", "centre" (K, 3) and "scale" (K,)."""
    return {"lo": torch.tensor([r.lo for r in regions]), "hi": torch.tensor([r.hi for r in regions]),
            "centre": torch.tensor([r.centre for r in regions]), "scale": torch.tensor([r.scale for r in regions])}


def object_cameras(cameras: Camera, region: ObjectRegion) -> Camera:
    """The cameras moved into an object's frame: positions scaled by the region's scale about the
    origin, then moved to its centre, directions and field of view kept. Each ray then meets the
    placed object exactly where the original ray meets the object alone at the origin, so the render
    is the single-object image of the same view (tested against the world's renderer)."""
    c2w = cameras.c2w.clone()
    centre = torch.tensor(region.centre, dtype=c2w.dtype, device=c2w.device)
    c2w[:, :3, 3] = centre + region.scale * c2w[:, :3, 3]
    distance = None if cameras.distance is None else cameras.distance * region.scale
    return Camera(c2w, cameras.fovy, cameras.height, cameras.width, cameras.elevation_deg, cameras.azimuth_deg, distance)


def region_of_image(step: int, index: int, batch_size: int, regions: int) -> int:
    """Which object the `index`-th image of a step's batch looks at: images take the objects in turn,
    continuing across steps, so that every object gets the same share of the steps."""
    return (step * batch_size + index) % regions
