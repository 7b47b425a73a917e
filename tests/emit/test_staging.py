"""The artifact folder appears whole or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from quantlab.emit.staging import staged_output
from quantlab.errors import InputError


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_success_renames_staging_into_place(tmp_path):
    out = tmp_path / "art"
    with staged_output(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".art.staging-")
        (stage / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert _siblings(out) == ["art"]


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), staged_output(out) as stage:
        (stage / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("disk full")
    assert _siblings(out) == []


def test_failure_keeps_existing_output_untouched(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_output(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old"
    assert _siblings(out) == ["art"]


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(InputError, match="--force"), staged_output(out):
        pass


def test_sigterm_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import os, sys, time
        from quantlab.emit.staging import staged_output
        with staged_output({str(out)!r}) as stage:
            (stage / "part").write_bytes(b"x")
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert list(tmp_path.iterdir()) == []
