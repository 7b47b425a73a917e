"""Build a bundle: an artifact's model, tokenizer and configs for one target, with a manifest and a runner.

    model.onnx (+ model.onnx.data)   the artifact's graph (MatMulNBits accuracy_level set for the target)
    tokenizer files, genai_config.json, config.json
    kernels/_libquantlab_kernels.so  native targets that ship csrc/ (cpu-arm64: the AArch64 build)
    run_bundle.py                    greedy generation with only onnxruntime, numpy and tokenizers
    manifest.json                    every file's sha256 and size, recipe, quality, source hash, versions,
                                     target, and the greedy ids run_bundle.py produced at package time
    manifest.sha256                  manifest.json's sha256, and that line's own sha256

Same inputs, same bytes: nothing records a time, a host or a path; the zip has sorted entries, fixed
timestamps (1980-01-01) and fixed permissions; ``--ort``'s model.ort is re-serialized in one canonical
layout (:mod:`quantlab.package.ort_format`), since onnxruntime's writer varies per run. Integrity, not
authenticity: the hashes catch corruption and edits that do not also rewrite them; sign the bundle if
you need the latter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantlab.emit.artifact import DATA_FILE, MANIFEST_FILE, MODEL_FILE, dependency_versions, read_manifest, write_json
from quantlab.emit.staging import staged_output, temporary_prefix
from quantlab.errors import InputError
from quantlab.io.spec import sha256_file
from quantlab.package.fit import fit_to_budget, layer_precisions
from quantlab.package.kernels import LIBRARY_NAME, elf_machine, kernel_library
from quantlab.package.ort_format import canonical_ort
from quantlab.package.targets import CONTRIB_DOMAIN, TARGETS, Target

logger = logging.getLogger(__name__)

BUNDLE_VERSION = 1
RUNNER_FILE = "run_bundle.py"
DIGEST_FILE = "manifest.sha256"
KERNEL_DIR = "kernels"
DEFAULT_PROMPT = "Once upon a time"  # HF tokenizers; llama2.c bundles start from BOS (id 1)
DEFAULT_MAX_NEW_TOKENS = 16
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ZIP_LEVEL = 6  # zlib default: level 9 is about 2x slower for under 1% smaller on weights
RUNNER_TIMEOUT_S = 600
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'120MB' -> 120_000_000, '1.5GB', '64MiB', '4096' (bytes)."""
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(None, "--max-size", f"expected a size like 120MB, 1.5GB or a byte count, got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@dataclasses.dataclass(frozen=True)
class BundleResult:
    path: Path
    bytes: int
    manifest: dict


def _digest_text(manifest_sha: str) -> str:
    line = f"{manifest_sha}  {MANIFEST_FILE}\n"
    return line + f"{hashlib.sha256(line.encode()).hexdigest()}  {DIGEST_FILE}\n"


def _graph_for_target(model_path: Path, target: Target):
    """Check the op set against the target; returns (proto or None if unchanged, op domains, changes)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    domains = sorted({n.domain or "ai.onnx" for n in proto.graph.node})
    contrib = sorted({n.op_type for n in proto.graph.node if n.domain == CONTRIB_DOMAIN})
    if contrib and not target.contrib_ops:
        raise InputError(
            model_path,
            None,
            f"target {target.name} allows only standard ONNX ops, the graph uses {CONTRIB_DOMAIN} "
            f'{", ".join(contrib)}: convert with a recipe file holding format = "qdq" and embedding = "none"',
        )
    changed = 0
    previous = set()
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or target.accuracy_level is None:
            continue
        attr = next((a for a in node.attribute if a.name == "accuracy_level"), None)
        level = attr.i if attr is not None else 0
        previous.add(level)
        if level != target.accuracy_level:
            if attr is None:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", target.accuracy_level))
            else:
                attr.i = target.accuracy_level
            changed += 1
    changes = {}
    if changed:
        changes["accuracy_level"] = {"from": sorted(previous), "to": target.accuracy_level, "nodes": changed}
    return (proto if changed else None), domains, changes


RUNNER_SOURCE = Path(__file__).with_name(RUNNER_FILE)


def run_runner(folder: Path, args: list[str], *, python: str | None = None, timeout: int = RUNNER_TIMEOUT_S) -> dict:
    """Run run_bundle.py over ``folder`` in a fresh isolated interpreter (``python -I``); its JSON result.

    The runner is this installation's copy, started from an empty temporary folder: verifying a bundle
    never executes code the bundle carries, and nothing in the bundle can shadow a module on sys.path.
    The bundle's own run_bundle.py is the same file (its hash is checked like every other file's).
    """
    folder = Path(folder).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    with tempfile.TemporaryDirectory(prefix="quantlab-runner-") as tmp:
        runner = Path(tmp) / RUNNER_FILE
        shutil.copyfile(RUNNER_SOURCE, runner)
        cmd = [python or sys.executable, "-I", str(runner), str(folder), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{RUNNER_FILE} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _copy_artifact_files(artifact: Path, manifest: dict, stage: Path, skip: set[str]) -> None:
    for name, info in sorted(manifest["files"].items()):
        if name in skip:
            continue
        src = artifact / name
        if not src.is_file():
            raise InputError(src, None, "listed in the artifact's manifest but missing")
        shutil.copyfile(src, stage / name)
        if sha256_file(stage / name) != info["sha256"]:
            raise InputError(src, None, "does not match the sha256 in the artifact's manifest.json")


ORT_FILE = "model.ort"
ORT_OPERATORS_FILE = "model.required_operators.config"
ORT_PLATFORMS = {"cpu-arm64": "arm"}  # onnxruntime's --target_platform; amd64 otherwise
# the operator config's own header names the temporary folder it was converted in
ORT_CONFIG_HEADER = "# Generated from model/s:\n# - model.ort\n"


def _convert_to_ort(stage: Path, target: Target) -> None:
    """model.onnx + model.onnx.data in ``stage`` -> model.ort (weights inline) + the operator config,
    with onnxruntime's own tool (``onnxruntime.tools.convert_onnx_models_to_ort``), then laid out
    canonically (:func:`quantlab.package.ort_format.canonical_ort`): the tool's bytes vary per run."""
    with tempfile.TemporaryDirectory(prefix="quantlab-ort-") as tmp:
        work, out = Path(tmp) / "in", Path(tmp) / "out"
        work.mkdir()
        for name in (MODEL_FILE, DATA_FILE):
            if (stage / name).is_file():
                os.replace(stage / name, work / name)
        platform = ORT_PLATFORMS.get(target.name, "amd64")
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work / MODEL_FILE)]
        cmd += ["--output_dir", str(out), "--optimization_style", "Fixed", "--target_platform", platform]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNNER_TIMEOUT_S)
        if proc.returncode != 0 or not (out / ORT_FILE).is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise InputError(None, "--ort", f"onnxruntime could not convert the model to the ORT format: {tail[0]}")
        (stage / ORT_FILE).write_bytes(canonical_ort((out / ORT_FILE).read_bytes()))
        operators = (out / ORT_OPERATORS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
        body = "".join(line for line in operators if not line.startswith("#"))
        (stage / ORT_OPERATORS_FILE).write_text(ORT_CONFIG_HEADER + body, encoding="utf-8")
    config = json.loads((stage / "genai_config.json").read_text(encoding="utf-8"))
    config["model"]["decoder"]["filename"] = ORT_FILE
    write_json(stage / "genai_config.json", config)


def _write_bundle_folder(
    artifact: Path,
    stage: Path,
    target: Target,
    *,
    prompt: str | None,
    max_new_tokens: int,
    python: str | None,
    ort_format: bool = False,
    fit: dict | None = None,
) -> dict:
    try:
        art = read_manifest(artifact)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(artifact / MANIFEST_FILE, None, f"not an artifact folder: {e}") from e
    model_path = artifact / MODEL_FILE
    if not model_path.is_file():
        raise InputError(artifact, MODEL_FILE, "not an artifact folder (no model.onnx)")
    proto, domains, changes = _graph_for_target(model_path, target)
    _copy_artifact_files(artifact, art, stage, skip={MODEL_FILE} if proto is not None else set())
    if proto is not None:  # only the graph proto changes; the external data was copied byte for byte
        (stage / MODEL_FILE).write_bytes(proto.SerializeToString(deterministic=True))
    if ort_format:
        _convert_to_ort(stage, target)
    model_file = ORT_FILE if ort_format else MODEL_FILE
    kernels = None
    if target.kernel_arch is not None:
        (stage / KERNEL_DIR).mkdir()
        library = stage / KERNEL_DIR / LIBRARY_NAME
        shutil.copyfile(kernel_library(target), library)
        elf = elf_machine(library)
        if elf["e_machine"] != target.elf_machine:
            raise RuntimeError(f"kernel library for {target.name} is {elf['machine']}, not {target.kernel_arch}")
        kernels = {"file": f"{KERNEL_DIR}/{LIBRARY_NAME}", "elf": elf}
    shutil.copyfile(RUNNER_SOURCE, stage / RUNNER_FILE)

    hf_tokenizer = (stage / "tokenizer.json").is_file()
    generation: dict = {"max_new_tokens": max_new_tokens}
    if hf_tokenizer:
        generation["prompt"] = prompt or DEFAULT_PROMPT
        args = ["--prompt", generation["prompt"]]
    else:
        generation["prompt_ids"] = [int(art["spec"].get("bos_token_id") or 1)]
        args = ["--prompt-ids", ",".join(map(str, generation["prompt_ids"]))]
    args += ["--model", model_file, "--max-new-tokens", str(max_new_tokens)]
    result = run_runner(stage, args, python=python)
    generation.update(prompt_ids=result["prompt_ids"], ids=result["ids"], text=result["text"])

    files = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        files[path.relative_to(stage).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "bundle_version": BUNDLE_VERSION,
        "producer": "quantlab package",
        "target": {**dataclasses.asdict(target), "op_domains": domains},
        "model_file": model_file,
        "deterministic": True,
        "graph_changes": changes,
        "versions": dependency_versions(),
        "artifact": {"manifest_sha256": sha256_file(artifact / MANIFEST_FILE), "versions": art.get("versions")},
        "source": art.get("source"),
        "spec": art.get("spec"),
        "recipe": art.get("recipe"),
        "quality": art.get("quality"),
        "latency": art.get("latency") or art.get("bench"),
        "kv_cache": art.get("kv_cache"),
        "tokenizer": art.get("tokenizer"),
        "kernels": kernels,
        "precisions": layer_precisions(model_path),
        "fit": fit,
        "generation": generation,
        "files": files,
    }
    write_json(stage / MANIFEST_FILE, manifest)
    (stage / DIGEST_FILE).write_text(_digest_text(sha256_file(stage / MANIFEST_FILE)), encoding="utf-8")
    return manifest


def write_deterministic_zip(folder: Path, zip_path: Path) -> None:
    """Sorted entries, 1980-01-01 timestamps, 0644 permissions, deflate at a fixed level."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as zf:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the permission bits below are what readers see
            info.external_attr = 0o100644 << 16
            size = (folder / name).stat().st_size
            with open(folder / name, "rb") as src, zf.open(info, "w", force_zip64=size >= 1 << 31) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_budget(size: int, max_size: int | None, recipe: dict | None) -> None:
    if max_size is not None and size > max_size:
        scheme = (recipe or {}).get("name", "the artifact's recipe")
        raise InputError(
            None,
            "--max-size",
            f"the bundle is {size / 1e6:.3f} MB ({size} bytes), over the budget of {max_size / 1e6:.3f} MB "
            f"({max_size} bytes) with {scheme}; convert with a smaller recipe (fewer bits, larger groups, "
            "embedding quantized); nothing written",
        )


def build_bundle(
    artifact: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target: str = "cpu-x86_64",
    max_size: int | None = None,
    as_zip: bool = False,
    overwrite: bool = False,
    prompt: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    python: str | None = None,
    ort_format: bool = False,
    fit_source: str | os.PathLike | None = None,
    _fit: dict | None = None,
) -> BundleResult:
    """Package ``artifact`` for ``target`` into the folder ``out`` (or the zip file ``out`` with ``as_zip``)."""
    if target not in TARGETS:
        raise InputError(None, "--target", f"expected one of {', '.join(TARGETS)}, got {target!r}")
    artifact, out = Path(artifact), Path(out).absolute()
    if ort_format and target == "cuda":
        raise InputError(None, "--ort", "the ORT format is for minimal and mobile CPU builds, not the cuda target")
    if not artifact.is_dir():
        raise InputError(artifact, None, "not a folder (pass an artifact written by quantlab convert)")
    if fit_source is not None:
        if max_size is None:
            raise InputError(None, "--fit", "needs --max-size, the budget to fit")
        if out.exists() and not overwrite:
            raise InputError(out, None, "output already exists (pass --force to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=temporary_prefix(out, "staging"), dir=out.parent) as tmp:
            extra = 0
            if TARGETS[target].kernel_arch is not None:
                extra = kernel_library(TARGETS[target]).stat().st_size
            chosen, report = fit_to_budget(artifact, fit_source, max_size, TARGETS[target], Path(tmp), extra)
            return build_bundle(
                chosen, out, target=target, max_size=max_size, as_zip=as_zip, overwrite=overwrite, prompt=prompt,
                max_new_tokens=max_new_tokens, python=python, ort_format=ort_format, _fit=report,
            )  # fmt: skip
    if not as_zip:
        with staged_output(out, overwrite=overwrite) as stage:
            manifest = _write_bundle_folder(
                artifact,
                stage,
                TARGETS[target],
                prompt=prompt,
                max_new_tokens=max_new_tokens,
                python=python,
                ort_format=ort_format,
                fit=_fit,
            )
            size = _tree_bytes(stage)
            _check_budget(size, max_size, manifest["recipe"])
        return BundleResult(out, size, manifest)
    if out.exists() and not overwrite:
        raise InputError(out, None, "output already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=temporary_prefix(out, "staging"), dir=out.parent) as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        manifest = _write_bundle_folder(
            artifact,
            folder,
            TARGETS[target],
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            python=python,
            ort_format=ort_format,
            fit=_fit,
        )
        staged_zip = Path(tmp) / out.name
        write_deterministic_zip(folder, staged_zip)
        size = staged_zip.stat().st_size
        _check_budget(size, max_size, manifest["recipe"])
        os.replace(staged_zip, out)
    return BundleResult(out, size, manifest)
