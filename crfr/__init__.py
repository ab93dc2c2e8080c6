"""crfr: cross-resolution face recognition with WaveResNet and knowledge distillation."""

from crfr.process.memory import keep_freed_memory

__version__ = "0.1.0"

keep_freed_memory()
