"""``atomic_write``: the one way the project writes a file atomically (checkpoints, their
``last_checkpoint`` tag, converted and rescued weights)."""

import contextlib
import os
import tempfile

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Within the block, a file open in ``mode`` ("wb", or "w" for UTF-8 text) on a temporary
    file beside ``path``. On a normal exit the file is flushed to disk and renamed to ``path``;
    on an exception it is deleted. ``path`` is thus its old content or the whole new one, never
    a part of it. The temporary name ``.{name}.*.partial`` is one detectron2 never lists among
    the ``.pth`` checkpoints, in case a killed process leaves it behind."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: expected 'wb' or 'w'")
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".partial")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); the result not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk before anything (last_checkpoint) refers to it.
    with contextlib.suppress(OSError):  # folders cannot be opened on every system (Windows)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask
