"""The Python API: what the CLI's subcommands do, callable from code.

from quantlab import api
api.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2-fp32")
api.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2-w4", recipe="w4a16-g128-gptq", calib_from_model=128)
ids = api.generate_ids("out/smollm2-fp32", [1, 2, 3], max_new_tokens=16)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from quantlab.emit.artifact import count_parameters, estimate_artifact_bytes, save_model, write_artifact
from quantlab.emit.staging import check_free_space, remove_stale_temporaries, temporary_prefix
from quantlab.errors import InputError, QualityBudgetError, SizeOverrunError
from quantlab.graph_builder.decoder import ATTENTION_KINDS, BuildOptions, build_decoder
from quantlab.graph_builder.kv_cache import KvCacheFormat, collect_key_scales, parse_kv_cache, static_cache_ranges
from quantlab.io import Checkpoint, load_checkpoint
from quantlab.passes.dead_nodes import RemoveDeadNodesPass
from quantlab.passes.manager import run_passes
from quantlab.pipelines import cleanup_pipeline, default_attention, fusion_pipeline, quantization_pipeline
from quantlab.quant.scheme import parse_scheme
from quantlab.recipe import Recipe, load_recipe
from quantlab.runtime.generate import GREEDY, BoundedCache, OrtDecoder, SamplingConfig, generate

logger = logging.getLogger(__name__)

# Held-out text for the quality figures in the manifest: sampled from the full-precision model with a
# seed calibration never uses.
EVAL_SEED_OFFSET = 1_000_003
# A -smooth KV cache calibrates its key channel scales on this many sequences (of the recipe's
# calibration seq_len) sampled from the fp32 model, when no calibration data is given.
KV_CALIB_SAMPLES = 8
# convert --max-size: choices made again when the written artifact overshoots the estimate
FIT_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class QualityBudget:
    max_kld: float | None = None
    min_top1: float | None = None
    samples: int = 16
    seq_len: int = 128

    def check(self, report: dict) -> None:
        misses = []
        if self.max_kld is not None and report["kld_mean"] > self.max_kld:
            misses.append(f"kld_mean {report['kld_mean']:.5f} > --max-kld {self.max_kld}")
        if self.min_top1 is not None and report["top1_agreement"] < self.min_top1:
            misses.append(f"top1_agreement {report['top1_agreement']:.4f} < --min-top1 {self.min_top1}")
        if misses:
            raise QualityBudgetError("; ".join(misses) + f" (over {report['tokens']} tokens; nothing written)")


@contextlib.contextmanager
def _baseline_artifact(ckpt: Checkpoint, near: Path, progress: bool) -> Iterator[Path]:
    """A temporary fp32 artifact of the checkpoint, for data-free calibration and quality figures."""
    folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(near, "baseline"), dir=near.parent))
    try:
        model = build_decoder(ckpt)
        model, _ = run_passes(model, [RemoveDeadNodesPass()])
        save_model(model, folder, progress=progress)
        from quantlab.emit.artifact import genai_config, write_json
        from quantlab.runtime.tokenizer import write_tokenizer_files

        write_json(folder / "genai_config.json", genai_config(ckpt))
        if ckpt.tokenizer:
            write_tokenizer_files(ckpt.tokenizer, folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def calibration_tokens(
    ckpt: Checkpoint,
    recipe: Recipe,
    *,
    calib: str | None,
    calib_from_model: int | None,
    baseline: Path | None,
    progress: bool,
):
    """The calibration set as TokenData: a user file, or text sampled from the fp32 model itself."""
    from quantlab.eval.data import load_token_data, make_token_data, sample_from_model
    from quantlab.runtime.tokenizer import tokenizer_from_spec

    cfg = recipe.calibration
    if calib is not None:
        tok = tokenizer_from_spec(ckpt.tokenizer) if ckpt.tokenizer else None
        data = load_token_data(
            calib, tok, seq_len=cfg.seq_len, max_sequences=cfg.samples, vocab_size=ckpt.spec.vocab_size
        )
        full = data.lengths == data.seq_len
        if full.any() and not full.all():  # drop the short, padded tail: its padding would skew statistics
            data = make_token_data(data.ids[full], data.source)
        return data
    assert baseline is not None and calib_from_model is not None
    decoder = OrtDecoder(baseline)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else min(ckpt.spec.eos_token_ids or (0,))
    ids = sample_from_model(decoder, calib_from_model, cfg.seq_len, cfg.seed, bos, progress=progress)
    return make_token_data(ids, f"sampled from the fp32 model: {calib_from_model} x {cfg.seq_len}, seed {cfg.seed}")


def measure_quality(
    candidate: Path, baseline: Path, ckpt: Checkpoint, budget: QualityBudget, seed: int, progress: bool
) -> dict:
    from quantlab.eval.data import make_token_data, sample_from_model
    from quantlab.eval.quality import evaluate

    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else min(ckpt.spec.eos_token_ids or (0,))
    ids = sample_from_model(OrtDecoder(baseline), budget.samples, budget.seq_len, seed + EVAL_SEED_OFFSET, bos)
    data = make_token_data(
        ids, f"sampled from the fp32 model: {budget.samples} x {budget.seq_len}, seed {seed + EVAL_SEED_OFFSET}"
    )
    report = evaluate(candidate, data, baseline, progress=progress).to_dict()
    report.pop("candidate", None)
    report.pop("baseline", None)
    budget.check(report)
    return report


def prequantized_recipe(prequantized, requested: Recipe) -> Recipe:
    """The recipe a checkpoint's trained codes were made for, keeping the requested storage dtype and KV
    cache; a requested weight scheme other than theirs is an error (they cannot be re-rounded)."""
    from quantlab.recipe import recipe_from_dict

    stored = recipe_from_dict(prequantized.recipe, prequantized.path)
    if requested.scheme is not None and (
        dataclasses.replace(requested.scheme, method="rtn") != dataclasses.replace(stored.scheme, method="rtn")
    ):
        raise InputError(
            prequantized.path,
            "recipe.scheme",
            f"this checkpoint carries trained {stored.scheme} codes; convert it with the default recipe, "
            f"not {requested.scheme}",
        )
    return dataclasses.replace(stored, weight_dtype=requested.weight_dtype, kv_cache=requested.kv_cache)


def source_quantization(ckpt: Checkpoint):
    """What ``--recipe source`` keeps of the checkpoint's own quantization, tensor by tensor (logged)."""
    plan = getattr(ckpt.tensors, "source_quantization", None)
    if plan is None:
        raise InputError(
            ckpt.source_files[0] if ckpt.source_files else None,
            "--recipe",
            f"source keeps a GGUF's own quantization; this checkpoint is {ckpt.source_format}",
        )
    plan = plan(tied=ckpt.spec.tie_word_embeddings)
    for name, layout in plan.kept.items():
        logger.info("%s: %s kept as %s", name, layout.ggml_type, layout.describe())
    for name, reason in plan.not_kept.items():
        logger.info("%s: %s not kept: %s", name, plan.source_types[name], reason)
    return plan


