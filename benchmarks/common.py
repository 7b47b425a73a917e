"""What the benchmark scripts share: the machine they ran on, timing a `quantlab convert`, and saving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def machine() -> dict:
    """The CPU model and its vector-ISA flags, cores, memory and package versions (quantlab.bench's record)."""
    from quantlab.bench.runner import machine_info

    return machine_info()


def run_convert(args: list[str]) -> dict:
    """Time one `quantlab convert` in a fresh process. Peak RSS is GNU time's %M, which measures the
    exec'ed process alone (wait4's ru_maxrss would also count this parent's pages copied at fork)."""
    start = time.perf_counter()
    cmd = ["/usr/bin/time", "-f", "peak_rss_kb=%M", sys.executable, "-m", "quantlab", "convert", *args, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"convert {args} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(proc.stderr.strip().splitlines()[-1].split("=")[1])
    return {"wall_s": round(wall, 2), "peak_rss_bytes": rss_kb * 1024, "stdout": proc.stdout.strip()}


def save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def replace_block(text: str, block: str, start: str, end: str) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``block`` (generated
    README sections); ValueError when the markers are missing."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {start} ... {end} block")
    return text[: i + len(start)] + "\n" + block.rstrip("\n") + "\n" + text[j:]
