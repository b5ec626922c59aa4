"""Lightning callbacks that drop into any Trainer: the scheduler, the recorder (and the one
step-loss reader it shares), gradual unfreezing, guards and progress."""

__all__: list[str] = []
