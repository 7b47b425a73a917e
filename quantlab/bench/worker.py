"""One measurement in a fresh process: ``python -m quantlab.bench.worker JOB.json RESULT.json``.

The parent starts one of these per (target, backend, threads, context), so the peak RSS covers exactly
this model in this runtime (interpreter and imports included), and no run shares a cache, an arena or
a page of weights with another.

Job keys: path, backend, threads, prompt_len, gen, runs, warmup, seed, prefill_chunk, reuse_prefill,
pin (CPU ids or null), batch (sequences decoded together, each with its own random prompt; default 1).
The result holds peak_rss_bytes (see :func:`peak_rss_bytes`), load_s, ttft_s (list), steps_s (one list
of decode-step times per measured run), generated_ids (of the last run; a batch's first sequence),
prompt_ids_head, affinity and the backend's info. A job with ``"mode": "speculative"`` is
:func:`quantlab.bench.speculative.run_speculative_job`'s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Prompt ids are drawn from [FIRST_PROMPT_ID, vocab): 0-2 are unk/bos/eos (Llama 2) or endoftext/im_start/
# im_end (SmolLM2), and onnxruntime-genai masks its pad id (2 there) out of a prompt as if it were padding.
FIRST_PROMPT_ID = 3


def measure(
    session, prompt: list[int] | list[list[int]], *, gen: int, runs: int, warmup: int, chunk: int, reuse_prefill: bool
) -> dict:
    """Time ``warmup + runs`` generations of ``gen`` tokens; the warm-up ones are dropped.

    With ``reuse_prefill`` the prompt is prefilled once (its time is one cold sample) and every run
    decodes from that cache: the context sweep's long prompts would otherwise dominate the run time.
    A list of prompts is a batch (``prefill_batch``/``decode_batch``): a step decodes one token of
    every sequence, and ``generated_ids`` are the first sequence's.
    """
    if prompt and isinstance(prompt[0], list):
        session = _FirstOfBatch(session)
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


class _FirstOfBatch:
    """A batched session seen through the single-sequence interface :func:`measure` times: it carries
    every sequence's tokens and shows the first one's."""

    def __init__(self, session):
        self.session = session
        self.tokens: list[int] = []

    def prefill(self, prompts: list[list[int]], chunk: int) -> int:
        self.tokens = self.session.prefill_batch(prompts, chunk)
        return self.tokens[0]

    def decode(self, token: int) -> int:  # noqa: ARG002 (the first of self.tokens)
        self.tokens = self.session.decode_batch(self.tokens)
        return self.tokens[0]

    def mark(self) -> None:
        self.session.mark()
        self.marked = self.tokens

    def rewind(self) -> None:
        self.session.rewind()
        self.tokens = self.marked


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
    from quantlab.runtime.generate import freeze_heap

    if job.get("pin"):
        os.sched_setaffinity(0, job["pin"])
    start = time.perf_counter()
    session = BACKENDS[job["backend"]].open(
        Path(job["path"]), threads=job["threads"], max_tokens=job["prompt_len"] + job["gen"]
    )
    load_s = time.perf_counter() - start
    freeze_heap()  # as `quantlab generate` does, for every backend alike
    # (prompt_len,) random ids, the same for every backend of one vocabulary; a batch's first prompt is that one
    batch = job.get("batch", 1)
    shape = (batch, job["prompt_len"])
    prompts = np.random.default_rng(job["seed"]).integers(FIRST_PROMPT_ID, session.vocab_size, shape).tolist()
    prompt = prompts[0] if batch == 1 else prompts
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
        prompt_ids_head=prompts[0][:8],
    )
    return result


def main(argv: list[str]) -> int:
    job_file, result_file = argv
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    if job.get("mode") == "speculative":  # plain against speculative decoding (quantlab.bench.speculative)
        from quantlab.bench.speculative import run_speculative_job

        result = run_speculative_job(job)
    else:
        result = run_job(job)
    Path(result_file).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
