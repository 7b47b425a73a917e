"""The parent side of ``quantlab bench``: plan the measurements, run each in a fresh worker process,
and turn what comes back into rows (statistics, bandwidth, roofline share, quality).

Bandwidth: a decode step reads every weight once, so ``weight_bytes_per_step / TPOT`` is the achieved
weight bandwidth; the gathered embedding table is left out (a step reads one row of it). The roofline
is a streaming read measured here with numpy (see :func:`measure_roofline`), per thread count.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from quantlab.bench.backends import BACKENDS
from quantlab.bench.targets import ARTIFACT, Target, describe_target
from quantlab.errors import InputError

logger = logging.getLogger(__name__)

SCHEMA = 1
# (p90 - median) / median of the decode steps, or (slowest - fastest run median) / median, above which
# we call the machine noisy: on a quiet machine both stay within a few percent.
NOISY_SPREAD = 0.2
NOISY_RUN_SPREAD = 0.1
# Share of the machine's CPU time (all cores, the whole run) that processes other than the benchmark used,
# above which the timings are noise. The load average cannot tell: it counts the benchmark's own
# workers and the conversions a script ran just before.
OTHERS_WARNING = 0.05
# The vector ISA flags of /proc/cpuinfo that decide which kernels run (kept in the JSON as cpu_flags)
ISA_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "sve", "asimd", "neon")
VERSIONED = (
    "quantlab",
    "onnxruntime",
    "onnxruntime-genai",
    "numpy",
    "torch",
    "transformers",
    "onnx",
    "llama-cpp-python",
    "matplotlib",
)
ROOFLINE_METHOD = (
    "the fastest of three streaming reads of a {mib} MiB fp32 matrix with that many threads: an "
    "onnxruntime MatMul of one row (sgemv), torch.mv, and a numpy sum split over the threads; "
    "bytes / wall time, median of 5 after a warm-up"
)

# a chat request whose answer runs long: a few paragraphs of ordinary prose
DRAFT_PROMPT = "Write a short story about a robot who learns to paint. Tell it in three paragraphs."
SPECULATIVE_METHOD = (
    "rows with mode speculative: in one worker, on the chat prompt, alternately plain greedy decoding of the "
    "target and speculative decoding with the draft (draft_tokens a round), gen tokens each, no stop at EOS; "
    "effective TPOT = wall time after the first token / (gen - 1), median over the measured runs; tpot_ratio = "
    "speculative / plain; acceptance_rate = accepted / drafted tokens"
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    gen: int = 128
    runs: int = 5
    warmup: int = 1
    threads: tuple[int, ...] = (2,)
    seed: int = 0
    contexts: tuple[int, ...] = ()  # a context sweep: prompt_len takes each of these instead
    batches: tuple[int, ...] = (1,)  # sequences decoded together: tokens/s = batch / TPOT
    prefill_chunk: int = 512
    pin: tuple[int, ...] | None = None
    backends: tuple[str, ...] | None = None  # None: every backend that runs the target
    baseline: str | None = None  # artifact for the quality columns
    quality_samples: int = 8
    quality_seq_len: int = 128
    roofline_mib: int = 512
    model_label: str | None = None
    draft: str | None = None  # an artifact: also measure speculative decoding (quantlab.bench.speculative)
    draft_tokens: int = 4
    draft_prompt: str = DRAFT_PROMPT  # the chat prompt of the speculative rows

    def check(self) -> None:
        if self.gen < 2:
            raise InputError(None, "--gen", "must be >= 2 (the first token comes from the prefill; TPOT needs steps)")
        for flag, value in (
            ("--prompt-len", self.prompt_len),
            ("--runs", self.runs),
            ("--prefill-chunk", self.prefill_chunk),
            ("--quality-samples", self.quality_samples),
        ):
            if value < 1:
                raise InputError(None, flag, "must be >= 1")
        if self.warmup < 0:
            raise InputError(None, "--warmup", "must be >= 0")
        if not self.threads or min(self.threads) < 1:
            raise InputError(None, "--threads", "must be one or more counts >= 1")
        if self.contexts and min(self.contexts) < 1:
            raise InputError(None, "--contexts", "must be positive token counts")
        if self.draft_tokens < 1:
            raise InputError(None, "--draft-tokens", "must be >= 1")
        if not self.batches or min(self.batches) < 1:
            raise InputError(None, "--batch", "must be one or more batch sizes >= 1")
        unknown = set(self.backends or ()) - set(BACKENDS)
        if unknown:
            raise InputError(None, "--backend", f"unknown {sorted(unknown)}; known: {', '.join(BACKENDS)}")


# --- statistics ------------------------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict:
    """Median and 90th percentile (linear interpolation) in milliseconds."""
    ms = np.asarray(samples, dtype=np.float64) * 1e3
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "n": int(ms.size)}


def noise(steps_s: list[list[float]]) -> dict:
    """The spreads that say whether a run was disturbed (see NOISY_SPREAD)."""
    flat = [t for run in steps_s for t in run]
    median = statistics.median(flat)
    run_medians = [statistics.median(run) for run in steps_s]
    spread = (float(np.percentile(flat, 90)) - median) / median
    run_spread = (max(run_medians) - min(run_medians)) / median
    return {
        "step_spread": spread,
        "run_spread": run_spread,
        "noisy": spread > NOISY_SPREAD or run_spread > NOISY_RUN_SPREAD,
    }


# --- machine ---------------------------------------------------------------------------------------------------


def measure_roofline(threads: int, mib: int = 512) -> float:
    """Streaming read bandwidth in GB/s with ``threads`` threads (see ROOFLINE_METHOD).

    No single probe is the machine's best: on 2 EPYC cores numpy's sum read 27 GB/s, torch.mv 25 and
    onnxruntime's sgemv 46 (its fp32 decode streamed up to 54). The fastest one is the roofline."""
    k = 4096
    n = mib * 2**20 // 4 // k
    w = np.ones((k, n), dtype=np.float32)
    probes = [_ort_probe(w, threads), _torch_probe(w, threads), _numpy_probe(w, threads)]
    return max(w.nbytes / _median_seconds(p) / 1e9 for p in probes if p is not None)


