"""package --fit on stories260K: per-layer precision from measured sensitivity under a size budget."""

from __future__ import annotations

import json

import pytest

from quantlab.cli.main import main
from quantlab.package.bundle import build_bundle
from quantlab.package.fit import LINEAR_SCHEMES, choose_precisions, drop_dominated, per_layer_fields
from quantlab.package.sensitivity import unit_of
from quantlab.package.verify import verify_bundle
from quantlab.quant.scheme import parse_scheme
from tests.models import model_path

# below the w4a16-g128 artifact's bundle (367,521 bytes with the shared head; K = 64 pads each group of 128
# to twice the codes of g32)
BUDGET = 355_000
TIGHTER = 340_000


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def fitted(stories_w4, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "b"
    source = str(model_path("stories260K.bin"))
    assert main(["package", str(stories_w4), "-o", str(out), "--max-size", str(BUDGET), "--fit", source]) == 0
    return out


@pytest.mark.slow
def test_fit_bundle_fits_and_lists_per_layer_precisions_and_kld(fitted, stories_w4):
    manifest = json.loads((fitted / "manifest.json").read_text())
    fit = manifest["fit"]
    size = sum(p.stat().st_size for p in fitted.rglob("*") if p.is_file())
    assert size <= BUDGET < sum(p.stat().st_size for p in stories_w4.rglob("*") if p.is_file())
    per_layer = fit["per_layer"]
    units = per_layer["precisions"]
    # stories260K's head is tied: head and embedding are one tensor, so one unit with the head's scheme
    assert fit["head_shares_embedding"] is True
    assert {"lm_head", "model.layers.0.attention", "model.layers.4.mlp_down"} <= set(units)
    assert "embedding" not in units and len(units) == 5 * 3 + 1
    assert per_layer["kld_mean"] > 0 and per_layer["predicted_kld_mean"] > 0
    # measured sensitivity: every unit loses far less at 8 bits than at 4. K = 64 (and 172 for down_proj)
    # pads g128 blocks, so w4-g128 is larger than w4-g32 and coarser: dropped before measuring
    sensitivity = fit["sensitivity"]["kld_mean"]
    assert set(sensitivity) == set(units)
    for unit, by_scheme in sensitivity.items():
        assert sorted(by_scheme) == ["w4a16-g32-asym", "w8a16-g128-asym"], unit
        assert 0 <= by_scheme["w8a16-g128-asym"] < 0.1 * by_scheme["w4a16-g32-asym"], unit
    # the size model is exact: the converted graph's unit tensors are the bytes the choice predicted
    assert per_layer["estimated_bytes"] == per_layer["predicted_bytes"] <= BUDGET
    # every linear in the shipped (fused: q/k/v and gate/up stacked) graph carries its unit's chosen scheme,
    # and the embedding reads the head's tensor
    graph = manifest["precisions"]
    linears = [name for name in graph if unit_of(name) not in (None, "embedding")]
    assert len(linears) == 5 * 4 + 1
    for name in linears:
        scheme = parse_scheme(units[unit_of(name)])
        assert graph[name] == f"int{scheme.bits}-g{scheme.group_size}", name
    assert graph["model.embed_tokens"] == graph["lm_head"]
    if fit["chosen"] == "per-layer":
        assert manifest["quality"]["kld_mean"] == per_layer["kld_mean"] == fit["kld_mean"]
    else:
        assert "note" in fit and fit["kld_mean"] < per_layer["kld_mean"]
    assert verify_bundle(fitted).ok


@pytest.mark.slow
def test_mixed_precision_measures_no_worse_than_the_uniform_recipe_that_fits(fitted):
    fit = json.loads((fitted / "manifest.json").read_text())["fit"]
    uniform = [c for c in fit["candidates"] if c["label"] in LINEAR_SCHEMES and c["fits"]]
    assert uniform, "no uniform recipe fits: the comparison would be empty"
    largest = max(uniform, key=lambda c: c["estimated_bytes"])  # the uniform recipe closest in size
    assert fit["per_layer"]["kld_mean"] <= largest["kld_mean"]
    assert fit["kld_mean"] == min(c["kld_mean"] for c in fit["candidates"] if c["fits"])


@pytest.mark.slow
def test_tighter_budget_gives_fewer_or_equal_bytes_and_same_inputs_same_bytes(fitted, stories_w4, tmp_path):
    source = model_path("stories260K.bin")
    tight = build_bundle(stories_w4, tmp_path / "tight", max_size=TIGHTER, fit_source=source)
    loose = json.loads((fitted / "manifest.json").read_text())["fit"]
    assert tight.bytes <= TIGHTER
    assert tight.manifest["fit"]["per_layer"]["estimated_bytes"] <= loose["per_layer"]["estimated_bytes"]
    assert tight.bytes <= sum(p.stat().st_size for p in fitted.rglob("*") if p.is_file())
    again = build_bundle(stories_w4, tmp_path / "again", max_size=BUDGET, fit_source=source)
    assert _files(again.path) == _files(fitted)
    for name in _files(fitted):
        assert (again.path / name).read_bytes() == (fitted / name).read_bytes(), name


def test_unreachable_budget_fails_with_exit_2_and_writes_nothing(stories_w4, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    source = str(model_path("stories260K.bin"))
    for extra in ([], ["--zip"]):
        target = out / ("b.zip" if extra else "b")
        assert (
            main(["package", str(stories_w4), "-o", str(target), "--max-size", "200kB", "--fit", source, *extra]) == 2
        )
        err = capsys.readouterr().err
        assert "--max-size" in err and "nothing written" in err
        assert list(out.iterdir()) == []


def test_choose_precisions_takes_the_most_kld_saved_per_byte_that_fits():
    costs = {"a": {"w8": 100, "w4": 50}, "b": {"w8": 100, "w4": 50}, "c": {"w8": 40, "w4": 20}}
    kld = {"a": {"w8": 0.0, "w4": 0.5}, "b": {"w8": 0.0, "w4": 0.1}, "c": {"w8": 0.0, "w4": 0.3}}
    assert choose_precisions(costs, kld, 119) is None
    assert choose_precisions(costs, kld, 120) == {"a": "w4", "b": "w4", "c": "w4"}
    # per extra byte: c saves 0.015, a 0.010, b 0.002
    assert choose_precisions(costs, kld, 140) == {"a": "w4", "b": "w4", "c": "w8"}
    assert choose_precisions(costs, kld, 190) == {"a": "w8", "b": "w4", "c": "w8"}
    assert choose_precisions(costs, kld, 240) == {"a": "w8", "b": "w8", "c": "w8"}
    # a scheme that is larger and no better is never taken
    kld["b"]["w8"] = 0.1
    assert choose_precisions(costs, kld, 240)["b"] == "w4"


def test_per_layer_fields_use_the_commonest_scheme_and_override_the_rest():
    choice = {
        "model.layers.0.attention": "w4a16-g32-asym",
        "model.layers.0.mlp_in": "w4a16-g32-asym",
        "model.layers.0.mlp_down": "w8a16-g128-asym",
        "lm_head": "w4a16-g128-asym",
        "embedding": "w8a16-g64-asym",
    }
    fields = per_layer_fields(choice)
    assert fields["scheme"] == "w4a16-g32-asym" and fields["lm_head"] == "w4a16-g128-asym"
    assert fields["embedding"] == "w8a16-g64-asym"
    assert fields["override"] == [{"pattern": "model.layers.0.mlp.down_proj", "scheme": "w8a16-g128-asym"}]
    # a head shared with the embedding: one unit, both fields at the head's scheme
    del choice["embedding"]
    shared = per_layer_fields(choice, shared=True)
    assert shared["lm_head"] == shared["embedding"] == "w4a16-g128-asym"


def test_drop_dominated_keeps_what_is_smaller_or_finer():
    g32, g128, w8 = "w4a16-g32-asym", "w4a16-g128-asym", "w8a16-g128-asym"
    padded = {w8: 100, g32: 40, g128: 60}  # K = 64: g128 blocks padded, larger and coarser than g32
    assert drop_dominated({"u": padded}) == {"u": {w8: 100, g32: 40}}
    trade = {w8: 100, g32: 60, g128: 50}  # K = 576: g32 finer, g128 smaller; both offered
    assert drop_dominated({"u": trade}) == {"u": trade}
    assert drop_dominated({"u": {"w4a16-g32-sym": 40, g128: 60}})["u"] == {"w4a16-g32-sym": 40, g128: 60}
