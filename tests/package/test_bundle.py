"""quantlab package / verify on stories260K: round trip, determinism, tamper detection, targets, budget."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from quantlab import api
from quantlab.cli.main import main
from quantlab.errors import InputError
from quantlab.package.bundle import DIGEST_FILE, build_bundle, parse_size
from quantlab.package.kernels import elf_machine
from quantlab.package.verify import verify_bundle
from tests.models import model_path

MAX_NEW_TOKENS = 16


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bundle(stories_w4, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["package", str(stories_w4), "-o", str(out), "--target", "cpu-x86_64"]) == 0
    return out


def test_package_then_verify_passes_and_matches_quantlab_generate(bundle, stories_w4, capsys):
    capsys.readouterr()
    assert main(["verify", str(bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    # an independent path to the same ids: quantlab's own generation loop over the artifact
    expected = api.generate_ids(stories_w4, [1], max_new_tokens=MAX_NEW_TOKENS)
    assert manifest["generation"]["ids"] == expected == report["generation"]["ids"]
    assert report["generation"]["foreign_modules"] == []
    assert set(manifest["files"]) == set(_files(bundle)) - {"manifest.json", DIGEST_FILE}
    assert manifest["target"]["name"] == "cpu-x86_64" and manifest["source"]["format"] == "llama2c"
    assert {"onnxruntime", "onnx", "quantlab"} <= set(manifest["versions"])


def test_rebuild_gives_identical_bytes_folder_and_zip(bundle, stories_w4, tmp_path):
    again = tmp_path / "again"
    build_bundle(stories_w4, again)
    assert _files(again) == _files(bundle)
    for name in _files(bundle):
        assert (again / name).read_bytes() == (bundle / name).read_bytes(), name
    zips = [build_bundle(stories_w4, tmp_path / f"{i}.zip", as_zip=True).path for i in range(2)]
    assert zips[0].read_bytes() == zips[1].read_bytes()
    assert verify_bundle(zips[0]).ok


def test_flipping_one_byte_in_any_file_names_it(bundle, tmp_path, capsys):
    names = _files(bundle)
    assert {"model.onnx", "model.onnx.data", "manifest.json", DIGEST_FILE, "run_bundle.py"} <= set(names)
    for name in names:
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(bundle, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        capsys.readouterr()
        assert main(["verify", str(copy)]) == 2, name
        err = capsys.readouterr().err
        assert f"verify: {name}:" in err, (name, err)


def test_missing_and_extra_files_are_named(bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "tokenizer.bin").unlink()
    (copy / "extra.txt").write_text("x")
    capsys.readouterr()
    assert main(["verify", str(copy), "--no-generate"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.bin: missing" in err and "extra.txt: not listed" in err


def test_recorded_ids_that_the_model_does_not_produce_fail(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"]["ids"][-1] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from quantlab.io.spec import sha256_file
    from quantlab.package.bundle import _digest_text

    (copy / DIGEST_FILE).write_text(_digest_text(sha256_file(copy / "manifest.json")))
    report = verify_bundle(copy)
    assert not report.ok and report.problems[0].startswith("model.onnx: greedy ids")


def test_portable_rejects_contrib_ops_and_accepts_qdq(stories_w4, stories_qdq, tmp_path, capsys):
    capsys.readouterr()
    assert main(["package", str(stories_w4), "-o", str(tmp_path / "p"), "--target", "portable"]) == 2
    err = capsys.readouterr().err
    assert "MatMulNBits" in err and 'format = "qdq"' in err
    assert not (tmp_path / "p").exists()
    result = build_bundle(stories_qdq, tmp_path / "q", target="portable")
    assert result.manifest["target"]["op_domains"] == ["ai.onnx"]
    assert verify_bundle(result.path).ok


def test_cuda_target_rewrites_accuracy_level_and_keeps_external_data(stories_w4, tmp_path):
    import onnx

    result = build_bundle(stories_w4, tmp_path / "c", target="cuda")
    change = result.manifest["graph_changes"]["accuracy_level"]
    assert change["from"] == [4] and change["to"] == 0 and change["nodes"] > 0
    proto = onnx.load(str(result.path / "model.onnx"), load_external_data=False)
    levels = {
        a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"
    }
    assert levels == {0}
    assert (result.path / "model.onnx.data").read_bytes() == (stories_w4 / "model.onnx.data").read_bytes()
    assert verify_bundle(result.path).ok


def test_max_size_too_small_fails_cleanly_with_nothing_written(stories_w4, tmp_path, capsys):
    capsys.readouterr()
    for extra in ([], ["--zip"]):
        out = tmp_path / ("b.zip" if extra else "b")
        assert main(["package", str(stories_w4), "-o", str(out), "--max-size", "100kB", *extra]) == 2
        assert "--max-size" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []
    assert main(["package", str(stories_w4), "-o", str(tmp_path / "ok"), "--max-size", "1MB"]) == 0


@pytest.mark.parametrize(
    ("text", "expected"), [("120MB", 120_000_000), ("1.5GB", 1_500_000_000), ("64MiB", 64 << 20), ("4096", 4096)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(InputError, match="--max-size"):
        parse_size("lots")


@pytest.mark.slow
def test_verify_in_a_clean_venv_without_quantlab_or_torch(bundle, stories_qdq, clean_python, tmp_path):
    for module in ("quantlab", "torch", "onnx"):
        probe = subprocess.run([str(clean_python), "-I", "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"the clean venv can import {module}"
    assert verify_bundle(bundle, python=str(clean_python)).ok
    portable = build_bundle(stories_qdq, tmp_path / "p.zip", target="portable", as_zip=True).path
    report = verify_bundle(portable, python=str(clean_python))
    assert report.ok, report.problems


@pytest.mark.slow
def test_cpu_arm64_bundle_ships_an_aarch64_library_that_passes_under_qemu(stories_w4, tmp_path, monkeypatch):
    missing = [t for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64") if not shutil.which(t)]
    if missing:
        apt = "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user"
        pytest.skip(f"{', '.join(missing)} not installed ({apt})")
    monkeypatch.setenv("QUANTLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    result = build_bundle(stories_w4, tmp_path / "a", target="cpu-arm64")
    library = result.path / "kernels" / "_libquantlab_kernels.so"
    assert elf_machine(library)["e_machine"] == 183
    assert result.manifest["kernels"]["elf"]["machine"] == "aarch64"
    assert verify_bundle(result.path).ok
    # the kernel tests, built from the same objects as the shipped library, under qemu-user
    from quantlab.package.kernels import kernel_library, kernel_test_binary
    from quantlab.package.targets import TARGETS

    cached = kernel_library(TARGETS["cpu-arm64"])
    assert cached.read_bytes() == library.read_bytes()
    proc = subprocess.run(
        ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(kernel_test_binary(cached)), "--quick"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith(" 0 failed"), proc.stdout[-2000:]


def test_ort_format_bundle_runs_and_rebuilds_byte_identically(stories_w4, tmp_path):
    result = build_bundle(stories_w4, tmp_path / "o", target="cpu-x86_64", ort_format=True)
    names = _files(result.path)
    assert "model.ort" in names and "model.onnx" not in names and "model.onnx.data" not in names
    assert result.manifest["model_file"] == "model.ort"
    assert result.manifest["deterministic"] is True
    assert json.loads((result.path / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.ort"
    report = verify_bundle(result.path)
    assert report.ok, report.problems
    assert report.generation["ids"] == result.manifest["generation"]["ids"]
    # greedy ids from the .onnx bundle of the same artifact: the ORT file holds the same model
    assert result.manifest["generation"]["ids"] == api.generate_ids(stories_w4, [1], max_new_tokens=MAX_NEW_TOKENS)
    again = build_bundle(stories_w4, tmp_path / "o2", target="cpu-x86_64", ort_format=True)
    for name in names:
        assert (again.path / name).read_bytes() == (result.path / name).read_bytes(), name


def test_canonical_ort_keeps_the_content_and_fixes_the_layout(stories_w4, tmp_path):
    """onnxruntime's converter lays the same content out differently per process; canonical_ort does not."""
    from quantlab.package.ort_format import canonical_ort, ort_content

    raw = []
    for i in range(2):
        out = tmp_path / f"ort{i}"
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(stories_w4 / "model.onnx")]
        subprocess.run(
            [*cmd, "--output_dir", str(out), "--optimization_style", "Fixed"], check=True, capture_output=True
        )
        raw.append((out / "model.ort").read_bytes())
    assert ort_content(raw[0]) == ort_content(raw[1])
    canonical = [canonical_ort(r) for r in raw]
    assert canonical[0] == canonical[1]
    assert ort_content(canonical[0]) == ort_content(raw[0])
    with pytest.raises(ValueError, match="ORTM"):
        canonical_ort(b"\0" * 64)


def test_fit_requires_max_size(stories_w4, tmp_path):
    with pytest.raises(InputError, match="--max-size"):
        build_bundle(stories_w4, tmp_path / "f", fit_source=model_path("stories260K.bin"))


@pytest.mark.acceptance
def test_smollm2_bundles_verify_in_a_clean_venv_and_rebuild_identically(smollm2_w4_and_qdq, clean_python, tmp_path):
    w4, qdq = smollm2_w4_and_qdq
    for target, artifact in (("cpu-x86_64", w4), ("portable", qdq)):
        first = build_bundle(artifact, tmp_path / f"{target}-1.zip", target=target, as_zip=True)
        second = build_bundle(artifact, tmp_path / f"{target}-2.zip", target=target, as_zip=True)
        assert first.path.read_bytes() == second.path.read_bytes(), target
        assert first.manifest["generation"]["prompt"] and first.manifest["tokenizer"]["kind"] == "hf-json"
        report = verify_bundle(first.path, python=str(clean_python))
        assert report.ok, (target, report.problems)
        assert report.generation["ids"] == api.generate_ids(
            artifact, report.generation["prompt_ids"], max_new_tokens=16
        )