def _median_seconds(fn) -> float:
    def once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(5))


def _ort_probe(w: np.ndarray, threads: int):
    try:
        import onnx
        import onnx.numpy_helper
        import onnxruntime as ort
    except ImportError:
        return None
    k, n = w.shape
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"])],
        "roofline",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [onnx.numpy_helper.from_array(w, "w")],  # an initializer, prepacked as a decoder's weights are
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del graph, model
    feeds = {"x": np.ones((1, k), np.float32)}
    return lambda: session.run(None, feeds)


def _torch_probe(w: np.ndarray, threads: int):
    try:
        import torch
    except ImportError:
        return None
    wt, x = torch.from_numpy(w).T, torch.ones(w.shape[0])  # (n, k) row-major view of the same bytes

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.mv(wt, x)
        finally:
            torch.set_num_threads(before)

    return run


def _numpy_probe(w: np.ndarray, threads: int):
    parts = np.array_split(w.reshape(-1), threads)
    pool = ThreadPoolExecutor(threads)
    return lambda: list(pool.map(np.sum, parts))


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):  # x86, arm: the first core's ("model name" comes before)
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(ISA_FLAG_PREFIXES))
                break
    except OSError:
        pass
    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "onnxruntime_providers": providers,
        "loadavg_start": list(os.getloadavg()),
    }


# --- one measurement ----------------------------------------------------------------------------------------------


