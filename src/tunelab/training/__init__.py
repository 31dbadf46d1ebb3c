"""Training: the one loop (it never names a method or a task), checkpoints, the run lock, the
divergence guard, preflight checks, experiment tracking and run sizing (``tunelab bench``)."""
