"""The driver of a distributed calibration: the same decisions as quantlab.calib.calibrate, on a Ray cluster.

Per decoder layer i (layers stay a barrier)::

    driver                                   shard s (blocks a_s .. b_s - 1, their hidden states)
      observe.remote(i, [ref_0 .. ref_i-1])  ->  advance through layer i-1 (quantized, ref_i-1)
                                                 run layer i, observe its linears' inputs
      <- [BlockStats a_s] ... [BlockStats b_s - 1]   packed float32 Grams, counts, sampled tokens
      fold blocks in block order (float64), decide layer i (GPTQ / AWQ / SmoothQuant)
      ref_i = put(layer i's integers)                 (what moves to the shards: the codes)

What moves per layer: each canonical block's Gram per linear input to the driver (8 blocks: 8 x the
Hessian's upper half in float32, however many shards), the layer's codes back out. The hidden states
never move. With ``checkpoints`` each decided layer is saved beside the output without hidden states,
and ``--resume`` starts the shards from the embeddings, replaying the saved layers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from collections.abc import Iterator

import numpy as np

from quantlab.calib.blocks import StatsMerger, block_layout
from quantlab.calib.layerwise import (
    CalibrationResult,
    progress_bar,
    release_freed_memory,
    with_layer_cache,
    with_overrides,
)
from quantlab.calib.resume import LayerCheckpoints
from quantlab.distributed import require_ray
from quantlab.distributed.shard import CalibrationShard, layer_entries
from quantlab.errors import InputError
from quantlab.io.spec import Checkpoint
from quantlab.recipe import Recipe

logger = logging.getLogger(__name__)

# A shard whose process dies is restarted (and its call retried) this many times before the run fails.
SHARD_RESTARTS = 3


@contextlib.contextmanager
def connected(address: str) -> Iterator[object]:
    """The ray module, connected to the cluster at ``address`` ("auto": the one this machine is in)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise InputError(None, "--ray", f"cannot connect to a Ray cluster at {address!r}: {e}") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """HOST:PORT answers a TCP connection, or an InputError now (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", or an address form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(None, "--ray", f"no Ray head answers at {address} ({e.strerror or e})") from e


def _probe_on_node(recipe: Recipe) -> str:
    from quantlab.distributed.probe import probe_digest

    return probe_digest(recipe)


@functools.lru_cache(maxsize=16)
def _reference_digest(recipe: Recipe) -> str:
    from quantlab.distributed.probe import probe_digest

    return probe_digest(recipe)


# (node id, recipe) pairs whose probe agreed with this process: a node keeps its arithmetic while it lives
_AGREED: set[tuple[str, Recipe]] = set()


def check_nodes(ray, recipe: Recipe) -> list[dict]:
    """Run the probe (quantlab.distributed.probe) on every alive node with CPUs (once per node and recipe
    in this process); refuse, naming it, a node whose digest is not this machine's. Returns the nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise InputError(None, "--ray", "the cluster has no alive node with CPUs")
    task = ray.remote(num_cpus=0, max_retries=1)(_probe_on_node)
    todo = [n for n in nodes if (n["NodeID"], recipe) not in _AGREED]
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(recipe)
        for n in todo
    ]
    reference = _reference_digest(recipe)
    for node, digest in zip(todo, ray.get(refs), strict=True):
        if digest != reference:
            name = node.get("NodeName") or node.get("NodeManagerAddress")
            raise InputError(
                None,
                "--ray",
                f"node {name} ({node.get('NodeManagerAddress')}, id {node['NodeID'][:12]}) computes other bytes "
                f"than this machine (probe {digest[:12]} != {reference[:12]}: another ISA, MKL or onnxruntime "
                "build); refused, since it would change the artifact: remove it from the cluster",
            )
        _AGREED.add((node["NodeID"], recipe))
    logger.info("probe %s agreed on %d node(s) (%d probed now)", reference[:12], len(nodes), len(todo))
    return nodes


