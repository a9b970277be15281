"""One way to write a file atomically: every file deepshift writes goes through :func:`atomic_path`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _new_file_mode() -> int:
    """The permissions ``open()`` would give a new file: ``0o666`` less the process umask."""
    # os.umask can only be read by setting it; the two calls restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    The temporary file is made in the same folder (so ``os.replace`` is atomic), keeps ``path``'s
    suffix (writers that pick a format from it, like matplotlib, still work), is flushed to disk
    and gets the permissions of an ordinary new file (``mkstemp``'s 0600 would otherwise stick).
    If the block raises (Ctrl-C included), the temporary file is removed and ``path`` is left as
    it was: a killed run never leaves a half-written file.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
