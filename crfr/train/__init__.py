"""The training steps: the teacher on HR faces and the student distilled on LR faces, with resumable checkpoints
and torchrun's distributed data parallel."""
