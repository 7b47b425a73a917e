"""``distill``: teacher checkpoint -> trained student folder, the function behind ``quantlab distill``.

    from quantlab.distill.pipeline import distill
    distill("stories260K.bin", "student/", mode="qat", recipe="w4a16-g32", steps=2000)   # data-free
    distill("stories260K.bin", "small/", mode="shrink", layers=3, data="train.txt")

Modes:

- ``qat``: the student is the teacher with every linear the recipe quantizes fake-quantized
  (quantlab.distill.fakequant), its codes initialized by RTN, GPTQ or AWQ (quantlab.calib, the same
  code ``convert`` runs), then trained (with a weight rate of 0 the codes stay as initialized and only
  the scales learn: FakeQuantLinear.freeze_codes); the embedding and the head stay frozen at what the
  recipe makes of them (8-bit RTN by default). The folder carries the trained integers; ``convert`` emits them.
- ``shrink``: the student keeps ``layers`` of the teacher's layers, evenly spread from the first to the
  last (or starts from random weights, ``init="random"``, the from-scratch baseline), and is trained
  in fp32.

Training data is the user's text (``data``) or, data-free, ``samples`` sequences the teacher writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from quantlab.distill.data import sample_teacher, teacher_artifact, user_text
from quantlab.distill.fakequant import FakeQuantLinear
from quantlab.distill.model import EMBEDDING, DecoderLM, layer_linears, load_tensors
from quantlab.distill.student import save_student
from quantlab.distill.train import Checkpoints, TrainConfig, train
from quantlab.errors import InputError
from quantlab.io import Checkpoint, load_checkpoint
from quantlab.quant.rtn import QuantizedWeight, dequantize, rtn_quantize
from quantlab.recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)

MODES = ("qat", "shrink")
INITS = {"qat": ("rtn", "gptq", "awq"), "shrink": ("teacher", "random")}
# Standard deviation of a from-scratch student's weights (GPT-2 / Llama initialization).
RANDOM_INIT_STD = 0.02


def checkpoint_folder(out_dir: str | os.PathLike) -> Path:
    """Where a run's checkpoints live: ``.{name}.distill/`` beside the output folder."""
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.distill"


def spread_layers(total: int, keep: int) -> list[int]:
    """``keep`` layer indices of ``total``, evenly spread, always the first and the last."""
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def _linear_of(name: str) -> str:
    return name.removesuffix(".weight").removesuffix(".bias")


def initial_codes(
    ckpt: Checkpoint, recipe: Recipe, init: str, tokens: np.ndarray | None, progress: bool
) -> tuple[dict[str, QuantizedWeight], dict[str, np.ndarray]]:
    """(linear -> starting codes, float tensor overrides) for every decoder linear the recipe quantizes.

    GPTQ and AWQ run quantlab's own calibration on ``tokens``; AWQ's scales come back folded into the
    norms (the overrides), as convert would emit them.
    """
    if init == "rtn":
        codes = {}
        for name in layer_linears(ckpt.spec):
            scheme = recipe.scheme_for(name)
            if scheme is not None:
                w = ckpt.tensors.load(name + ".weight")
                codes[name] = rtn_quantize(w, scheme.bits, scheme.group_size, scheme.symmetric)
        return codes, {}
    from quantlab.calib.calibrate import calibrate

    method_recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, method=init))
    result = calibrate(ckpt, method_recipe, tokens, progress=progress)
    return dict(result.quantized), dict(result.float_overrides)


def frozen_tables(tensors: dict[str, np.ndarray], ckpt: Checkpoint, recipe: Recipe):
    """(embedding table, head table) as the artifact will compute with them (RTN), or None when float."""
    from quantlab.passes.quantize_embedding import quantize_rows

    embedding = None
    if recipe.embedding is not None:
        embedding = dequantize(quantize_rows(tensors[EMBEDDING], recipe.embedding))
    head = None
    head_scheme = recipe.scheme_for("lm_head")
    if head_scheme is not None:
        w = tensors[EMBEDDING] if ckpt.spec.tie_word_embeddings else tensors["lm_head.weight"]
        head = dequantize(rtn_quantize(w, head_scheme.bits, head_scheme.group_size, head_scheme.symmetric))
    return embedding, head


