"""One writer at a time: an exclusive ``flock`` on a lock file, the one design difflr uses to
keep writers apart (a Learner's checkpoint folder, the pretrained-backbone cache).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FolderLock", "one_builder"]


class FolderLock:
    """An exclusive ``flock`` on a lock file: the one way difflr keeps two writers apart.

    The system releases the lock when its holder exits or is killed, so a lock is never left
    stale and a reused process id cannot fool it. Locks taken through two opens conflict also
    within one process. The lock file stays when released (deleting it would let a third process
    lock a new file while a second holds the old one); while held it names its holder (process
    id, host, ``owner``) for the messages of those refused. A symlink at the lock file is refused,
    never followed. Where ``fcntl`` does not exist (Windows) nothing is locked.

    Args:
        file: The lock file (its folder is created).
        owner: Who holds it, for messages.
    """

    def __init__(self, file: Path, owner: str = "") -> None:
        self.file, self.owner = Path(file), owner
        self._descriptor: int | None = None

    def acquire(self, wait: bool, on_wait: Callable[[], Any] | None = None) -> bool:
        """Take the lock; without ``wait``, return ``False`` at once if another holds it.

        Raises:
            OSError: The lock file cannot be made (a full disk, no permission, a symlink there);
                the message names it.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            descriptor = os.open(self.file, flags, 0o644)
        except OSError as error:
            hint = (
                " It is a symlink: difflr does not follow one there; remove it."
                if error.errno == errno.ELOOP
                else " Free disk space or choose another path."
            )
            raise OSError(
                error.errno, f"cannot open the lock file {self.file} ({error.strerror}).{hint}"
            ) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(descriptor)
                return False
            if on_wait is not None:
                on_wait()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        self._descriptor = descriptor
        self._note_holder()
        return True

    def _note_holder(self) -> None:
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner})
        try:
            os.ftruncate(self._descriptor, 0)
            if os.pwrite(self._descriptor, me.encode(), 0) < len(me.encode()):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write
        except OSError as error:
            self.release()
            raise OSError(
                error.errno,
                f"could not write the lock file {self.file} ({error.strerror}); nothing was "
                "changed. Free disk space or choose another path.",
            ) from error

    def holder(self) -> dict[str, Any]:
        """Who holds the lock, as its holder wrote it (empty if unreadable)."""
        try:
            holder = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)  # closing the descriptor drops the flock
            self._descriptor = None


@contextlib.contextmanager
def one_builder(file: Path, on_wait: Callable[[], Any] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``file`` + ``.lock`` for the body (`FolderLock`, waiting for
    it): processes (and threads) that would build the same file take turns, so the second finds
    the first one's result instead of redoing minutes of work beside it.

    Args:
        file: The file to build; the lock file sits next to it (its folder is created).
        on_wait: Called once, before blocking, when another builder holds the lock (to say so).
    """
    lock = FolderLock(Path(file).with_name(Path(file).name + ".lock"))
    lock.acquire(wait=True, on_wait=on_wait)
    try:
        yield
    finally:
        lock.release()
