"""--kv on convert, --kv-window/--kv-sinks on generate, and the recipe's kv_cache field, on stories260K."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.errors import InputError
from quantlab.graph_builder.kv_cache import parse_kv_cache
from quantlab.recipe import load_recipe, recipe_from_dict
from tests.models import model_path


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "stories-kv-int8"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--kv", "int8", "--no-eval"]
    assert main([*argv, "--no-progress"]) == 0
    return out


def test_manifest_and_genai_config_describe_the_cache(int8_artifact):
    manifest = json.loads((int8_artifact / "manifest.json").read_text())
    assert manifest["recipe"]["kv_cache"] == "int8"
    kv = manifest["kv_cache"]
    assert kv["format"] == "int8" and kv["dtype"] == "int8" and "cannot" in kv["onnxruntime_genai"]
    # stories260K: 5 layers, 4 kv heads, head_dim 8: (8 + 4 scale bytes) per head vs 16 in fp16
    assert (kv["bytes_per_token"], kv["fp16_bytes_per_token"]) == (2 * 5 * 4 * 12, 2 * 5 * 4 * 16)
    assert "past_key_values.0.key_scale" in manifest["graph"]["inputs"]
    genai = json.loads((int8_artifact / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["kv_cache"]["format"] == "int8"


def test_generate_far_past_the_window(int8_artifact, capsys):
    argv = ["generate", str(int8_artifact), "--prompt-ids", "1", "--max-new-tokens", "700", "--ignore-eos"]
    assert main([*argv, "--kv-window", "32", "--kv-sinks", "4", "--seed", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["ids"]) == 700  # stories260K was trained on 512 positions


def test_bad_kv_flags(tmp_path, capsys):
    src = str(model_path("stories260K.bin"))
    assert main(["convert", src, "-o", str(tmp_path / "x"), "--kv", "int3", "--no-progress"]) == 2
    assert "--kv" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_recipe_kv_cache_is_strict_and_round_trips():
    r = recipe_from_dict({"scheme": "w4a16-g128-asym", "kv_cache": "int4-g32"})
    assert r.kv_cache == "int4-g32"
    assert recipe_from_dict(r.to_dict()) == r
    assert load_recipe("fp32").kv_cache == "fp32"
    assert recipe_from_dict({"kv_cache": "kv-int8"}).kv_cache == "int8"  # canonical spelling kept
    for bad in ("int3", 8, "INT8"):
        with pytest.raises(InputError):
            recipe_from_dict({"kv_cache": bad})


def test_kivi2_calibrates_and_generates_with_a_bounded_cache(tmp_path, capsys):
    out = tmp_path / "stories-kivi2"
    src = str(model_path("stories260K.bin"))
    argv = ["convert", src, "-o", str(out), "--kv", "kivi2", "--calib-from-model", "2", "--no-eval"]
    assert main([*argv, "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kv = manifest["kv_cache"]
    assert (kv["format"], kv["dtype"], kv["bits"], kv["residual_tokens"]) == ("int2-r32-smooth", "uint8", 2, 32)
    assert manifest["kv_cache_calibration"]["sequences"] == 2
    assert "past_key_values.4.value_residual" in manifest["graph"]["inputs"]
    capsys.readouterr()
    argv = ["generate", str(out), "--prompt-ids", "1", "--max-new-tokens", "120", "--ignore-eos", "--json"]
    assert main([*argv, "--kv-window", "40", "--kv-sinks", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]) == 120


def test_kv_residual_sets_the_window_of_the_chosen_format(tmp_path, capsys):
    out = tmp_path / "stories-int4-r6"
    src = str(model_path("stories260K.bin"))
    argv = ["convert", src, "-o", str(out), "--kv", "int4-r32", "--kv-residual", "6", "--no-eval", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["kv_cache"] == "int4-r6"
    assert (manifest["kv_cache"]["format"], manifest["kv_cache"]["residual_tokens"]) == ("int4-r6", 6)
    from quantlab.runtime.generate import OrtDecoder

    dec = OrtDecoder(out)
    _, cache = dec.forward(np.arange(1, 11)[None, :], dec.empty_cache())
    assert cache["past_key_values.0.key_residual"].shape[2] == 6  # only the latest 6 tokens stay in f32
    assert cache["past_key_values.0.key"].shape[2] == 10


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--kv", "int8", "--kv-residual", "-1"], ">= 0"),
        (["--kv-residual", "8"], "quantized cache"),  # the default fp32 cache has nothing to keep
        (["--kv", "fp32", "--kv-residual", "8"], "quantized cache"),
        (["--kv", "int8", "--kv-residual", "x"], "invalid int"),
    ],
)
def test_bad_kv_residual(tmp_path, capsys, flags, says):
    src = str(model_path("stories260K.bin"))
    argv = ["convert", src, "-o", str(tmp_path / "x"), *flags, "--no-progress"]
    if "x" in flags:  # argparse's own check exits 2 before main returns
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--kv-residual" in err and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_with_residual():
    assert str(parse_kv_cache("kivi2").with_residual(64)) == "int2-r64-smooth"
    assert str(parse_kv_cache("kivi2").with_residual(0)) == "int2-smooth"
    assert str(parse_kv_cache("int2-r32-channel-keys").with_residual(64)) == "int2-r64-channel-keys"
    with pytest.raises(ValueError, match="-channel-keys needs"):  # the key block is the window
        parse_kv_cache("int2-r32-channel-keys").with_residual(0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            parse_kv_cache("int8").with_residual(bad)
