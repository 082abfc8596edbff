"""tcdistill: Trajectory Consistency Distillation for Stable Diffusion."""

__version__ = "0.1.0"
