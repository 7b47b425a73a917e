"""The speculative rows of ``quantlab bench TARGET --draft DRAFT_ART``: plain against speculative decoding.

One worker process per (artifact target, backend, threads), like every other row, opens the target and
the draft on the same backend and, on the same chat prompt, alternates plain greedy decoding of the
target and speculative decoding (:mod:`quantlab.runtime.speculative`) for ``warmup + runs`` runs of
``gen`` tokens (no stop at end-of-sequence). Effective TPOT is the wall time after the first token
divided by the ``gen - 1`` tokens that follow it, for both, so their ratio is the speedup users see; the
plain run's per-step TPOT (median, p90) is kept beside it. The row says whether the speculative ids were
the plain ones (greedy: they must be).

A speculative row has ``"mode": "speculative"``; the report prints those rows in a table of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from pathlib import Path

from quantlab.bench.backends import BACKENDS
from quantlab.bench.runner import BenchConfig, _row_base, spawn_worker, summarize
from quantlab.bench.targets import ARTIFACT, Target, describe_target
from quantlab.errors import InputError

logger = logging.getLogger(__name__)

MODE = "speculative"


@dataclasses.dataclass(frozen=True)
class SpeculativeCell:
    target: Target
    backend: str
    threads: int


def check_draft(targets: list[Target], config: BenchConfig) -> Target:
    """The draft as a Target; InputError unless it is an artifact sharing every artifact target's tokenizer."""
    from quantlab.runtime.speculative import check_same_vocabulary

    draft = describe_target(config.draft)
    if draft.kind != ARTIFACT:
        raise InputError(config.draft, None, "--draft must be an artifact folder (quantlab convert)")
    for target in targets:
        if target.kind == ARTIFACT:
            check_same_vocabulary(target.path, draft.path)
    return draft


def plan_speculative(targets: list[Target], config: BenchConfig) -> list[SpeculativeCell | dict]:
    """A cell per (artifact target, backend that runs a decoder, threads); a finished row where the backend
    cannot run here."""
    items: list[SpeculativeCell | dict] = []
    for target in targets:
        for name in config.backends or BACKENDS:
            backend = BACKENDS[name]
            if not (backend.speculates and backend.accepts(target)):
                continue
            reason = backend.why_unavailable()
            if reason is not None and backend.optional and config.backends is None:
                continue
            if reason is not None:
                row = _row_base(target, name, None, None, config)
                items.append({**row, "mode": MODE, "draft": config.draft, "status": "unavailable", "reason": reason})
                continue
            items += [SpeculativeCell(target, name, threads) for threads in config.threads]
    return items


def speculative_row(cell: SpeculativeCell, config: BenchConfig, prompt_ids: list[int]) -> dict:
    """Measure one cell in a fresh worker (see the module docstring) and make its row."""
    row = _row_base(cell.target, cell.backend, cell.threads, None, config)
    row.update(mode=MODE, draft=config.draft, draft_tokens=config.draft_tokens, prompt_len=len(prompt_ids))
    row["prompt"] = f"chat: {config.draft_prompt}"
    job = {
        "mode": MODE,
        "path": os.fspath(cell.target.path),
        "draft": config.draft,
        "backend": cell.backend,
        "threads": cell.threads,
        "prompt_ids": prompt_ids,
        "gen": config.gen,
        "runs": config.runs,
        "warmup": config.warmup,
        "draft_tokens": config.draft_tokens,
        "prefill_chunk": config.prefill_chunk,
        "pin": list(config.pin) if config.pin else None,
    }
    logger.info(
        "bench speculative %s, draft %s, on %s, %d threads", cell.target.path, config.draft, cell.backend, cell.threads
    )
    result, ru_maxrss, error = spawn_worker(job)
    if result is None:
        return {**row, "status": "failed", "reason": error}
    plain = statistics.median(result["plain_decode_s"]) / (config.gen - 1)
    spec = statistics.median(result["speculative_decode_s"]) / (config.gen - 1)
    stats = result["stats"]
    row.update(
        status="ok",
        reason="",
        tpot_ms=summarize([t for run in result["plain_steps_s"] for t in run]),
        effective_tpot_ms={"plain": plain * 1e3, "speculative": spec * 1e3},
        tpot_ratio=spec / plain,
        acceptance_rate=stats["acceptance_rate"],
        tokens_per_target_forward=stats["tokens_per_target_forward"],
        stats=stats,
        identical_to_plain=result["identical"],
        peak_rss_bytes=result["peak_rss_bytes"] or ru_maxrss,
        load_s=result["load_s"],
        affinity=result["affinity"],
        generated_ids=result["generated_ids"],
    )
    return row


def measure_speculative_rows(targets: list[Target], config: BenchConfig, progress=None) -> list[dict]:
    """Every speculative row of the run, measured here one after another (:func:`check_draft` first)."""
    from quantlab.runtime.tokenizer import load_tokenizer

    rows = []
    for item in plan_speculative(targets, config):
        if isinstance(item, dict):
            rows.append(item)
            continue
        prompt_ids = load_tokenizer(item.target.path).encode_chat(config.draft_prompt)
        row = speculative_row(item, config, prompt_ids)
        rows.append(row)
        if progress:
            progress(row)
    return rows


# --- in the worker process -------------------------------------------------------------------------------------


def run_speculative_job(job: dict) -> dict:
    """Open target and draft on the job's backend; time plain and speculative decoding, alternating."""
    from quantlab.bench.worker import peak_rss_bytes
    from quantlab.runtime.generate import freeze_heap
    from quantlab.runtime.speculative import generate_speculative

    if job.get("pin"):
        os.sched_setaffinity(0, job["pin"])
    perf = time.perf_counter
    prompt, gen = job["prompt_ids"], job["gen"]
    max_tokens = len(prompt) + gen + job["draft_tokens"] + 1
    start = perf()
    backend = BACKENDS[job["backend"]]
    session = backend.open(Path(job["path"]), threads=job["threads"], max_tokens=max_tokens)
    draft = backend.open(Path(job["draft"]), threads=job["threads"], max_tokens=max_tokens).decoder
    load_s = perf() - start
    freeze_heap()  # as quantlab.bench.worker.run_job
    plain_steps, plain_decode, spec_decode = [], [], []
    plain_ids: list[int] = []
    result = None
    for run in range(job["warmup"] + job["runs"]):
        plain_ids = [session.prefill(prompt, job["prefill_chunk"])]
        times = []
        for _ in range(gen - 1):
            t0 = perf()
            plain_ids.append(session.decode(plain_ids[-1]))
            times.append(perf() - t0)
        marks: list[float] = []
        result = generate_speculative(
            session.decoder,
            draft,
            prompt,
            max_new_tokens=gen,
            k=job["draft_tokens"],
            ignore_eos=True,
            on_tokens=lambda tokens, marks=marks: marks.append(perf()),
        )
        end = perf()
        if run >= job["warmup"]:
            plain_steps.append(times)
            plain_decode.append(sum(times))
            spec_decode.append(end - marks[0])  # after the prefill's token, as the plain time
    return {
        "plain_steps_s": plain_steps,
        "plain_decode_s": plain_decode,
        "speculative_decode_s": spec_decode,
        "stats": result.stats.to_dict(),
        "identical": result.ids == plain_ids,
        "generated_ids": result.ids,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_s": load_s,
        "affinity": sorted(os.sched_getaffinity(0)),
    }