def qat_student(
    ckpt: Checkpoint, recipe: Recipe, codes: dict, overrides: dict, *, freeze_codes: bool = False
) -> DecoderLM:
    tensors = {**load_tensors(ckpt), **overrides}
    linears = {}
    for name, qw in codes.items():
        bias = tensors.get(name + ".bias")
        linears[name] = FakeQuantLinear(qw, None if bias is None else torch.from_numpy(bias))
        if freeze_codes:
            linears[name].freeze_codes()
    embedding, head = frozen_tables(tensors, ckpt, recipe)
    model = DecoderLM(ckpt.spec, tensors, linears=linears, embedding_table=embedding, head_table=head)
    model.embedding.requires_grad_(False)  # exported by the recipe's RTN: the tables above
    if "lm_head" in model.linears:
        model.linears["lm_head"].requires_grad_(False)
    return model


def shrink_spec_and_tensors(ckpt: Checkpoint, layers: int, init: str, seed: int):
    """The student's spec and float tensors: ``layers`` teacher layers, or random weights."""
    spec = dataclasses.replace(ckpt.spec, num_layers=layers)
    picked = spread_layers(ckpt.spec.num_layers, layers)
    if init == "teacher":
        tensors = {}
        for name in spec.expected_shapes():
            source = name
            if name.startswith("model.layers."):
                _, _, i, rest = name.split(".", 3)
                source = f"model.layers.{picked[int(i)]}.{rest}"
            tensors[name] = ckpt.tensors.load(source)
        return spec, tensors, picked
    rng = np.random.default_rng([seed, 1])
    tensors = {}
    for name, shape in spec.expected_shapes().items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = rng.normal(0, RANDOM_INIT_STD, shape).astype(np.float32)
    return spec, tensors, picked


