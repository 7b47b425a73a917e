"""The codes --max-size writes for a 4-bit linear: the lowest output error among the searched scales, GPTQ,
and GPTQ on the searched scales; GPTQ with given scales keeps them and only solves the rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.fit.codes import GPTQ_SEARCHED, RTN_SEARCH, LinearCodes, output_error
from quantlab.quant.gptq import GPTQConfig, gptq_quantize
from quantlab.quant.rtn import search_scales
from quantlab.quant.scheme import parse_scheme
from tests.models import model_path


def _correlated(seed=0, n=48, k=128, tokens=1024):
    """A weight and the Gram matrix of correlated inputs (a few strong shared directions), where GPTQ's
    error feedback pays."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    mix = rng.standard_normal((k, k)).astype(np.float32) * 0.3 + np.eye(k, dtype=np.float32)
    x = rng.standard_normal((tokens, 8)).astype(np.float32) @ rng.standard_normal((8, k)).astype(np.float32)
    x = (x + rng.standard_normal((tokens, k)).astype(np.float32)) @ mix
    gram = (x.T @ x / tokens).astype(np.float32)
    return w, gram, (x * x).mean(axis=0)


def test_static_gptq_keeps_the_given_scales_and_lowers_the_output_error():
    w, gram, moments = _correlated()
    searched = search_scales(w, moments, 4, 32, False)
    static = gptq_quantize(w, gram.copy(), GPTQConfig(bits=4, group_size=32, act_order=True), static=searched)
    np.testing.assert_array_equal(static.scales, searched.scales)
    np.testing.assert_array_equal(static.zero_points, searched.zero_points)
    assert not np.array_equal(static.q, searched.q)
    assert output_error(w, static, gram) < output_error(w, searched, gram)


def test_static_codes_of_another_scheme_are_refused():
    w, gram, moments = _correlated()
    searched = search_scales(w, moments, 4, 64, False)
    with pytest.raises(ValueError, match="static codes"):
        gptq_quantize(w, gram, GPTQConfig(bits=4, group_size=32), static=searched)


def test_linear_codes_pick_the_lowest_output_error_and_repeat_it(tmp_path):
    w, gram, moments = _correlated(1)
    np.save(tmp_path / "g.npy", gram)
    scheme = parse_scheme("w4a16-g32-asym")
    codes = LinearCodes(lambda name: w, {"a": moments, "b": moments}, {"a": tmp_path / "g.npy"})
    chosen = codes("a", scheme)
    errors = codes.errors[("a", str(scheme))]
    assert set(errors) == {RTN_SEARCH, "gptq", GPTQ_SEARCHED}
    assert output_error(w, chosen, gram) == pytest.approx(min(errors.values()))
    assert codes.methods[("a", str(scheme))] != RTN_SEARCH  # correlated inputs: GPTQ wins
    again = codes("a", scheme)
    np.testing.assert_array_equal(again.q, chosen.q)
    # without a Gram matrix a linear gets the searched codes
    plain = codes("b", scheme)
    np.testing.assert_array_equal(plain.q, search_scales(w, moments, 4, 32, False).q)
    summary = codes.summary({"a": str(scheme), "b": str(scheme)})
    assert sum(summary["linears_per_method"].values()) == 2
    assert summary["linears_per_method"].get(RTN_SEARCH) == 1
    assert summary["output_error_sum"][RTN_SEARCH] >= min(summary["output_error_sum"].values())


def test_requantize_needs_a_size(tmp_path, capsys):
    source = str(model_path("stories260K.bin"))
    assert main(["convert", source, "-o", str(tmp_path / "x"), "--requantize", "--no-progress"]) == 2
    assert "--requantize" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_max_size_records_how_each_linear_was_coded(tmp_path):
    source = str(model_path("stories260K.bin"))
    out = tmp_path / "fit"
    assert main(["convert", source, "-o", str(out), "--max-size", "300000", "--no-progress", "--no-eval"]) == 0
    fit = json.loads((out / "manifest.json").read_text())["fit"]
    assert any(s.startswith("w4") for s in fit["choice"].values()), fit["choice"]
    per_method = fit["linears_per_method"]  # every 4-bit linear, by the method its codes came from
    assert per_method and set(per_method) <= {RTN_SEARCH, "gptq", GPTQ_SEARCHED}
    assert fit["calibration"]
