"""``quantlab eval A B C ... --ray ADDRESS``: many artifacts scored against one baseline, one Ray task each.

Every task runs :func:`quantlab.eval.quality.evaluate` on one candidate, the same call the serial loop
makes, with the same token data (put once into the object store) and the same baseline; the probe
refuses nodes whose arithmetic differs from the driver's, so each report is the one a single process
writes. The artifacts and the baseline must be readable at the same paths on every node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from quantlab.distributed.calibrate import check_nodes, connected
from quantlab.eval.data import TokenData
from quantlab.eval.quality import QualityReport

logger = logging.getLogger(__name__)

# a task whose process dies is run again (it only reads) this many times
TASK_RETRIES = 3


def _evaluate_one(candidate: str, data: TokenData, baseline: str | None, threads: int | None) -> QualityReport:
    from quantlab.eval.quality import evaluate

    return evaluate(candidate, data, baseline, threads=threads, progress=False)


def evaluate_on_cluster(
    candidates: Sequence[str | os.PathLike],
    data: TokenData,
    baseline: str | os.PathLike | None = None,
    *,
    address: str = "auto",
    threads: int | None = None,
) -> list[QualityReport]:
    """One QualityReport per candidate, in the order given, each evaluated by a Ray task (one CPU)."""
    from quantlab.distributed.sensitivity import PROBE_RECIPE
    from quantlab.recipe import load_recipe

    with connected(address) as ray:
        check_nodes(ray, load_recipe(PROBE_RECIPE))
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_evaluate_one)
        data_ref = ray.put(data)
        base = os.fspath(baseline) if baseline is not None else None
        refs = [task.remote(os.fspath(c), data_ref, base, threads) for c in candidates]
        reports = ray.get(refs)
    for report in reports:
        logger.info("eval %s: ppl %.4f over %d tokens", report.candidate, report.ppl, report.tokens)
    return reports
