"""sds3d: text to 3D by score distillation, CPU first."""

__version__ = "0.1.0"