ATTENTION_DESCRIPTIONS = {
    "plain": {"kind": "plain", "ops": "MatMul / Softmax (plain ONNX, any runtime)"},
    "fused": {
        "kind": "fused",
        "ops": "com.microsoft.GroupQueryAttention + RotaryEmbedding, fused q/k/v and gate/up MatMulNBits, "
        "SkipSimplifiedLayerNormalization (onnxruntime and onnxruntime-genai only)",
    },
}


def fused_cache_format(fmt: KvCacheFormat) -> KvCacheFormat:
    """The cache format the fused path stores for ``fmt``: GroupQueryAttention reads int8 or int4 with
    static per-channel scales (PER_CHANNEL), so int8 / int4 become int8-static / int4-static (logged);
    a format it cannot read (per-token scales with groups, residual windows, int2) raises ValueError."""
    if not fmt.quantized or fmt.static:
        return fmt
    if fmt.kind in ("int8", "int4") and not (fmt.group or fmt.residual or fmt.smooth_keys):
        static = dataclasses.replace(fmt, static=True)
        logger.info("fused attention stores the cache as %s (static per-channel scales, calibrated)", static)
        return static
    raise ValueError(
        f"fused attention (GroupQueryAttention) cannot read a {fmt} cache: it takes int8 or int4 with static "
        "per-channel scales (--kv int8 / int4); use --attention plain for this format"
    )


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    recipe: str | Recipe = "fp32",
    weight_dtype: str | None = None,
    kv_cache: str | None = None,
    kv_residual: int | None = None,
    attention: str = "auto",
    calib: str | None = None,
    calib_from_model: int | None = None,
    budget: QualityBudget | None = None,
    evaluate_quality: bool = True,
    overwrite: bool = False,
    allow_pickle: bool = False,
    tokenizer: str | os.PathLike | None = None,
    dump_ir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = False,
    calibrate_all_experts: bool = False,
    max_size: int | None = None,
    bpw: float | None = None,
    requantize: bool = False,
    ray: str | None = None,
    shards: int | None = None,
    head_vocab: int | None = None,
    head_vocab_data: str | os.PathLike | None = None,
) -> Path:
    """Checkpoint -> artifact folder. Raises InputError on bad input, QualityBudgetError on a missed budget.

    ``kv_residual`` sets the residual window (recent tokens kept in f32) of the cache format, replacing any
    ``-r<N>`` in it. ``attention="fused"`` builds onnxruntime's GroupQueryAttention (a quantized cache then
    is int8-static / int4-static: see :func:`fused_cache_format`). A calibration saves each finished layer
    beside the output (``.{out}.resume/``); ``resume=True`` continues from there after an interruption,
    refusing when any input differs; ``calibrate_all_experts`` calibrates each expert of a sparse MLP on
    every calibration token, not only on those routed to it (the layer's output still mixes the chosen
    experts). ``max_size`` (bytes of model.onnx + model.onnx.data) chooses every weight's scheme from
    measured sensitivity under that size (:mod:`quantlab.fit`); ``bpw`` is the same size as bits per
    parameter of the source model (a tied head counted once); ``requantize`` keeps none of a GGUF's own
    codes there (every tensor rounded afresh). ``ray`` (a cluster address or "auto")
    calibrates on ``shards`` Ray actors (:mod:`quantlab.distributed`), or with ``max_size`` / ``bpw``
    measures the sensitivity on them: the same artifact, byte for byte. ``head_vocab`` (a speculative
    draft's option) keeps the head to the ``head_vocab`` tokens most frequent in ``head_vocab_data``, every
    other token's logit -inf (passes/prune_head_vocab.py); such an artifact is no longer a model of the
    whole vocabulary, so its quality against the fp32 model is not measured.
    """
    if (head_vocab is None) != (head_vocab_data is None):
        raise InputError(None, "--head-vocab", "give --head-vocab N together with --head-vocab-data FILE")
    if head_vocab is not None:
        if budget is not None and (budget.max_kld is not None or budget.min_top1 is not None):
            raise InputError(None, "--head-vocab", "a pruned head scores part of the vocabulary: no quality budget")
        if max_size is not None or bpw is not None:
            raise InputError(None, "--head-vocab", "not with --max-size / --bpw")
        evaluate_quality = False
    if ray is not None:
        from quantlab.distributed import require_ray

        require_ray()  # before any work: one line saying how to install it
        from quantlab.distributed.calibrate import check_reachable

        check_reachable(ray)
    elif shards is not None:
        raise InputError(None, "--shards", "applies to --ray")
    if shards is not None and shards < 1:
        raise InputError(None, "--shards", f"must be >= 1, got {shards}")
    source_path = Path(source).absolute()  # for shards, which load the checkpoint themselves
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if weight_dtype is not None:
        recipe = dataclasses.replace(recipe, weight_dtype=weight_dtype)
    if kv_cache is not None:
        try:
            recipe = dataclasses.replace(recipe, kv_cache=str(parse_kv_cache(kv_cache)))
        except ValueError as e:
            raise InputError(None, "--kv", str(e)) from e
    if kv_residual is not None:
        try:
            residual = parse_kv_cache(recipe.kv_cache).with_residual(kv_residual)
            recipe = dataclasses.replace(recipe, kv_cache=str(residual))
        except ValueError as e:
            raise InputError(None, "--kv-residual", str(e)) from e
    if attention == "auto":
        attention = default_attention(recipe)
    if attention not in ATTENTION_KINDS:
        raise InputError(None, "--attention", f"must be auto or one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
    if attention == "fused":
        try:
            recipe = dataclasses.replace(recipe, kv_cache=str(fused_cache_format(parse_kv_cache(recipe.kv_cache))))
        except ValueError as e:
            raise InputError(None, "--attention", str(e)) from e
    kv_format = parse_kv_cache(recipe.kv_cache)
    # a quantized weight or cache is measured against the fp32 model
    lossy = recipe.scheme is not None or kv_format.quantized
    if requantize and max_size is None and bpw is None:
        raise InputError(None, "--requantize", "applies to --max-size / --bpw (a --recipe already rounds afresh)")
    if max_size is not None and bpw is not None:
        raise InputError(None, "--bpw", "give --max-size or --bpw, not both")
    if bpw is not None and not bpw > 0:
        raise InputError(None, "--bpw", f"must be positive, got {bpw}")
    if max_size is not None or bpw is not None:  # the choose stage gives every weight its scheme
        if recipe.scheme is not None:
            raise InputError(None, "--max-size", f"chooses the weight schemes itself; drop --recipe {recipe.name}")
        from quantlab.fit.choose import LINEAR_LADDER

        recipe, lossy = dataclasses.replace(recipe, scheme=parse_scheme(LINEAR_LADDER[0])), True  # until chosen
    if calib is not None and calib_from_model is not None:
        raise InputError(None, "--calib", "give --calib FILE or --calib-from-model N, not both")
    if recipe.needs_calibration and calib is None and calib_from_model is None:
        raise InputError(
            None,
            "--recipe",
            f"{recipe.name} calibrates on data: give --calib FILE or "
            "--calib-from-model N (data-free: text sampled from the model itself)",
        )
    if calib_from_model is not None and calib_from_model < 1:
        raise InputError(None, "--calib-from-model", "must be >= 1")
    fitting = max_size is not None or bpw is not None
    if ray is not None and not recipe.needs_calibration and not fitting:
        raise InputError(
            None,
            "--ray",
            f"distributes calibration and --max-size / --bpw sensitivity; recipe {recipe.name} does neither",
        )
    if calibrate_all_experts and not recipe.needs_calibration:
        raise InputError(None, "--calibrate-all-experts", f"applies to calibrated recipes, not {recipe.name}")
    if calibrate_all_experts and ray is not None:
        raise InputError(None, "--calibrate-all-experts", "not with --ray (the distributed calibration lacks it)")
    ckpt = load_checkpoint(source, allow_pickle=allow_pickle, tokenizer_path=tokenizer)
    if bpw is not None:
        max_size = int(bpw * count_parameters(ckpt) / 8)
    if ckpt.prequantized is not None:  # a distilled student: its trained integers, not a new rounding
        recipe = prequantized_recipe(ckpt.prequantized, recipe)
        lossy = True
    source = source_quantization(ckpt) if recipe.keep_source else None
    lossy = lossy or source is not None
    head_pass = []
    if head_vocab is not None:
        from quantlab.passes.prune_head_vocab import PruneHeadVocabPass
        from quantlab.runtime.speculative import frequent_token_ids, special_ids
        from quantlab.runtime.tokenizer import tokenizer_from_spec

        kept, described = frequent_token_ids(
            head_vocab_data,
            tokenizer_from_spec(ckpt.tokenizer) if ckpt.tokenizer else None,
            ckpt.spec.vocab_size,
            head_vocab,
            always=special_ids(ckpt.spec),
        )
        head_pass = [PruneHeadVocabPass(kept, described)]
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise InputError(out, None, "output already exists (pass --force to replace it)")
    budget = budget or QualityBudget()
    gated = budget.max_kld is not None or budget.min_top1 is not None
    cache_calibrated = kv_format.smooth_keys or kv_format.static
    measured = lossy and (evaluate_quality or gated)
    # the choose stage (max_size) measures against the fp32 model too
    needs_baseline = calib_from_model is not None or cache_calibrated or max_size is not None or measured
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out):
        logger.warning("removed %s, left by an interrupted conversion", stale)
    check_free_space(out.parent, estimate_artifact_bytes(ckpt.spec, recipe, with_baseline=needs_baseline))
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(_baseline_artifact(ckpt, out, progress)) if needs_baseline else None
        calibration, extra, checkpoints = None, {}, None
        if recipe.needs_calibration:
            from quantlab.calib.calibrate import calibrate
            from quantlab.calib.layerwise import release_freed_memory, with_overrides
            from quantlab.calib.resume import LayerCheckpoints, calibration_fingerprint, resume_folder

            data = calibration_tokens(
                ckpt, recipe, calib=calib, calib_from_model=calib_from_model, baseline=baseline, progress=progress
            )
            # Per-layer checkpoints beside the output, keyed by every input, for convert --resume.
            tokens = np.asarray(data.ids)
            fingerprinted = {**recipe.to_dict(), **({"calibrate_all_experts": True} if calibrate_all_experts else {})}
            fingerprint = calibration_fingerprint(ckpt.source_sha256(), fingerprinted, tokens)
            checkpoints = LayerCheckpoints(resume_folder(out), fingerprint, resume=resume)
            if ray is None:
                calibration = calibrate(
                    ckpt, recipe, tokens, progress=progress, checkpoints=checkpoints, all_experts=calibrate_all_experts
                )
            else:
                from quantlab.distributed.calibrate import calibrate_on_cluster

                calibration = calibrate_on_cluster(
                    ckpt,
                    recipe,
                    tokens,
                    source={"path": str(source_path), "allow_pickle": allow_pickle},
                    address=ray,
                    shards=shards,
                    progress=progress,
                    checkpoints=checkpoints,
                )
            release_freed_memory()  # calibration's garbage, before the artifact is built
            extra["calibration"] = {
                **data.describe(),
                "layer_relative_errors": [round(e, 6) for e in calibration.layer_errors],
            }
            if calibration.experts:  # tokens per expert of each sparse layer, and the experts rounded to nearest
                from quantlab.calib.experts import manifest_entry

                extra["calibration"]["experts"] = manifest_entry(ckpt.spec, calibration.experts, calibrate_all_experts)
            ckpt_for_build = with_overrides(ckpt, calibration.float_overrides)
        else:
            ckpt_for_build = ckpt
        key_scales = value_scales = None
        if cache_calibrated:
            kv_data = (
                data
                if recipe.needs_calibration
                else calibration_tokens(
                    ckpt,
                    recipe,
                    calib=calib,
                    calib_from_model=calib_from_model or KV_CALIB_SAMPLES,
                    baseline=baseline,
                    progress=progress,
                )
            )
            kv_decoder, kv_ids, interleaved = OrtDecoder(baseline), np.asarray(kv_data.ids), ckpt.spec.rope_interleaved
            if kv_format.static:
                key_scales, value_scales = static_cache_ranges(kv_decoder, kv_ids, interleaved, kv_format)
            else:
                key_scales = collect_key_scales(kv_decoder, kv_ids, interleaved)
            extra["kv_cache_calibration"] = kv_data.describe()
        extra["attention"] = ATTENTION_DESCRIPTIONS[attention]
        if head_pass:
            extra["head_vocab"] = {
                **head_pass[0].config(),
                "quality": "not measured: the head scores part of the vocabulary (a speculative draft)",
            }
        if source is not None:
            extra["source_quantization"] = source.describe()
        options = BuildOptions(
            weight_dtype=recipe.weight_dtype,
            kv_cache=kv_format,
            key_channel_scales=key_scales,
            value_channel_scales=value_scales,
            attention=attention,
        )
        fit = None
        if max_size is not None:  # choose: per-tensor schemes from measured sensitivity, under the size
            from quantlab.fit.choose import choose_under_size

            given = None
            if calib is not None or calib_from_model is not None:
                given = calibration_tokens(
                    ckpt, recipe, calib=calib, calib_from_model=calib_from_model, baseline=baseline, progress=progress
                )
            fit = choose_under_size(
                ckpt,
                baseline,
                max_size,
                recipe,
                seed=recipe.calibration.seed,
                options=options,
                calibration=given,
                keep_source=not requantize,
                measure=_sensitivity_measure(ray, shards, {"path": str(source_path), "allow_pickle": allow_pickle}),
            )
        prequantized = ckpt.prequantized.weights if ckpt.prequantized is not None else None
        for attempt in itertools.count(1):
            if fit is not None:
                recipe, prequantized, source = fit.recipe, fit.quantized, fit.source
            model = build_decoder(ckpt_for_build, options)
            tied = ckpt.spec.tie_word_embeddings
            pipeline = quantization_pipeline(model, recipe, calibration, prequantized, tied=tied, source=source)
            pipeline += head_pass + fusion_pipeline(attention, recipe) + cleanup_pipeline()
            model, records = run_passes(model, pipeline, dump_dir=dump_ir)

            def check(stage: Path, fit=fit, recipe=recipe) -> dict:
                measured = {"fit": fit.check_size(stage)} if fit is not None else {}  # never over the size
                if baseline is None or not lossy or not (evaluate_quality or gated):
                    return measured
                quality = measure_quality(stage, baseline, ckpt, budget, recipe.calibration.seed, progress)
                return {**measured, "quality": quality}

            try:
                written = write_artifact(
                    model,
                    ckpt_for_build,
                    out,
                    recipe=recipe.to_dict(),
                    passes=records,
                    overwrite=overwrite,
                    progress=progress,
                    extra_manifest=extra,
                    check=check,
                    kv_cache=kv_format,
                )
                break
            except SizeOverrunError as e:  # the estimate missed: choose again with the overshoot taken off
                if attempt >= FIT_ATTEMPTS:
                    raise InputError(None, "--max-size", f"{e}; nothing written") from e
                from quantlab.fit.choose import shrink

                fit = shrink(fit, e.written)
        if checkpoints is not None:
            checkpoints.discard()
        return written


