"""Writing a file in one step, so that no reader ever finds half of it.

Every file lrpcpp writes (JSON, HTML, LaTeX, PNG, exported models) goes through :func:`atomic_path`:
the content is written to a temporary file in the same folder, which then replaces the destination
with ``os.replace``. A run that fails or is interrupted on the way leaves the destination as it was
(absent, or the previous version) and removes its temporary file.
"""

import contextlib
import os
import stat
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_path", "atomic_write"]


def _mode(target: str) -> int:
    """The permissions of the file written: those of the file it replaces, or the usual new-file ones."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path`` to write the file to. When the block ends normally, the
    temporary file replaces ``path`` in one step; when it raises (``KeyboardInterrupt`` included),
    the temporary file is removed and ``path`` is untouched. A symbolic link ``path`` is written
    through: the file it points to is replaced. The temporary name keeps the extension of ``path``
    (``.NAME.XXXX.part.EXT``), for writers that choose a format by it."""
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".part{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _mode(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, binary: bool = False) -> Iterator[IO]:
    """An open file (text in UTF-8, or ``binary``) whose content replaces ``path`` in one step when
    the block ends normally (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
