"""``convert --max-size --ray``: the per-unit sensitivity of quantlab.fit measured by Ray actors.

Each (unit, rung) figure is one forward of the fp32 baseline with that unit's weights replaced, and
depends on nothing else (:class:`quantlab.fit.sensitivity.KldMeter`), so the measurements fan out::

    driver                                          meter m (one per actor, any node)
      write baseline/sensitivity.onnx                 KldMeter(baseline, sensitivity.onnx, ids):
      start meters                                    open the session, reference log-softmax once
      put(statistics) once
      for (unit, rung) in sorted order:        ->     make that unit's fake-quantized weights
                                                      kld(weights) -> float
      <- figures, filed under their (unit, rung)

The meters make the weights themselves (:class:`quantlab.fit.choose.FakeQuantizer` rebuilt around the
checkpoint, loaded once per meter from the path every node reads, with the driver's activation
statistics and the Gram files beside the baseline): on SmolLM2-135M making them is a third of the
work, and made on the driver they were the bottleneck (214 of 236 s on 2 meters). A ``fake_quantized``
without ``portable()`` is called on the driver instead, its weights sent through the object store. At
most :data:`IN_FLIGHT_PER_METER` measurements per meter are queued. The figures are the single
process's floats (same code, same feeds, same reduction; the probe refuses nodes whose arithmetic
differs), so the greedy choice and the artifact are the same bytes. The baseline folder must be
readable at the same path on every node (it is written beside the output: put the output on a
shared filesystem).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantlab.distributed.calibrate import check_nodes, connected
from quantlab.errors import InputError
from quantlab.fit.sensitivity import KldMeter, Sensitivity, sensitivity_model, sensitivity_of

logger = logging.getLogger(__name__)

# a meter whose process dies is restarted (and its measurement retried: it is idempotent) this many times
METER_RESTARTS = 3
# measurements queued per meter: one running, one waiting (its weights already sent, when the driver makes them)
IN_FLIGHT_PER_METER = 2
# the arithmetic the probe checks on every node: onnxruntime's fp32 and quantized forwards, numpy, MKL
PROBE_RECIPE = "w4a16-g128-gptq"


class SensitivityMeter:
    """A :class:`KldMeter` in an actor; ``kld`` returns its key with the figure. ``kld_made_here`` makes the
    weights itself: the checkpoint loaded from ``source`` once, the driver's ``portable`` fake quantizer
    (:class:`quantlab.fit.choose.FakeQuantizer`) rebuilt around it."""

    def __init__(self, baseline: str, model_file: str, ids: np.ndarray):
        self.meter = KldMeter(Path(baseline), model_file, ids)
        self.fake_quantized = None

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def kld(self, key: tuple[str, str], overrides: dict[str, np.ndarray]) -> tuple[tuple[str, str], float]:
        return key, self.meter(overrides)

    def kld_made_here(self, key: tuple[str, str], source: dict, portable: dict) -> tuple[tuple[str, str], float]:
        if self.fake_quantized is None:  # every call carries what it needs: a restarted meter rebuilds it
            from quantlab.fit.choose import FakeQuantizer
            from quantlab.io import load_checkpoint

            ckpt = load_checkpoint(source["path"], allow_pickle=source.get("allow_pickle", False))
            self.fake_quantized = FakeQuantizer.rebuild(ckpt, portable)
        return key, self.meter(self.fake_quantized(*key))


def measure_kld_on_cluster(
    baseline: Path,
    ids: np.ndarray,
    units: dict[str, tuple[str, ...]],
    fake_quantized: Callable[[str, str], dict[str, np.ndarray]],
    *,
    data: str,
    address: str = "auto",
    meters: int | None = None,
    source: dict | None = None,
) -> Sensitivity:
    """:func:`quantlab.fit.sensitivity.measure_kld`'s figures, measured by ``meters`` Ray actors (default:
    one per CPU of the cluster). With ``source`` (load_checkpoint's arguments: the checkpoint at that path
    on every node) and a ``fake_quantized`` that has ``portable()`` (:class:`quantlab.fit.choose.FakeQuantizer`)
    the meters make the weights themselves; otherwise the driver makes them and puts them in the object store."""
    from quantlab.recipe import load_recipe

    todo = [(unit, scheme) for unit, schemes in sorted(units.items()) for scheme in schemes]
    if meters is not None and meters < 1:
        raise InputError(None, "--shards", f"must be >= 1, got {meters}")
    started = time.perf_counter()
    with connected(address) as ray, sensitivity_model(baseline, units) as model_file:
        check_nodes(ray, load_recipe(PROBE_RECIPE))
        cpus = float(ray.cluster_resources().get("CPU", 1))
        count = max(1, min(len(todo), meters or int(cpus)))
        actor = ray.remote(SensitivityMeter).options(
            num_cpus=min(1.0, round(cpus / count, 4)),
            max_restarts=METER_RESTARTS,
            max_task_retries=METER_RESTARTS,
            scheduling_strategy="SPREAD",
        )
        # ids (a few KB) go inline with the constructor: a restarted meter needs nothing from the object store
        actors = [actor.remote(str(baseline), model_file, np.ascontiguousarray(ids)) for _ in range(count)]
        try:
            nodes = len(set(ray.get([a.node.remote() for a in actors])))
            making = [0.0]
            if source is not None and hasattr(fake_quantized, "portable"):
                where, portable = "on the meters", ray.put(fake_quantized.portable())

                def submit(actor, key):
                    return actor.kld_made_here.remote(key, source, portable)
            else:
                where = "on the driver"

                def submit(actor, key):
                    start = time.perf_counter()
                    weights = ray.put(fake_quantized(*key))
                    making[0] += time.perf_counter() - start
                    return actor.kld.remote(key, weights)

            figures = _fan_out(ray, actors, todo, submit)
        finally:
            for a in actors:
                ray.kill(a)
    kld = {unit: {scheme: figures[(unit, scheme)] for scheme in schemes} for unit, schemes in sorted(units.items())}
    for unit, row in kld.items():
        logger.info("sensitivity %s: %s", unit, row)
    seconds = time.perf_counter() - started
    logger.info(
        "sensitivity: %d measurements by %d meters on %d nodes in %.1f s, weights made %s (%.1f s of the driver's)",
        len(todo),
        count,
        nodes,
        seconds,
        where,
        making[0],
    )
    return sensitivity_of(kld, units, ids, data)


def _fan_out(ray, actors, todo, submit) -> dict[tuple[str, str], float]:
    """Each key in ``todo`` submitted (``submit(actor, key)`` -> the call's reference) to whichever meter
    has the fewest queued, at most :data:`IN_FLIGHT_PER_METER` each; the figures by key."""
    figures: dict[tuple[str, str], float] = {}
    pending: dict = {}  # object ref -> actor index
    load = [0] * len(actors)
    queue = list(todo)
    while queue or pending:
        while queue and min(load) < IN_FLIGHT_PER_METER:
            n = load.index(min(load))
            pending[submit(actors[n], queue.pop(0))] = n
            load[n] += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        load[pending.pop(done[0])] -= 1
        key, value = ray.get(done[0])
        figures[key] = value
    return figures