def spawn_worker(job: dict) -> tuple[dict | None, int, str]:
    """(result or None, ru_maxrss bytes from wait4, error text) of one worker process."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(job["threads"])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-m", "quantlab.bench.worker", str(job_file), str(result_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        # wait4 before reading stderr would deadlock on a full pipe; read to EOF (the child's exit), then reap
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss * 1024  # KiB on Linux; includes the parent's peak (see worker.peak_rss_bytes)
        if proc.returncode != 0 or not result_file.is_file():
            lines = [line for line in err.strip().splitlines() if line.strip()]
            return None, peak, f"exit {proc.returncode}: {lines[-1] if lines else 'no message'}"
        return json.loads(result_file.read_text(encoding="utf-8")), peak, ""


def _row_base(
    target: Target, backend: str, threads: int | None, context: int | None, config: BenchConfig, batch: int = 1
) -> dict:
    return {
        "model": target.model,
        "variant": target.variant,
        "attention": target.attention,
        "backend": backend,
        "threads": threads,
        "batch": batch,
        "prompt_len": context if context is not None else config.prompt_len,
        "context": context,
        "gen": config.gen,
        "target": os.fspath(target.path),
        "kind": target.kind,
        "size_bytes": target.size_bytes,
    }


def measured_row(
    target: Target, backend: str, threads: int, context: int | None, config: BenchConfig, roofline: dict, batch: int = 1
) -> dict:
    row = _row_base(target, backend, threads, context, config, batch)
    if batch > 1 and not BACKENDS[backend].batched:
        return {**row, "status": "unavailable", "reason": f"{backend} here decodes one sequence at a time (no --batch)"}
    needed = row["prompt_len"] + config.gen
    if target.max_positions and needed > target.max_positions:
        return {
            **row,
            "status": "skipped",
            "reason": f"needs {needed} positions; the model has {target.max_positions} (max_position_embeddings)",
        }
    job = {
        "path": os.fspath(target.path),
        "backend": backend,
        "threads": threads,
        "prompt_len": row["prompt_len"],
        "gen": config.gen,
        "runs": config.runs,
        "warmup": config.warmup,
        "seed": config.seed,
        "prefill_chunk": config.prefill_chunk,
        "reuse_prefill": context is not None and BACKENDS[backend].rewinds,
        "pin": list(config.pin) if config.pin else None,
        "batch": batch,
    }
    logger.info(
        "bench %s %s on %s, %d threads, prompt %d, batch %d",
        target.variant,
        target.path,
        backend,
        threads,
        row["prompt_len"],
        batch,
    )
    result, ru_maxrss, error = spawn_worker(job)
    if result is None:
        return {**row, "status": "failed", "reason": error}
    tpot = summarize([t for run in result["steps_s"] for t in run])
    tpot["run_medians"] = [statistics.median(run) * 1e3 for run in result["steps_s"]]
    ttft = summarize(result["ttft_s"])
    ttft["cold_single_prefill"] = job["reuse_prefill"]
    weight_bytes = target.weight_bytes_per_step or result["info"].get("weight_bytes_per_step")
    bandwidth = weight_bytes / (tpot["median"] / 1e3) / 1e9 if weight_bytes else None
    roof = roofline.get(str(threads))
    row.update(
        status="ok",
        reason="",
        ttft_ms=ttft,
        tpot_ms=tpot,
        tokens_per_s=batch * 1e3 / tpot["median"],  # a step decodes one token of every sequence
        peak_rss_bytes=result["peak_rss_bytes"] or ru_maxrss,
        ru_maxrss_bytes=ru_maxrss,
        weight_bytes_per_step=weight_bytes,
        bandwidth_GBps=bandwidth,
        roofline_pct=100 * bandwidth / roof if bandwidth and roof else None,
        load_s=result["load_s"],
        affinity=result["affinity"],
        backend_info=result["info"],
        generated_ids=result["generated_ids"],
        prompt_ids_head=result["prompt_ids_head"],
        **noise(result["steps_s"]),
    )
    return row


# --- quality -----------------------------------------------------------------------------------------------------


def quality_columns(target: Target, baseline: str, config: BenchConfig, data) -> dict:
    from quantlab.eval.quality import evaluate

    report = evaluate(target.path, data, baseline, threads=max(config.threads), progress=False).to_dict()
    keep = ("ppl", "baseline_ppl", "kld_mean", "kld_median", "kld_p99_9", "kld_max", "top1_agreement", "tokens")
    return {k: report[k] for k in keep} | {"data": report["data"]}


def quality_data(baseline: str, config: BenchConfig):
    from quantlab.eval.data import make_token_data, sample_from_model
    from quantlab.eval.quality import model_config
    from quantlab.runtime.generate import OrtDecoder

    bos = int(model_config(baseline).get("bos_token_id", 1))
    decoder = OrtDecoder(baseline, threads=max(config.threads))
    ids = sample_from_model(decoder, config.quality_samples, config.quality_seq_len, config.seed, bos)
    return make_token_data(
        ids, f"sampled from {baseline}: {config.quality_samples} x {config.quality_seq_len}, seed {config.seed}"
    )


# --- the whole benchmark ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement of the grid: a (target, backend, threads, context, batch), run in its own worker."""

    target: Target
    backend: str
    threads: int
    context: int | None
    batch: int