def distill(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mode: str = "qat",
    recipe: str | Recipe = "w4a16-g128-asym",
    init: str | None = None,
    layers: int | None = None,
    data: str | os.PathLike | None = None,
    samples: int = 256,
    seq_len: int = 128,
    calib_samples: int = 64,
    config: TrainConfig | None = None,
    accuracy_level: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    tokenizer: str | os.PathLike | None = None,
    progress: bool = True,
    time_budget: float | None = None,
    head_vocab: int | None = None,
) -> dict:
    """Train a student of the checkpoint at ``source`` and write it to ``out_dir``; returns the run's
    description (also written as ``distill.json`` in the folder). Raises InputError on bad input.

    ``time_budget`` (seconds from the call, sampling and calibration included) ends training early
    when reached; ``steps_run`` in the description says how many steps ran. ``head_vocab`` (shrink, for a
    speculative draft): the student's head is trained on the ``head_vocab`` tokens most frequent in the
    training data only (the rule of ``convert --head-vocab``, which then keeps the same tokens given the
    same data), with the losses over those tokens, and the token table (and the head) stay the teacher's."""
    if mode not in MODES:
        raise InputError(None, "--mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    init = init or INITS[mode][0]
    if init not in INITS[mode]:
        raise InputError(None, "--init", f"{mode} takes one of {', '.join(INITS[mode])}, got {init!r}")
    if samples < 1 or seq_len < 2 or calib_samples < 1:
        raise InputError(None, "--samples/--seq-len", "need at least 1 sequence of at least 2 tokens")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise InputError(out, None, "output already exists (pass --force to replace it)")
    ckpt = load_checkpoint(source, tokenizer_path=tokenizer)
    if ckpt.prequantized is not None:
        raise InputError(ckpt.prequantized.path, None, "the teacher is already quantized: distill from a float model")
    if seq_len > ckpt.spec.max_position_embeddings:
        raise InputError(
            None, "--seq-len", f"{seq_len} exceeds the model's context {ckpt.spec.max_position_embeddings}"
        )
    if mode == "qat":
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if recipe.scheme is None or not recipe.scheme.weight_only:
            raise InputError(
                None, "--recipe", f"qat needs a weight-only integer scheme (e.g. w4a16-g32), got {recipe.name}"
            )
        recipe = dataclasses.replace(recipe, accuracy_level=accuracy_level)
    else:
        if layers is None or not 1 <= layers < ckpt.spec.num_layers:
            raise InputError(None, "--layers", f"shrink needs 1 <= --layers < {ckpt.spec.num_layers} (the teacher's)")
    if head_vocab is not None:
        from quantlab.runtime.speculative import check_head_vocab, special_ids

        if mode != "shrink":
            raise InputError(None, "--head-vocab", "applies to --mode shrink (a speculative draft)")
        check_head_vocab(head_vocab, ckpt.spec.vocab_size, special_ids(ckpt.spec))
    began = time.perf_counter()
    config = config or TrainConfig()
    if time_budget is not None and time_budget <= 0:
        raise InputError(None, "--time-budget", "must be > 0 seconds")
    torch.manual_seed(config.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        tokens = user_text(data, ckpt, seq_len, samples)
    else:  # the teacher writes the text: an fp32 artifact of it runs the sampling
        with teacher_artifact(ckpt, out, progress=False) as artifact:
            tokens = sample_teacher(artifact, ckpt, samples, seq_len, config.seed)
    calib_tokens = None
    if mode == "qat" and init in ("gptq", "awq"):
        full = np.asarray(tokens.ids)[np.asarray(tokens.lengths) == tokens.seq_len]
        if len(full) == 0:
            raise InputError(data, None, f"no full {seq_len}-token sequence to calibrate {init} on")
        calib_tokens = full[:calib_samples]
    teacher = None if config.loss == "ce" else DecoderLM(ckpt.spec, load_tensors(ckpt))  # ce reads the data alone
    quantized_recipe = None
    if mode == "qat":
        codes, overrides = initial_codes(ckpt, recipe, init, calib_tokens, progress)
        student = qat_student(ckpt, recipe, codes, overrides, freeze_codes=config.lr == 0)
        pairs = [(i, i) for i in range(ckpt.spec.num_layers)]
        spec = ckpt.spec
        stored = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, method="rtn"))
        quantized_recipe = dataclasses.replace(stored, name=f"{stored.scheme}-qat")
    else:
        spec, tensors, picked = shrink_spec_and_tensors(ckpt, layers, init, config.seed)
        student = DecoderLM(spec, tensors)
        pairs = list(enumerate(picked))
    head = None
    if head_vocab is not None:
        from quantlab.runtime.speculative import ids_sha256, most_frequent_tokens, special_ids

        kept, coverage = most_frequent_tokens(
            tokens.ids, tokens.lengths, ckpt.spec.vocab_size, head_vocab, always=special_ids(ckpt.spec)
        )
        if kept is None:
            raise InputError(data, None, "holds no tokens to count")
        student.restrict_head(kept)
        if teacher is not None:
            teacher.restrict_head(kept)
        # the token table (and a tied head) stays the teacher's: a draft keeps the target's token space, and
        # trained, those 28M weights (SmolLM2) memorized 63k tokens of replies (next-token accuracy 77% on
        # them, 11% on a new reply: benchmarks/bench_speculative.py)
        student.embedding.requires_grad_(False)
        if not ckpt.spec.tie_word_embeddings:
            student.linears["lm_head"].requires_grad_(False)
        head = {"kept": int(len(kept)), "coverage": coverage, "kept_sha256": ids_sha256(kept)}
    fingerprint = {
        "teacher": ckpt.source_sha256(),
        "mode": mode,
        "init": init,
        "recipe": quantized_recipe.to_dict() if quantized_recipe else None,
        "layers": layers,
        "head_vocab": head,
        "data": tokens.sha256,
        "config": dataclasses.asdict(config),
    }
    result = train(
        student,
        teacher,
        tokens.ids,
        tokens.lengths,
        config,
        Checkpoints(checkpoint_folder(out), fingerprint),
        resume=resume,
        hidden_pairs=pairs,
        progress=progress,
        deadline=None if time_budget is None else began + time_budget,
    )
    description = {
        "teacher": {"source": os.fspath(source), "sha256": ckpt.source_sha256()},
        "mode": mode,
        "init": init,
        "codes": ("frozen" if config.lr == 0 else "trained") if mode == "qat" else None,
        "layers": layers if mode == "shrink" else None,
        "kept_layers": [p[1] for p in pairs] if mode == "shrink" else None,
        "head_vocab": head,
        "recipe": quantized_recipe.to_dict() if quantized_recipe else None,
        "data": tokens.describe(),
        "config": dataclasses.asdict(config),
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(result.seconds, 1),
        "steps_run": len(result.losses),
        "time_budget_s": time_budget,
        "total_seconds": round(time.perf_counter() - began, 1),
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last20_mean": float(np.mean(result.losses[-20:])) if result.losses else None,
        "losses": [round(x, 6) for x in result.losses],
    }
    quantized = None
    if mode == "qat":
        quantized = {n: m.export() for n, m in student.linears.items() if isinstance(m, FakeQuantLinear)}
        quantized = {n.replace("/", "."): qw for n, qw in quantized.items()}
    save_student(
        out,
        spec,
        student.float_tensors(),
        ckpt.tokenizer,
        quantized=quantized,
        recipe=quantized_recipe.to_dict() if quantized_recipe else None,
        provenance=description,
        overwrite=overwrite,
    )
    Checkpoints(checkpoint_folder(out), fingerprint).discard()
    return description
