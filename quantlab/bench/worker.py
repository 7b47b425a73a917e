"""One measurement in a fresh process: ``python -m quantlab.bench.worker JOB.json RESULT.json``.

The parent starts one of these per (target, backend, threads, context), so the peak RSS covers exactly
this model in this runtime (interpreter and imports included), and no run shares a cache, an arena or
a page of weights with another.

Job keys: path, backend, threads, prompt_len, gen, runs, warmup, seed, prefill_chunk, reuse_prefill,
pin (CPU ids or null). The result holds peak_rss_bytes (see :func:`peak_rss_bytes`), load_s, ttft_s
(list), steps_s (one list of decode-step times per measured run), generated_ids (of the last run),
prompt_ids_head, affinity and the backend's info.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def measure(session, prompt: list[int], *, gen: int, runs: int, warmup: int, chunk: int, reuse_prefill: bool) -> dict:
    """Time ``warmup + runs`` generations of ``gen`` tokens; the warm-up ones are dropped.

    With ``reuse_prefill`` the prompt is prefilled once (its time is one cold sample) and every run
    decodes from that cache: the context sweep's long prompts would otherwise dominate the run time.
    """
    perf = time.perf_counter
    ttft: list[float] = []
    steps: list[list[float]] = []
    ids: list[int] = []
    if reuse_prefill:
        start = perf()
        first = session.prefill(prompt, chunk)
        ttft.append(perf() - start)
        session.mark()
    for run in range(warmup + runs):
        if reuse_prefill:
            session.rewind()
        else:
            start = perf()
            first = session.prefill(prompt, chunk)
            prefill_s = perf() - start
        ids, times, token = [first], [], first
        for _ in range(gen - 1):  # the first token came out of the prefill
            start = perf()
            token = session.decode(token)
            times.append(perf() - start)
            ids.append(token)
        if run >= warmup:
            steps.append(times)
            if not reuse_prefill:
                ttft.append(prefill_s)
    return {"ttft_s": ttft, "steps_s": steps, "generated_ids": ids}


def peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark (VmHWM), None where /proc is missing.

    Not ru_maxrss: Linux carries the maxrss of the address space a process replaced at exec into the
    new one, and Python starts children by vfork + exec, so a child's ru_maxrss is at least its
    parent's peak. VmHWM belongs to the address space exec created: only this worker's own memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_job(job: dict) -> dict:
    import numpy as np

    from quantlab.bench.backends import BACKENDS

    if job.get("pin"):
        os.sched_setaffinity(0, job["pin"])
    start = time.perf_counter()
    session = BACKENDS[job["backend"]].open(
        Path(job["path"]), threads=job["threads"], max_tokens=job["prompt_len"] + job["gen"]
    )
    load_s = time.perf_counter() - start
    # (prompt_len,) random ids, the same for every backend of one vocabulary
    prompt = np.random.default_rng(job["seed"]).integers(0, session.vocab_size, job["prompt_len"]).tolist()
    result = measure(
        session,
        prompt,
        gen=job["gen"],
        runs=job["runs"],
        warmup=job["warmup"],
        chunk=job["prefill_chunk"],
        reuse_prefill=job["reuse_prefill"],
    )
    result.update(
        peak_rss_bytes=peak_rss_bytes(),
        load_s=load_s,
        affinity=sorted(os.sched_getaffinity(0)),
        info=session.info(),
        prompt_ids_head=prompt[:8],
    )
    return result


def main(argv: list[str]) -> int:
    job_file, result_file = argv
    result = run_job(json.loads(Path(job_file).read_text(encoding="utf-8")))
    Path(result_file).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