def plan_grid(targets: list[Target], config: BenchConfig) -> tuple[list[dict | Cell], list[str]]:
    """The grid in the serial run's order: a Cell per measurement, a finished row where a backend cannot
    run here; and the notes on optional backends left out."""
    items: list[dict | Cell] = []
    notes = []
    for name in config.backends or BACKENDS:
        backend = BACKENDS[name]
        if backend.optional and config.backends is None and (reason := backend.why_unavailable()) is not None:
            notes.append(f"{name} not measured: {reason}")
    for target in targets:
        for name in config.backends or BACKENDS:
            backend = BACKENDS[name]
            if not backend.accepts(target):
                continue
            reason = backend.why_unavailable()
            if reason is not None and backend.optional and config.backends is None:
                continue
            if reason is not None:
                items.append({**_row_base(target, name, None, None, config), "status": "unavailable", "reason": reason})
                continue
            for threads in config.threads:
                for context in config.contexts or (None,):
                    for batch in config.batches:
                        items.append(Cell(target, name, threads, context, batch))
    return items, notes


def measure_here(cells: list[Cell], config: BenchConfig, progress=None) -> tuple[list[dict], dict]:
    """Every cell on this machine, one after another: (rows in order, the doc's extra keys: roofline_GBps)."""
    roofline = {str(t): measure_roofline(t, config.roofline_mib) for t in sorted(set(config.threads))}
    rows = []
    for cell in cells:
        row = measured_row(cell.target, cell.backend, cell.threads, cell.context, config, roofline, cell.batch)
        rows.append(row)
        if progress:
            progress(row)
    return rows, {"roofline_GBps": roofline}