def calibrate_on_cluster(
    ckpt: Checkpoint,
    recipe: Recipe,
    tokens: np.ndarray,
    *,
    source: dict,
    address: str = "auto",
    shards: int | None = None,
    batch: int | None = None,
    progress: bool = True,
    checkpoints: LayerCheckpoints | None = None,
) -> CalibrationResult:
    """tokens (n, seq) -> the CalibrationResult quantlab.calib.calibrate returns, byte for byte, computed by
    ``shards`` Ray actors. ``source``: how a shard loads the checkpoint (``{"path": ..., "allow_pickle": ...}``;
    the same path must hold the same file on every node)."""
    from quantlab.calib.calibrate import CALIBRATION_BATCH_TOKENS, METHODS, _linear_errors

    method = recipe.method
    if method not in METHODS:
        methods = ", ".join(sorted(METHODS))
        raise InputError(None, "--ray", f"distributes calibration ({methods}); {recipe.name} has none")
    if getattr(ckpt.spec, "moe_layers", ()):
        raise InputError(None, "--ray", "does not calibrate sparse (MoE) models yet; convert this one without --ray")
    if method == "gptq" and not recipe.gptq.sequential:
        raise InputError(None, "--ray", "distributes sequential calibration only; drop gptq.sequential = false")
    decide = METHODS[method]
    batch = batch or max(1, CALIBRATION_BATCH_TOKENS // max(1, tokens.shape[1]))
    layout = block_layout(tokens.shape[0], batch)
    if shards is not None and not 1 <= shards <= layout.blocks:
        raise InputError(
            None, "--shards", f"must be 1..{layout.blocks} (the calibration's canonical blocks), got {shards}"
        )
    num_layers = ckpt.spec.num_layers
    with connected(address) as ray:
        check_nodes(ray, recipe)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        shards = shards or max(1, min(layout.blocks, int(cpus)))
        actor = ray.remote(CalibrationShard).options(
            num_cpus=min(1.0, round(cpus / shards, 4)),
            max_restarts=SHARD_RESTARTS,
            max_task_retries=SHARD_RESTARTS,
            scheduling_strategy="SPREAD",
        )
        actors = []
        for first, stop in layout.shard_blocks(shards):
            rows = slice(layout.block_rows(first)[0], layout.block_rows(stop - 1)[1])
            actors.append(actor.remote(source, recipe, np.ascontiguousarray(tokens[rows]), layout, first))
        try:
            return _layers(ray, actors, ckpt, recipe, layout, num_layers, decide, _linear_errors, progress, checkpoints)
        finally:
            for a in actors:
                ray.kill(a)


def _layers(ray, actors, ckpt, recipe, layout, num_layers, decide, linear_errors, progress, checkpoints):
    result, first = CalibrationResult(), 0
    if checkpoints is not None:
        first, result, _ = checkpoints.restore(num_layers, None)
    committed = [ray.put(layer_entries(result, j)) for j in range(first)]  # resumed: the shards replay these
    with progress_bar(num_layers, f"calibrate {recipe.method} on {len(actors)} shards", progress) as bar:
        bar.update(first)
        for i in range(first, num_layers):
            before = LayerCheckpoints.keys_of(result)
            started = time.perf_counter()
            calls = [a.observe.remote(i, committed) for a in actors]
            pending, order = list(calls), []
            merger, moved = StatsMerger(), 0
            while pending:  # fold blocks as shards finish; the merger keeps block order
                done, pending = ray.wait(pending, num_returns=1)
                order.append(calls.index(done[0]))
                for block in ray.get(done[0]):
                    moved += block.nbytes
                    merger.add(block)
            stats = merger.layer_stats(layout.blocks)
            logger.info("layer %d: shards answered in order %s", i, order)
            observed = time.perf_counter() - started
            fp = with_layer_cache(with_overrides(ckpt, result.float_overrides), i)
            if recipe.method == "gptq":  # the layer's solves fan out to the waiting shards
                layer_weights, divisors = _gptq_on_shards(ray, actors, fp, i, stats, recipe, result)
            else:
                layer_weights, divisors = decide(fp, i, stats, recipe, result)
            result.layer_errors.append(linear_errors(fp, i, stats, layer_weights, divisors))
            del fp, stats, layer_weights
            entries = layer_entries(result, i)
            committed.append(ray.put(entries))
            logger.info(
                "layer %d: observed in %.2f s (%.1f MB of statistics in), decided in %.2f s; relative error %.3e",
                i,
                observed,
                moved / 1e6,
                time.perf_counter() - started - observed,
                result.layer_errors[-1],
            )
            bar.set_postfix(layer=i, rel_err=f"{result.layer_errors[-1]:.2e}")
            bar.update()
            if checkpoints is not None:
                checkpoints.save_layer(i, result, before, None)
                checkpoints.offload_layer(i, result, before)
            release_freed_memory()
    return result


def _gptq_on_shards(ray, actors, fp: Checkpoint, i: int, stats, recipe: Recipe, result: CalibrationResult):
    """quantlab.calib.calibrate._decide_gptq for a dense layer, each stack of linears that share an input
    and a scheme (q/k/v, gate/up) solved on a shard, the largest first (down_proj's K^3 factorization
    leads); the same gptq_quantize calls, so the same codes (the probe checked every node's arithmetic)."""
    from quantlab.calib.calibrate import split_rows
    from quantlab.graph_builder.decoder import LINEAR_INPUTS
    from quantlab.quant.gptq import GPTQConfig

    shapes = fp.spec.expected_shapes()
    stacks: dict[tuple, list[str]] = {}
    for role, x_name in LINEAR_INPUTS.items():
        name = f"model.layers.{i}.{role}"
        scheme = recipe.scheme_for(name)
        if scheme is not None and name + ".weight" in shapes:
            stacks.setdefault((x_name, scheme), []).append(name)

    def cost(key) -> int:  # GPTQ's flops: the K^3 factorization and N K^2 of column updates
        k = shapes[stacks[key][0] + ".weight"][1]
        return k * k * (k + sum(shapes[n + ".weight"][0] for n in stacks[key]))

    hessians = {x_name: ray.put(stats.hessians.pop(x_name)) for x_name, _ in stacks}
    calls = {}
    for n, key in enumerate(sorted(stacks, key=cost, reverse=True)):
        config = GPTQConfig.from_scheme(
            key[1], percdamp=recipe.gptq.damp, act_order=recipe.gptq.act_order, block_size=recipe.gptq.block_size
        )
        calls[key] = actors[n % len(actors)].solve_gptq.remote(stacks[key], hessians[key[0]], config)
    dequantized = {}
    for key, names in stacks.items():  # the single process's order of entries
        qw = ray.get(calls[key])
        for name, part in split_rows(qw, names, lambda n: shapes[n + ".weight"][0]):
            result.quantized[name] = part
            dequantized[name + ".weight"] = part
    return dequantized, {}
