"""convert --max-size / --bpw on stories260K: the chosen artifact never exceeds the size, records its
choice, and a size nothing reaches exits 2 with one line and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.errors import InputError
from quantlab.fit.choose import ACCURACY_LEVEL, LINEAR_LADDER, choose_precisions, complete_ladder, parse_size
from quantlab.fit.sensitivity import unit_of, unit_tensors
from tests.models import model_path

# between the smallest reachable artifact (~0.26 MB) and all-8-bit (~0.59 MB) of stories260K
SIZES = (300_000, 450_000)
FUSED = {
    "qkv_proj": "q_proj",
    "qk_proj": "q_proj",
    "kv_proj": "k_proj",
    "gate_up_proj": "gate_proj",
    "up_gate_proj": "up_proj",
}


def _model_bytes(folder):
    return sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    source = str(model_path("stories260K.bin"))
    outs = {}
    for size in SIZES:
        outs[size] = root / f"fit{size}"
        assert main(["convert", source, "-o", str(outs[size]), "--max-size", str(size), "--no-progress"]) == 0
    return outs


def test_chosen_artifact_never_exceeds_the_size_and_more_room_measures_no_worse(fitted):
    klds = []
    for size, out in fitted.items():
        manifest = json.loads((out / "manifest.json").read_text())
        written = _model_bytes(out)
        assert written <= size
        fit = manifest["fit"]
        assert fit["written_bytes"] == written and fit["max_bytes"] == size
        assert fit["predicted_bytes"] <= size
        klds.append(manifest["quality"]["kld_mean"])
    assert klds[1] <= klds[0]


def test_manifest_records_each_tensors_scheme_and_the_graph_agrees(fitted):
    import onnx

    out = fitted[SIZES[0]]
    manifest = json.loads((out / "manifest.json").read_text())
    choice = manifest["fit"]["choice"]
    assert set(choice.values()) <= set(LINEAR_LADDER) | {"w8a16-g64-asym", "w4a16-g32-asym", "w4a16-g64-asym"}
    assert manifest["fit"]["predicted_kld_mean"] > 0 and manifest["quality"]["kld_mean"] > 0
    # every linear of every chosen layer unit is an override in the recorded recipe, with the chosen scheme
    overrides = {o["pattern"]: o["scheme"] for o in manifest["recipe"]["override"]}
    for unit, scheme in choice.items():
        if unit.startswith("model.layers."):
            assert all(overrides[t] == scheme for t in unit_tensors(unit))
    # and the graph holds those bits
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            linear = node.name.removesuffix(".MatMulNBits")
            for fused, first in FUSED.items():  # linears with one input and one scheme may be stacked
                linear = linear.replace(fused, first)
            bits = {a.name: a.i for a in node.attribute}["bits"]
            unit = unit_of(linear)
            assert f"w{bits}a16" in choice[unit], (linear, choice[unit])
            assert {a.name: a.i for a in node.attribute}["accuracy_level"] == ACCURACY_LEVEL


def test_nothing_fits_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "out"
    source = str(model_path("stories260K.bin"))
    assert main(["convert", source, "-o", str(out), "--max-size", "200kB", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-size" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []
    assert main(["convert", source, "-o", str(out), "--bpw", "1", "--no-progress"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_bpw_is_a_size_per_source_parameter(tmp_path):
    source = str(model_path("stories260K.bin"))
    out = tmp_path / "bpw"
    assert main(["convert", source, "-o", str(out), "--bpw", "12", "--no-progress", "--no-eval"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["max_bytes"] == int(12 * manifest["graph"]["parameters"] / 8)
    assert _model_bytes(out) <= manifest["fit"]["max_bytes"]


def test_max_size_refuses_a_quantized_recipe(tmp_path, capsys):
    source = str(model_path("stories260K.bin"))
    args = ["convert", source, "-o", str(tmp_path / "x"), "--max-size", "1MB", "--recipe", "w4a16-g128-asym"]
    assert main(args) == 2
    assert "--max-size" in capsys.readouterr().err


def test_choose_precisions_never_exceeds_the_budget():
    costs = {u: {"w8": 100, "w4g32": 64, "w4g128": 53} for u in "abcdef"}
    kld = {u: {"w8": 0.0, "w4g32": 0.1 * (i + 1), "w4g128": 0.15 * (i + 1)} for i, u in enumerate("abcdef")}
    assert choose_precisions(costs, kld, 6 * 53 - 1) is None
    for budget in range(6 * 53, 6 * 100 + 1, 7):
        choice = choose_precisions(costs, kld, budget)
        assert sum(costs[u][s] for u, s in choice.items()) <= budget


def test_complete_ladder_scales_measured_kld_by_weighted_error():
    measured = {"w4a16-g32-asym": 0.02, "w4a16-g128-asym": 0.04}
    errors = {"w8a16-g128-asym": 1.0, "w4a16-g32-asym": 200.0, "w4a16-g64-asym": 300.0, "w4a16-g128-asym": 400.0}
    kld = complete_ladder(measured, errors)
    assert kld["w4a16-g32-asym"] == 0.02 and kld["w4a16-g128-asym"] == 0.04
    assert kld["w8a16-g128-asym"] == pytest.approx(0.02 / 200)  # from the nearest measured rung
    assert kld["w4a16-g64-asym"] == pytest.approx(0.04 * 300 / 400)


def test_parse_size():
    assert parse_size("105.5MB") == 105_500_000 and parse_size("1.2GB") == 1_200_000_000
    assert parse_size("500kB") == 500_000 and parse_size("123456") == 123456
    for bad in ("abc", "-1MB", "0"):
        with pytest.raises(InputError):
            parse_size(bad)


@pytest.fixture(scope="module")
def tiny_q4_1(tmp_path_factory):
    from tests.passes.test_keep_source_quantization import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf"
    write_tiny_gguf(path, "Q4_1", tied=True)
    return path


def _initializers(artifact) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_gguf_source_codes_are_a_rung_kept_where_they_fit(tiny_q4_1, tmp_path):
    roomy = tmp_path / "roomy"
    assert main(["convert", str(tiny_q4_1), "-o", str(roomy), "--max-size", "10MB", "--no-progress"]) == 0
    fit = json.loads((roomy / "manifest.json").read_text())["fit"]
    assert set(fit["choice"].values()) == {"source"}  # the file's own codes: KL 0, nothing measured
    assert fit["sensitivity"]["measured"] == {}
    # the file's own codes, as `--recipe source` emits them: the same tensors, bit for bit. (Not the same
    # graph: a recipe that rounds leaves the norms unfused in front of int8-accuracy MatMulNBits, see
    # quantlab.pipelines.fusion_pipeline, so the two KLDs differ by onnxruntime's kernels, by 2e-4 of
    # their value on a Sapphire Rapids and by more than 1e-3 on an AVX2 Zen.)
    kept = tmp_path / "kept"
    assert main(["convert", str(tiny_q4_1), "-o", str(kept), "--recipe", "source", "--no-progress"]) == 0
    roomy_tensors, kept_tensors = _initializers(roomy), _initializers(kept)
    quantized = [n for n, a in kept_tensors.items() if a.dtype == np.uint8]
    assert len(quantized) > 2 * 4  # qkv, o, gate_up, down in each of the 2 layers, and the tied table
    for name, array in kept_tensors.items():
        np.testing.assert_array_equal(roomy_tensors[name], array, err_msg=name)
    # a size a little under the all-source artifact: a mix, still under the size
    tight_size = int(_model_bytes(roomy) * 0.97)
    tight = tmp_path / "tight"
    assert main(["convert", str(tiny_q4_1), "-o", str(tight), "--max-size", str(tight_size), "--no-progress"]) == 0
    tight_fit = json.loads((tight / "manifest.json").read_text())["fit"]
    assert _model_bytes(tight) <= tight_size
    assert "source" in tight_fit["choice"].values() and set(tight_fit["choice"].values()) != {"source"}