def run_bench(paths: list[str], config: BenchConfig, *, progress=None, measure=measure_here) -> dict:
    """Measure every (target, backend, threads[, context]) and return the JSON document.

    ``measure(cells, config, progress) -> (rows, extra)`` runs the cells (:func:`measure_here`, or on a Ray
    cluster: quantlab.distributed.bench); ``extra`` holds roofline_GBps, what it corrects in ``machine`` (this
    one's), its warnings and any keys it adds to the document."""
    config.check()
    targets = [describe_target(p, config.model_label) for p in paths]
    if config.baseline is not None:
        base = describe_target(config.baseline)
        if base.kind != ARTIFACT:
            raise InputError(config.baseline, None, "--baseline must be an artifact folder (quantlab convert)")
    if config.draft is not None:
        from quantlab.bench import speculative

        speculative.check_draft(targets, config)  # before an hour of measuring
    machine = machine_info()
    witness = CpuWitness()
    items, notes = plan_grid(targets, config)
    cells = [item for item in items if isinstance(item, Cell)]
    measured, extra = measure(cells, config, progress)
    done = iter(measured)
    rows = [next(done) if isinstance(item, Cell) else item for item in items]
    if config.draft is not None:
        rows += speculative.measure_speculative_rows(targets, config, progress)
    if config.baseline is not None:
        data = quality_data(config.baseline, config)
        for target in targets:
            if target.kind != ARTIFACT:
                continue
            quality = quality_columns(target, config.baseline, config, data)
            for row in rows:
                plain = row.get("mode") is None  # a speculative row (--draft) has no quality columns
                if plain and row["target"] == os.fspath(target.path) and row["backend"].startswith("onnxruntime"):
                    row["quality"] = quality
    machine["loadavg_end"] = list(os.getloadavg())
    machine["others_cpu_share"] = witness.others_share()
    machine.update(extra.pop("machine", {}))
    return {
        "benchmark": "latency",
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": {**dataclasses.asdict(config), "targets": [os.fspath(p) for p in paths]},
        "method": {
            "prompt": "prompt_len random token ids in [3, vocab) (numpy default_rng(seed); 0-2 are special), gen "
            "greedy tokens, no stop at EOS (onnxruntime-genai: EOS masked out with min_length, so every step runs)",
            "ttft": "prefill of the prompt in prefill_chunk-token forwards + argmax; in a context sweep one cold "
            "prefill per process, every run then decodes from its cache (a backend that cannot rewind its cache, "
            "onnxruntime-genai, prefills again for every run)",
            "tpot": "one decode step + argmax; median and p90 over the steps of all measured runs, warm-up excluded",
            "batch": "batch sequences, each with its own random prompt of prompt_len ids, decoded together: a step "
            "is one token of every sequence, tokens_per_s = batch / TPOT median",
            "peak_rss": "VmHWM of the worker process at its end (interpreter, imports, model and run); "
            "ru_maxrss_bytes from os.wait4 is kept for reference but includes the parent's peak (vfork + exec)",
            "bandwidth": "weight bytes a decode step streams (initializers, embedding table excluded) / TPOT median",
            "roofline": ROOFLINE_METHOD.format(mib=config.roofline_mib),
            "noisy": f"(p90 - median) / median of the steps > {NOISY_SPREAD} or spread of run medians > "
            f"{NOISY_RUN_SPREAD}",
            **({"speculative": SPECULATIVE_METHOD} if config.draft is not None else {}),
        },
        "machine": machine,
        "roofline_GBps": extra.pop("roofline_GBps"),
        "targets": [t.to_dict() for t in targets],
        "results": rows,
        "notes": notes,
        "warnings": noise_warnings(machine, rows) + extra.pop("warnings", []),
        **extra,
    }


class CpuWitness:
    """How much CPU time other processes took while the benchmark ran.

    ``/proc/stat``'s busy time of the whole machine (steal included: another VM on our cores) minus
    what this process and its waited-for children (the workers) used, over wall time x cores."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        t = os.times()
        return busy / tick, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def others_share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end, strict=True))
        return max(0.0, busy - own) / max(1e-9, wall * (os.cpu_count() or 1))


def noise_warnings(machine: dict, rows: list[dict]) -> list[str]:
    out = []
    others = machine.get("others_cpu_share")
    if others is not None and others > OTHERS_WARNING:
        out.append(
            f"other processes used {100 * others:.0f}% of the CPU time ({machine['cores']} cores) during the "
            "benchmark: these timings are noise"
        )
    for row in rows:
        if row.get("noisy"):
            out.append(
                f"noisy: {row['variant']} on {row['backend']} (threads {row['threads']}"
                f"{', context ' + str(row['context']) if row['context'] else ''}): steps' p90 "
                f"{100 * row['step_spread']:.0f}% above the median, run medians spread "
                f"{100 * row['run_spread']:.0f}%"
            )
        if row["status"] == "failed":
            out.append(f"failed: {row['variant']} on {row['backend']}: {row['reason']}")
    return out
