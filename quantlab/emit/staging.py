"""Write an output folder atomically: build it in a staging folder beside it, then rename into place.

A crash, Ctrl-C or kill at any point leaves either no output or a complete one, and an existing
output is never half overwritten: it is moved aside only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantlab.errors import InputError


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) for the duration, so ``finally`` blocks clean up."""

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``out_dir``, on any failure it is removed."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise InputError(out, None, "output already exists (pass --force to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=parent))
    except OSError as e:
        raise InputError(parent, None, f"cannot create the output folder: {e.strerror}") from e
    try:
        with terminate_as_exit():
            yield staging
            _fsync_tree(staging)
            if out.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                os.rename(out, aside / out.name)
                os.rename(staging, out)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
