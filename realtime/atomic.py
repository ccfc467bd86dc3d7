"""Atomic output files: written under a temporary name in the same folder, renamed when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from models.bundle import current_umask
from models.errors import ParameterError, TarabError

__all__ = ["atomic_output", "check_writable"]


def check_writable(path, force: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot be created.

    Raises
    ------
    TarabError
        The folder does not exist or is not writable, or ``path`` exists and ``force`` is False.
    """
    p = Path(path)
    if p.exists() and not force:
        raise TarabError(f"{p} exists; pass --force to overwrite it")
    if p.is_dir():
        raise ParameterError(f"{p} is a directory, expected a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise TarabError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise TarabError(f"{parent}: output folder is not writable")
    return p


@contextlib.contextmanager
def atomic_output(path, force: bool = False):
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "x.txt").read_text()
    'hello'
    """
    p = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=p.suffix, dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the user's usual mode
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
