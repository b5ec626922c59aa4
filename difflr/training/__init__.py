"""Running Lightning for a Learner: the one Trainer builder (runner), the one batch reader
(module), data and loaders, checkpoints, the LR finder, distributed runs, loggers."""

__all__: list[str] = []
