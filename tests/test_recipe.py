"""Recipes: built-in names, strict TOML/YAML/JSON files, per-layer overrides, round trips."""

from __future__ import annotations

import pytest

from quantlab.errors import InputError
from quantlab.quant.scheme import parse_scheme
from quantlab.recipe import load_recipe, recipe_from_dict

TOML = """
scheme = "w4a16-g128-asym"
method = "gptq"
format = "qdq"
accuracy_level = 0
lm_head = "w8a16-g64-asym"

[[override]]
pattern = "model.layers.*.mlp.down_proj"
scheme = "w4a16-g32-asym"

[[override]]
pattern = "model.layers.0.*"
skip = true

[calibration]
samples = 16
seq_len = 64
seed = 3

[gptq]
damp = 0.05
act_order = false
"""


def test_builtin_names():
    r = load_recipe("w4a16-g128-awq")
    assert r.method == "awq" and r.needs_calibration
    assert r.scheme_for("model.layers.3.self_attn.q_proj") == parse_scheme("w4a16-g128-awq")
    assert r.scheme_for("lm_head") == parse_scheme("w8a16-g128-asym")  # 8-bit head by default
    fp16 = load_recipe("fp16")
    assert fp16.scheme is None and fp16.weight_dtype == "fp16" and not fp16.needs_calibration
    assert fp16.scheme_for("lm_head") is None
    assert not load_recipe("w4a16-g32-sym").needs_calibration


def test_toml_file_with_overrides(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    r = load_recipe(str(path))
    assert r.method == "gptq" and r.format == "qdq" and r.accuracy_level == 0
    assert r.scheme_for("model.layers.0.self_attn.q_proj") is None  # skipped (first matching rule wins)
    assert r.scheme_for("model.layers.0.mlp.down_proj") == parse_scheme("w4a16-g32-asym-gptq")
    assert r.scheme_for("model.layers.5.mlp.down_proj") == parse_scheme("w4a16-g32-asym-gptq")
    assert r.scheme_for("model.layers.5.mlp.up_proj") == parse_scheme("w4a16-g128-asym-gptq")
    assert r.scheme_for("lm_head") == parse_scheme("w8a16-g64-asym")
    assert (r.calibration.samples, r.calibration.seq_len, r.calibration.seed) == (16, 64, 3)
    assert r.gptq.damp == 0.05 and not r.gptq.act_order


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "scheme: w8a16-g32\nlm_head: none\noverride:\n  - pattern: lm_head\n    skip: true\n"
    )
    r = load_recipe(str(tmp_path / "r.yaml"))
    assert r.scheme_for("lm_head") is None and r.scheme == parse_scheme("w8a16-g32-asym")
    (tmp_path / "r.json").write_text('{"scheme": "w4a16-g64-sym", "scheme": "w8a16-g64"}')
    with pytest.raises(InputError, match="duplicate"):
        load_recipe(str(tmp_path / "r.json"))


@pytest.mark.parametrize("name", ["w4a16-g128-awq", "w8a8-smoothquant", "fp16", "w4a16-g32-sym"])
def test_round_trip(name):
    r = load_recipe(name)
    assert recipe_from_dict(r.to_dict()) == r


def test_file_round_trip(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    r = load_recipe(str(path))
    assert recipe_from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"scheme": "w4a16-g128", "colour": "red"}, "colour"),
        ({"scheme": "w5a16-g128"}, "scheme"),
        ({"scheme": "w4a16-g128", "format": "tflite"}, "format"),
        ({"scheme": "w4a16-g128", "accuracy_level": 9}, "accuracy_level"),
        ({"scheme": "w4a16-g128", "calibration": {"samples": 8, "size": 1}}, "calibration.size"),
        ({"scheme": "w4a16-g128", "calibration": {"samples": "many"}}, "calibration.samples"),
        ({"scheme": "w4a16-g128", "calibration": {"samples": -1}}, "calibration.samples"),
        ({"scheme": "w4a16-g128", "smoothquant": {"alpha": float("nan")}}, "smoothquant.alpha"),
        ({"scheme": "w4a16-g128", "override": [{"pattern": "x"}]}, "override[0]"),
        ({"scheme": "w4a16-g128", "override": [{"pattern": "x", "skip": True, "why": 1}]}, "override[0].why"),
        ({"scheme": "w4a16-g128", "method": "magic"}, "method"),
    ],
)
def test_bad_recipes_name_the_field(raw, field):
    with pytest.raises(InputError) as e:
        recipe_from_dict(raw, "r.toml")
    assert "r.toml" in str(e.value) and field in str(e.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_recipe(str(tmp_path / "nope.toml"))
    (tmp_path / "bad.toml").write_text("scheme = [")
    with pytest.raises(InputError, match="bad.toml"):
        load_recipe(str(tmp_path / "bad.toml"))
