"""What a crfr process does for itself: keep freed memory (memory), record what a pipeline stage cost (usage)."""
