"""Evaluation metrics against a known object."""

from .metrics import Chamfer, chamfer_distance, color_error, silhouette_iou, speckle

__all__ = ["Chamfer", "chamfer_distance", "color_error", "silhouette_iou", "speckle"]
