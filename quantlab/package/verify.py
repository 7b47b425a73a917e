"""Verify a bundle (folder or zip): every file's hash, then greedy generation in a fresh interpreter.

The generation runs this installation's ``run_bundle.py`` (the bundle's copy is hash-checked, never
executed) over the bundle with ``python -I`` (isolated: no PYTHONPATH, no user site, no
current directory on sys.path), so with ``python`` pointing at a virtual environment that holds only
onnxruntime, numpy and tokenizers it proves the bundle needs nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from quantlab.emit.artifact import MANIFEST_FILE
from quantlab.errors import InputError
from quantlab.io.spec import sha256_file
from quantlab.package.bundle import DIGEST_FILE, RUNNER_FILE, run_runner


@dataclasses.dataclass
class VerifyReport:
    problems: list[str] = dataclasses.field(default_factory=list)  # "FILE: what is wrong"
    files_checked: int = 0
    generation: dict | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_digest(folder: Path, report: VerifyReport) -> None:
    path = folder / DIGEST_FILE
    if not path.is_file():
        report.problems.append(f"{DIGEST_FILE}: missing")
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    if len(lines) != 2 or not lines[1].endswith(f"  {DIGEST_FILE}\n"):
        report.problems.append(f"{DIGEST_FILE}: malformed")
        return
    if hashlib.sha256(lines[0].encode()).hexdigest() != lines[1].split()[0]:
        report.problems.append(f"{DIGEST_FILE}: its own checksum does not match (the file was modified)")
        return
    if not (folder / MANIFEST_FILE).is_file():
        report.problems.append(f"{MANIFEST_FILE}: missing")
    elif sha256_file(folder / MANIFEST_FILE) != lines[0].split()[0]:
        report.problems.append(f"{MANIFEST_FILE}: sha256 mismatch (the file was modified)")


def verify_folder(folder: Path, *, python: str | None = None, generate: bool = True) -> VerifyReport:
    start = time.perf_counter()
    report = VerifyReport()
    _check_digest(folder, report)
    if report.problems:
        report.seconds = time.perf_counter() - start
        return report
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        listed = manifest["files"]
        expected = manifest["generation"]
        expected_args = ["--prompt-ids", ",".join(str(int(t)) for t in expected["prompt_ids"])]
        model_file = str(manifest.get("model_file", "model.onnx"))
        if model_file not in listed:
            raise KeyError(f"model_file {model_file!r} is not one of the bundle's files")
        expected_args += ["--model", model_file]
        expected_args += ["--max-new-tokens", str(int(expected["max_new_tokens"]))]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        report.problems.append(f"{MANIFEST_FILE}: unreadable ({type(e).__name__}: {e})")
        report.seconds = time.perf_counter() - start
        return report
    for name, info in sorted(listed.items()):
        path = folder / name
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or not isinstance(info, dict):
            report.problems.append(f"{MANIFEST_FILE}: bad file entry {name!r}")
        elif not path.is_file():
            report.problems.append(f"{name}: missing")
        elif path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            report.problems.append(f"{name}: sha256 mismatch (the file was modified)")
        report.files_checked += 1
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in listed and name not in (MANIFEST_FILE, DIGEST_FILE):
            report.problems.append(f"{name}: not listed in the manifest")
    if generate and not report.problems:
        try:
            result = run_runner(folder, expected_args, python=python)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
            report.problems.append(f"{RUNNER_FILE}: generation failed: {e}")
        else:
            report.generation = result
            if result["ids"] != expected["ids"]:
                report.problems.append(
                    f"{model_file}: greedy ids {result['ids']} differ from the manifest's {expected['ids']}"
                )
            if result.get("foreign_modules"):
                report.problems.append(f"{RUNNER_FILE}: imported {', '.join(result['foreign_modules'])}")
    report.seconds = time.perf_counter() - start
    return report


def _safe_extract(zip_path: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if info.filename.startswith("/") or ".." in parts or info.is_dir():
                    raise InputError(zip_path, info.filename, "unsafe or unexpected zip entry")
                zf.extract(info, dest)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise InputError(zip_path, None, f"not a valid zip file: {e}") from e


def verify_bundle(bundle: str | os.PathLike, *, python: str | None = None, generate: bool = True) -> VerifyReport:
    """Check a bundle folder or zip; ``report.problems`` names each tampered, missing or extra file."""
    bundle = Path(bundle)
    if bundle.is_dir():
        return verify_folder(bundle, python=python, generate=generate)
    if not bundle.is_file():
        raise InputError(bundle, None, "no such bundle (a folder or a .zip written by quantlab package)")
    with tempfile.TemporaryDirectory(prefix="quantlab-verify-") as tmp:
        _safe_extract(bundle, Path(tmp))
        return verify_folder(Path(tmp), python=python, generate=generate)
