"""In-process simulator: the round loop, checkpoints and reports."""
