"""crfr: cross-resolution face recognition with WaveResNet and knowledge distillation."""

__version__ = "0.1.0"
