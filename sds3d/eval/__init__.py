"""Evaluation metrics against a known object."""

from .metrics import Chamfer, chamfer_distance, color_error, silhouette_iou

__all__ = ["Chamfer", "chamfer_distance", "color_error", "silhouette_iou"]