def _sensitivity_measure(ray: str | None, shards: int | None, source: dict):
    """How the choose stage measures sensitivity: in this process, or on ``shards`` actors of the Ray
    cluster at ``ray`` (the same figures), which load the checkpoint from ``source`` to make the weights."""
    from quantlab.fit.sensitivity import measure_kld

    if ray is None:
        return measure_kld
    from quantlab.distributed.sensitivity import measure_kld_on_cluster

    return functools.partial(measure_kld_on_cluster, address=ray, meters=shards, source=source)


def generate_ids(
    artifact_dir: str | os.PathLike,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 32,
    sampling: SamplingConfig = GREEDY,
    stop_ids: Sequence[int] | None = None,
    threads: int | None = None,
    bounded: BoundedCache | None = None,
    draft: str | os.PathLike | None = None,
    draft_tokens: int = 4,
) -> list[int]:
    """Generate from token ids; stops at the tokenizer's stop ids unless ``stop_ids`` is given.

    ``bounded`` keeps the cache to attention sinks + a sliding window (see BoundedCache). ``draft``, an
    artifact of the same tokenizer, decodes speculatively with ``draft_tokens`` drafted a round
    (:mod:`quantlab.runtime.speculative`, which also gives the acceptance statistics): greedy ids are the
    same as without it."""
    if stop_ids is None:
        from quantlab.runtime.tokenizer import load_tokenizer

        stop_ids = sorted(load_tokenizer(artifact_dir).eos_token_ids)
    decoder = OrtDecoder(artifact_dir, threads=threads)
    if draft is not None:
        from quantlab.runtime.speculative import check_same_vocabulary, generate_speculative

        if bounded is not None:
            raise ValueError("a bounded cache and a draft do not go together")
        check_same_vocabulary(artifact_dir, draft)
        result = generate_speculative(
            decoder,
            OrtDecoder(draft, threads=threads),
            prompt_ids,
            max_new_tokens=max_new_tokens,
            k=draft_tokens,
            sampling=sampling,
            eos_ids=stop_ids,
        )
        return result.ids
    return list(
        generate(
            decoder, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids, bounded=bounded
        )
    )
