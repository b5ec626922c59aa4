"""Where output goes: the width a terminal line may take."""

from __future__ import annotations

import io
import os
import sys

import pytest

from difflr.utils.display import terminal_width


def test_a_line_to_a_pipe_or_a_file_has_no_width_limit(tmp_path):
    assert terminal_width(io.StringIO()) is None
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        assert terminal_width(pipe) is None
    with open(tmp_path / "log.txt", "w") as file:
        assert terminal_width(file) is None


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_a_line_to_a_terminal_keeps_its_last_column_free():
    import fcntl
    import pty
    import struct
    import termios

    main, child = pty.openpty()
    try:
        with os.fdopen(os.dup(child), "w") as terminal:
            fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
            assert terminal_width(terminal) == 99
            # A terminal whose size is unknown (0 columns) has no limit either.
            fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert terminal_width(terminal) is None
    finally:
        os.close(main)
        os.close(child)
