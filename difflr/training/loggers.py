"""A logger wrapper that makes the successive fits of one Learner a single timeline."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from typing_extensions import override

from difflr.utils.files import os_error_behind

__all__ = ["ContinuousLogger", "make_logger"]


class ContinuousLogger(Logger):
    """Wrap any Lightning logger and shift the step (and epoch) of everything it logs.

    Every fit of a Learner runs in a fresh ``Trainer`` whose step counter starts at 0; the Learner
    moves ``step_offset`` and ``epoch_offset`` past each fit so that TensorBoard shows the fits one
    after another instead of on top of each other.

    Args:
        logger: The logger that writes (``TensorBoardLogger``, ``CSVLogger``, ...).
    """

    def __init__(self, logger: Logger) -> None:
        super().__init__()
        self.logger = logger
        self.step_offset = 0
        self.epoch_offset = 0

    @property
    @override
    def name(self) -> str | None:
        return self.logger.name

    @property
    @override
    def version(self) -> int | str | None:
        return self.logger.version

    @property
    @override
    def save_dir(self) -> str | None:
        return self.logger.save_dir

    @property
    @override
    def log_dir(self) -> str | None:
        return getattr(self.logger, "log_dir", self.logger.save_dir)

    @property
    def experiment(self) -> Any:
        with self._writing():  # made at the first use: its event file is written then
            return self.logger.experiment

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + self.epoch_offset}
        with self._writing():
            self.logger.log_metrics(metrics, None if step is None else step + self.step_offset)

    @override
    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        with self._writing():
            self.logger.log_hyperparams(params, *args, **kwargs)

    @override
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        with self._writing():
            self.logger.log_graph(model, input_array)

    @override
    def save(self) -> None:
        with self._writing():
            self.logger.save()

    @override
    def finalize(self, status: str) -> None:
        try:
            with self._writing():
                self.logger.finalize(status)
        except OSError:
            if status != "failed":
                raise
            # The fit is already failing, with this write error or another one: let that one
            # through rather than the writer's echo of it.

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed write into an OSError that names the folder and the fix (Lightning's
        TensorBoardLogger reports a full disk as "you tried to log 1.0")."""
        try:
            yield
        except (ValueError, OSError) as error:
            cause = os_error_behind(error)
            if cause is None:
                raise
            raise OSError(
                cause.errno,
                f"could not write the logs in {self.log_dir} ({cause.strerror or cause}); free "
                "disk space, or pass logger=False to train without logs (checkpoints are "
                "separate and keep their last good file).",
            ) from error

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.logger.after_save_checkpoint(checkpoint_callback)


def make_logger(logger: bool | Logger | None, path: Path) -> ContinuousLogger | None:
    """The Learner's ``logger`` argument as one timeline: ``True`` is TensorBoard under
    ``path/lightning_logs``, ``False``/``None`` none, a Lightning ``Logger`` itself.

    Raises:
        TypeError: ``logger`` is none of those.
    """
    if logger is True:
        return ContinuousLogger(TensorBoardLogger(save_dir=str(path), name="lightning_logs"))
    if logger is False or logger is None:
        return None
    if isinstance(logger, Logger):
        return ContinuousLogger(logger)
    raise TypeError(f"logger must be True, False or a Lightning Logger, got {logger!r}.")
