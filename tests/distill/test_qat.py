"""Quantization-aware distillation on stories260K, end to end: training lowers the loss and beats
round-to-nearest, ``convert`` emits exactly the trained integers, and a resumed run equals an
uninterrupted one."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from quantlab import api  # noqa: E402
from quantlab.distill.fakequant import FakeQuantLinear  # noqa: E402
from quantlab.distill.model import DecoderLM, load_tensors  # noqa: E402
from quantlab.distill.pipeline import distill, initial_codes, qat_student  # noqa: E402
from quantlab.distill.train import Checkpoints, TrainConfig, train  # noqa: E402
from quantlab.errors import InputError  # noqa: E402
from quantlab.eval.data import make_token_data, sample_from_model  # noqa: E402
from quantlab.eval.quality import evaluate  # noqa: E402
from quantlab.io import load_checkpoint  # noqa: E402
from quantlab.quant.packing import pack_matmul_nbits  # noqa: E402
from quantlab.recipe import load_recipe  # noqa: E402
from quantlab.runtime.generate import OrtDecoder  # noqa: E402
from tests.models import model_path  # noqa: E402

RECIPE = "w4a16-g32"
CONFIG = TrainConfig(steps=40, batch=8, lr=3e-4, scale_lr=3e-4, vector_lr=3e-4, warmup=3, seed=0, checkpoint_every=10)
# The artifact computes with the same codes in fp32 (accuracy level 0); only summation order differs.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    stories = model_path("stories260K.bin")
    result = distill(
        stories, root / "student", mode="qat", recipe=RECIPE, samples=128, seq_len=64, config=CONFIG, progress=False
    )
    api.convert(root / "student", root / "qat", progress=False, evaluate_quality=False)
    api.convert(stories, root / "fp32", progress=False)
    rtn = dataclasses.replace(load_recipe(RECIPE), accuracy_level=0)
    api.convert(stories, root / "rtn", recipe=rtn, progress=False, evaluate_quality=False)
    return root, result


def test_loss_goes_down(run):
    _, result = run
    losses = result["losses"]
    assert len(losses) == CONFIG.steps
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])


def test_student_beats_round_to_nearest_on_held_out_text(run):
    root, _ = run
    ids = sample_from_model(OrtDecoder(root / "fp32"), 16, 64, seed=99, bos_id=1)  # training used seed 0
    data = make_token_data(ids, "held out")
    qat = evaluate(root / "qat", data, root / "fp32", progress=False)
    rtn = evaluate(root / "rtn", data, root / "fp32", progress=False)
    assert qat.kld_mean < rtn.kld_mean


# linears the default graph stacks into one MatMulNBits (passes/fuse_matmul_nbits.py), in row order
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _linear_operands(folder, rows: dict[str, int]) -> dict[str, tuple[np.ndarray, ...]]:
    """{linear: (B, scales, zero points)} as the artifact stores them, a stacked node's rows split back
    into its linears (``rows``: output rows of each linear)."""
    model = ir.load(folder / "model.onnx")
    out = {}
    for node in model.graph:
        if node.op_type != "MatMulNBits":
            continue
        name = node.name.removesuffix(".MatMulNBits")
        prefix, _, leaf = name.rpartition(".")
        members = [f"{prefix}.{m}" if prefix else m for m in STACKED.get(leaf, (leaf,))]
        arrays = [
            np.asarray(v.const_value.numpy()) if v is not None and v.const_value is not None else None
            for v in node.inputs[1:4]
        ]
        start = 0
        for member in members:
            n = rows.get(member, 0)
            out[member] = tuple(None if a is None else a[start : start + n] for a in arrays)
            start += n
    return out


def test_convert_emits_exactly_the_trained_integers(run):
    root, _ = run
    student = load_checkpoint(root / "student")
    assert student.prequantized is not None
    trained = student.prequantized.weights
    linears = _linear_operands(root / "qat", {name: qw.q.shape[0] for name, qw in trained.items()})
    assert set(trained) == {n for n in linears if n != "lm_head"}
    for name, qw in trained.items():
        b, scales, zero_points = pack_matmul_nbits(qw)
        stored_b, stored_scales, stored_zp = linears[name]
        assert stored_b.tobytes() == b.tobytes(), name
        assert stored_scales.tobytes() == scales.tobytes(), name
        assert stored_zp.tobytes() == zero_points.tobytes(), name


def test_artifact_logits_match_the_fake_quantized_student(run):
    root, _ = run
    student = load_checkpoint(root / "student")
    recipe = load_recipe(RECIPE)
    model = qat_student(student, recipe, student.prequantized.weights, {})
    assert all(isinstance(model.linear(n), FakeQuantLinear) for n in student.prequantized.weights)
    ids = np.array([[1, 403, 407, 261, 378, 432, 383, 260, 300]])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).numpy()
    decoder = OrtDecoder(root / "qat")
    logits, _ = decoder.forward(ids, decoder.empty_cache(1))
    np.testing.assert_allclose(logits, expected, atol=LOGITS_ATOL, rtol=0)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    ckpt = load_checkpoint(model_path("stories260K.bin"))
    recipe = load_recipe(RECIPE)
    codes, overrides = initial_codes(ckpt, recipe, "rtn", None, progress=False)
    ids = np.random.default_rng(0).integers(0, 512, (16, 32))
    lengths = np.full(16, 32)
    config = TrainConfig(steps=6, batch=4, lr=1e-3, warmup=2, checkpoint_every=3)
    teacher = DecoderLM(ckpt.spec, load_tensors(ckpt))

    def trained(folder, **kwargs):
        student = qat_student(ckpt, recipe, codes, overrides)
        train(student, teacher, ids, lengths, config, Checkpoints(folder, {"test": 1}), progress=False, **kwargs)
        return student

    whole = trained(tmp_path / "a")

    def interrupt(step, loss):
        if step == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path / "b", on_step=interrupt)
    resumed = trained(tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(Exception, match="changed since the checkpoint"):
        student = qat_student(ckpt, recipe, codes, overrides)
        Checkpoints(tmp_path / "b", {"test": 2}).restore(student, torch.optim.AdamW(student.parameters()))


def test_scale_only_training_keeps_the_initial_codes(tmp_path):
    from safetensors.numpy import load_file

    from quantlab.distill.student import half_split_rows

    stories = model_path("stories260K.bin")
    config = dataclasses.replace(CONFIG, lr=0.0, scale_lr=1e-3, vector_lr=0.0, steps=30)
    result = distill(
        stories, tmp_path / "s", mode="qat", recipe=RECIPE, samples=64, seq_len=64, config=config, progress=False
    )
    assert result["codes"] == "frozen"
    assert np.mean(result["losses"][-5:]) < np.mean(result["losses"][:5])
    ckpt = load_checkpoint(stories)
    start, _ = initial_codes(ckpt, load_recipe(RECIPE), "rtn", None, progress=False)
    saved = load_file(str(tmp_path / "s" / "quantization.safetensors"))
    moved = 0
    for name, qw in start.items():
        codes, scales = qw.q, qw.scales
        if name.endswith(("q_proj", "k_proj")):  # llama2.c rows leave in the half-split RoPE layout
            rows = half_split_rows(ckpt.spec, ckpt.spec.num_heads if "q_proj" in name else ckpt.spec.num_kv_heads)
            codes, scales = codes[rows], scales[rows]
        np.testing.assert_array_equal(saved[name + ".codes"], codes, err_msg=name)
        moved += int(np.sum(saved[name + ".scales"] != scales))
    assert moved > 0  # the scales did learn


def test_convert_refuses_to_re_round_trained_codes(run):
    root, _ = run
    with pytest.raises(InputError, match="trained w4a16-g32-asym codes"):
        api.convert(root / "student", root / "other", recipe="w4a16-g128-asym", progress=False)
    assert not (root / "other").exists()
