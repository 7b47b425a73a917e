"""Write an output folder atomically: build it in a staging folder beside it, then rename into place.

A crash, Ctrl-C or kill at any point leaves either no output or a complete one, and an existing
output is never half overwritten: it is moved aside only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantlab.errors import InputError

# Write failures that are the user's environment, not a bug: reported in one line, exit 2.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# Headroom the preflight asks for beyond the estimate (filesystem metadata, the tokenizer, JSON files).
FREE_SPACE_MARGIN = 1.05
FREE_SPACE_SLACK_BYTES = 16 << 20


def temporary_prefix(out: Path, kind: str) -> str:
    """``.{out}.{kind}-{pid}-``: the owner's pid lets a later run remove what a kill -9 left behind."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary folders beside ``out_dir`` whose owning process is gone (killed with -9, say)."""
    out = Path(out_dir).absolute()
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("staging", "old", "baseline") or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_free_space(folder: str | os.PathLike, needed_bytes: int) -> None:
    """Refuse before any work when ``folder``'s filesystem cannot hold about ``needed_bytes`` more."""
    folder = Path(folder)
    free = shutil.disk_usage(folder).free
    want = int(needed_bytes * FREE_SPACE_MARGIN) + FREE_SPACE_SLACK_BYTES
    if free < want:
        raise InputError(
            folder,
            None,
            f"not enough free disk space: the conversion needs about {want / 1e6:.1f} MB, {free / 1e6:.1f} MB are free",
        )


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
        staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "staging"), dir=parent))
    except OSError as e:
        raise InputError(parent, None, f"cannot create the output folder: {e.strerror}") from e
    try:
        with terminate_as_exit():
            yield staging
            _fsync_tree(staging)
            if out.exists():
                aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "old"), dir=parent))
                os.rename(out, aside / out.name)
                os.rename(staging, out)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in ENVIRONMENT_ERRNOS:
            raise InputError(e.filename or out, None, f"cannot write the output: {e.strerror}") from e
        raise
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
