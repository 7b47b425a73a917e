"""int4 matmul kernels: quantlab's against onnxruntime MatMulNBits and dense fp32/fp16/bf16, with a
measured streaming-bandwidth roofline. CPU always; CUDA (ours vs cuBLAS fp16) where a GPU is.

    python benchmarks/bench_kernels.py            # full grid (~10 minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick    # M in {1, 16}, (4096, 11008), blocks 128 and 32

Writes benchmarks/results/kernels_cpu.{json,md,png} (and kernels_cuda_<gpu>.{json,md}); every result
file records the CPU model, its SIMD flags and L3 size, and the load average during the run.

Method. All paths of one (K, N, block, M, threads) cell are timed in the same process, in three
passes over the paths with a run of calls to each (see time_grouped; nine passes and three times
the budget for the cells issue 17 is judged on); we report medians. Achieved
GB/s is the bytes a path must read once (weights in its own format + activations) over the median
time; % of roofline divides by the streaming read bandwidth measured at the start of the run with
the same thread count: an fp32 matrix-vector product over a 512 MiB matrix (torch, i.e. sgemv), as
in issue 17; in the issue's cells that sgemv is timed among the paths instead, under the same load.

Hot and cold. The int4 weights of one cell (24 MB for 4096 x 11008) fit this machine's L3, so a
hot kernel reads them from cache. The ``*_cold`` paths rotate through enough copies of the weights
(together at least 512 MiB and 1.5 x the L3) that every call streams them from DRAM, as a decode
step of a real model does: ``ours_cold`` through copies of B and the scales placed as quantlab's
runtime places a model's weights (kernels.pack_weights: one buffer on transparent huge pages),
``ours_plain_cold`` through plain copies of B (plain_copy: 4 KiB pages, as a caller's arrays may be),
``ort_nbits_acc4_cold`` through as many onnxruntime sessions, each holding (and prepacking) its own
copy of the initializers (only where that is at most MAX_ORT_SESSIONS sessions). Each library thus
reads the weights from the memory it holds them in; the issue's bar compares ours_cold with
ort_nbits_acc4_cold, and the plain-page column shows how much of the lead the huge pages are.

Accuracy: max |y - y_ref| / max |y_ref| per quantlab path (each forced with ``path=``) and for
onnxruntime, at M = 1 and M = 16 for each block size, y_ref the product of x with the dequantized
fp32 weights, accumulated in float64.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine  # noqa: E402  (beside this script)
from kernels_report import BAR_SPEEDUP, ISSUE_SHAPE, SHAPES, issue_rows, plot, write_markdown  # noqa: E402

from quantlab import kernels  # noqa: E402
from quantlab.kernels.reference import dequantize_nbits  # noqa: E402

MS = [1, 2, 4, 8, 16, 32, 64]
BLOCK = 128
# (K, N, block) cells: every shape with blocks of 128; issue 17's shape with blocks of 32 too.
CELLS = [(k, n, BLOCK) for k, n in SHAPES] + [(4096, 11008, 32)]
QUICK_CELLS = [(4096, 11008, 128), (4096, 11008, 32)]
# Building an onnxruntime session (which prepacks its weights) takes a while: smaller shapes, which
# would need more copies than this to stream from DRAM, get no ort_nbits_acc4_cold column.
MAX_ORT_SESSIONS = 64
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile",
             "amx_int8", "amx_bf16", "avx512_bf16", "asimd", "asimddp")  # fmt: skip


def sgemv(mib: int = 512):
    """The roofline's workload: an fp32 matrix-vector product over a `mib` MiB matrix (torch, i.e.
    sgemv, on torch's current thread count); returns (callable, bytes it reads)."""
    import torch

    n = 4096
    w = torch.randn(mib * 2**20 // (4 * n), n)
    x = torch.randn(n)
    return (lambda: torch.mv(w, x)), w.numel() * 4


def measure_roofline(threads: int) -> tuple[float, float]:
    """Streaming read bandwidth in GB/s (median of 9 sgemv calls): by wall time, and by the calling
    thread's CPU time (meaningful for one thread, see time_grouped)."""
    import torch

    torch.set_num_threads(threads)
    fn, nbytes = sgemv()
    med = time_grouped({"sgemv": fn}, budget_s=3.0, passes=1, min_reps=9, max_reps=9)["sgemv"]
    return nbytes / med[0] / 1e9, nbytes / med[1] / 1e9


def cpu_info() -> dict:
    """The machine a result comes from: CPU model, the SIMD flags the kernel paths test, L3, cores."""
    info = {**machine(), "cpu_flags": [], "l3_bytes": None}
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(("model name", "Model")))
        flags = next(ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features")))
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    except (OSError, StopIteration):
        pass
    try:
        size = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
        info["l3_bytes"] = int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
    except (OSError, ValueError):
        pass
    return info


def cold_copies(nbytes: int, l3_bytes: int | None) -> int:
    """Copies of `nbytes` of weights to rotate through so that each call streams them from DRAM."""
    return max(2, int(np.ceil(max(512 * 2**20, 1.5 * (l3_bytes or 0)) / nbytes)))


def plain_copy(a: np.ndarray) -> np.ndarray:
    """A copy of `a` in plain anonymous memory. numpy asks the kernel for transparent huge pages for
    large arrays and gets them or not depending on the machine's fragmentation (measured here: 18%
    apart for M = 1 from DRAM); onnxruntime's buffers get no such request, so neither do these."""
    out = np.frombuffer(mmap.mmap(-1, a.nbytes), dtype=a.dtype).reshape(a.shape)
    out[...] = a
    return out


def make_weights(k: int, n: int, block: int, rng: np.random.Generator):
    kb = (k + block - 1) // block
    b = rng.integers(0, 256, size=(n, kb, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.03, size=n * kb).astype(np.float32)
    return b, scales


def ort_session(model_bytes: bytes, threads: int, spin: bool = True):
    """``spin=False`` for the cold paths' many sessions: after a call onnxruntime's workers spin for a
    while, and in a rotation over 30 sessions those of the other sessions would take the cores from the
    one running (in a model there is one session, whose workers spin for its own next call)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def nbits_model(
    b: np.ndarray,
    scales: np.ndarray,
    k: int,
    n: int,
    block: int,
    accuracy_level: int,
    *,
    bits: int = 4,
    zero_points: np.ndarray | None = None,
) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    node = helper.make_node(
        "MatMulNBits", ["A", *(t.name for t in inits)], ["Y"],
        domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def dense_model(w_t: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_t.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "dense",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(w_t, "W")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def time_grouped(fns: dict, budget_s: float, passes: int = 3, min_reps: int = 3, max_reps: int = 40) -> dict:
    """Median (wall seconds, calling-thread CPU seconds) per fn. Each pass runs every fn in turn, a
    warm-up call then a run of timed calls, so that a path is timed in steady state after itself
    (as in a decode loop; right after another library's call its spinning OpenMP/onnxruntime
    workers would still hold the cores), while the passes spread machine noise over all paths.
    With one thread all the work runs on the calling thread, so its CPU time is the kernel's time
    without the periods the OS gave the core to other processes: the robust number on a shared
    machine."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    per_run = budget_s / (passes * len(fns))
    for _ in range(passes):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            reps = 0
            while reps < min_reps or (reps < max_reps and time.perf_counter() - start < per_run):
                t, c = time.perf_counter(), time.thread_time()
                fn()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.thread_time() - c)
                reps += 1
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def rotate(fns: list):
    """A callable that calls the next of `fns` each time (the cold paths' copies)."""
    state = [0]

    def call():
        state[0] = (state[0] + 1) % len(fns)
        return fns[state[0]]()

    return call


def cpu_fns(x, b, scales, cold, placed, k, n, block, threads, sessions, dense) -> dict:
    """The callables timed in one cell, each computing x @ W^T once."""
    import torch

    xt = torch.from_numpy(x)
    x16, xbf = xt.half(), xt.bfloat16()
    w_t32, w_t16, w_tbf = dense

    def ours(weights, sc=scales):
        return lambda: kernels.matmul_nbits(x, weights, sc, K=k, N=n, block_size=block, threads=threads)

    def ort(session):
        return lambda: session.run(None, {"A": x})

    return {
        "ours": ours(b),
        "ours_cold": rotate([ours(c, sc) for c, sc in placed]),
        "ours_plain_cold": rotate([ours(c) for c in cold]),
        "ort_nbits_acc4": ort(sessions["ort_nbits_acc4"][0]),
        **(
            {"ort_nbits_acc4_cold": rotate([ort(sess) for sess in sessions["ort_nbits_acc4_cold"]])}
            if "ort_nbits_acc4_cold" in sessions
            else {}
        ),
        "ort_nbits_acc0": ort(sessions["ort_nbits_acc0"][0]),
        "torch_fp32": lambda: torch.nn.functional.linear(xt, w_t32),
        "ort_fp32": ort(sessions["ort_fp32"][0]),
        "torch_fp16": lambda: torch.nn.functional.linear(x16, w_t16),
        "torch_bf16": lambda: torch.nn.functional.linear(xbf, w_tbf),
    }


def path_errors(x, b, scales, w, k, n, block, session) -> dict:
    """max |y - y_ref| / max |y_ref| per quantlab path and for onnxruntime (accuracy level 4)."""
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    outs = {
        f"ours_{path}": kernels.matmul_nbits(x, b, scales, K=k, N=n, block_size=block, path=path)
        for path in ["scalar", *kernels.available_paths()]
        if path != "scalar" or x.shape[0] == 1  # the scalar reference is slow at M = 16
    }
    outs["ours_fp32_accuracy"] = kernels.matmul_nbits(x, b, scales, K=k, N=n, block_size=block, accuracy_level=0)
    outs["ort_nbits_acc4"] = session.run(None, {"A": x})[0]
    return {name: float(np.abs(y - ref).max() / np.abs(ref).max()) for name, y in outs.items()}


def bench_cpu(cells, ms, threads_list, budget_s: float, l3_bytes: int | None) -> tuple[list[dict], dict, dict]:
    import torch

    rng = np.random.default_rng(0)
    rows, accuracy = [], {}
    roofline = {t: measure_roofline(t) for t in threads_list}
    for k, n, block in cells:
        b, scales = make_weights(k, n, block, rng)
        w = dequantize_nbits(b, scales, k=k, n=n, bits=4, block_size=block)  # (n, k) fp32
        nbits_bytes = b.nbytes + scales.nbytes
        copies = cold_copies(nbits_bytes, l3_bytes)
        cold = [plain_copy(b) for _ in range(copies)]
        placed = [kernels.pack_weights([b, scales]) for _ in range(copies)]
        w_t32, w_t16, w_tbf = torch.from_numpy(w), torch.from_numpy(w).half(), torch.from_numpy(w).bfloat16()
        models = {
            "ort_nbits_acc4": nbits_model(b, scales, k, n, block, 4),
            "ort_nbits_acc0": nbits_model(b, scales, k, n, block, 0),
            "ort_fp32": dense_model(np.ascontiguousarray(w.T)),
        }
        if (k, n) == ISSUE_SHAPE:
            for m in (1, 16):
                x = rng.standard_normal((m, k)).astype(np.float32)
                errs = path_errors(x, b, scales, w, k, n, block, ort_session(models["ort_nbits_acc4"], 1))
                accuracy[f"block={block} M={m}"] = errs
        for threads in threads_list:
            torch.set_num_threads(threads)
            if (k, n) == ISSUE_SHAPE:
                sgemv_fn, sgemv_bytes = sgemv()
            sessions = {name: [ort_session(m, threads)] for name, m in models.items()}
            if copies <= MAX_ORT_SESSIONS:
                sessions["ort_nbits_acc4_cold"] = [
                    ort_session(models["ort_nbits_acc4"], threads, spin=False) for _ in range(copies)
                ]
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                fns = cpu_fns(x, b, scales, cold, placed, k, n, block, threads, sessions, (w_t32, w_t16, w_tbf))
                roof = roofline[threads]
                if (k, n) == ISSUE_SHAPE and m in BAR_SPEEDUP:
                    # The cells the issue's bar is judged on: more time, spread over more passes so
                    # that a burst of the machine's other jobs cannot land on one path's runs, and
                    # the roofline's sgemv timed among the paths, under the same load.
                    fns["roofline_sgemv"] = sgemv_fn
                    med = time_grouped(fns, 3 * budget_s, passes=9)
                    sec, cpu = med.pop("roofline_sgemv")
                    roof = (sgemv_bytes / sec / 1e9, sgemv_bytes / cpu / 1e9)
                else:
                    med = time_grouped(fns, budget_s)
                act_bytes = x.nbytes + m * n * 4
                weight_bytes = {p: nbits_bytes for p in fns if p.startswith(("ours", "ort_nbits"))}
                weight_bytes.update(
                    torch_fp32=w.nbytes, ort_fp32=w.nbytes, torch_fp16=w.nbytes // 2, torch_bf16=w.nbytes // 2
                )
                for path, (sec, cpu) in med.items():
                    nbytes = weight_bytes[path] + act_bytes
                    row = {
                        "K": k, "N": n, "block": block, "M": m, "threads": threads, "path": path,
                        "median_ms": sec * 1e3, "GBps": nbytes / sec / 1e9, "roofline_GBps": roof[0],
                        "roofline_pct": 100 * nbytes / sec / 1e9 / roof[0],
                    }  # fmt: skip
                    if threads == 1:
                        row["cpu_ms"] = cpu * 1e3
                        row["GBps_cpu"] = nbytes / cpu / 1e9
                        row["roofline_GBps_cpu"] = roof[1]
                        row["roofline_pct_cpu"] = 100 * row["GBps_cpu"] / roof[1]
                    rows.append(row)
                print(
                    f"K={k} N={n} block={block} M={m} t={threads} "
                    + " ".join(f"{p}={s * 1e3:.3f}/{c * 1e3:.3f}" for p, (s, c) in med.items()),
                    flush=True,
                )
            del sessions
            sgemv_fn = None
        del cold, placed
    return rows, {str(t): {"wall": v[0], "cpu": v[1]} for t, v in roofline.items()}, accuracy


# GPU timing: medians over CUDA_REPS repetitions of CUDA events around a run of at least CUDA_CALLS
# back-to-back calls, divided by the calls.
CUDA_REPS, CUDA_CALLS = 30, 20
MODES = ("eager", "graph")


def cuda_weight_copies(nbytes: int, l2_bytes: int) -> int:
    """Copies of `nbytes` of weights to rotate through so that each call reads them from HBM (a
    decode step streams every weight once), not from the L2 cache the previous call left them in."""
    return max(2, -(-2 * l2_bytes // nbytes))


def time_cuda(fns: list, graph: bool) -> float:
    """Median ms per call of a run of max(CUDA_CALLS, len(fns)) calls rotating through `fns`.
    Eager: events around the run, so the host's launch overhead counts wherever it exceeds the
    kernel's time (what a Python decode loop sees). Graph: the run captured once in a CUDA graph
    and replayed, which leaves the kernels' own time (and the GPU's gaps between them)."""
    import torch

    calls = max(CUDA_CALLS, len(fns))

    def run():
        for i in range(calls):
            fns[i % len(fns)]()

    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on the capture stream (cuBLAS workspaces, allocator)
            run()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            run()
        run = g.replay
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(CUDA_REPS):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bench_cuda(shapes, ms) -> list[dict]:
    """Rows per (K, N, M, path, mode): ours int4 (through torch.ops.quantlab.matmul_nbits) and
    cuBLAS fp16 (F.linear on the dequantized weights), eager and under a CUDA graph, each rotating
    through enough weight copies to stream from HBM; GB/s = the bytes a call must read (its weights
    in its own format + activations) and write, over the median time."""
    import torch

    from quantlab.kernels import torch_ops  # noqa: F401  (registers the op)

    rows = []
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 * 2**20
    rng = np.random.default_rng(0)
    for k, n in shapes:
        b, scales = make_weights(k, n, BLOCK, rng)
        w16 = torch.from_numpy(dequantize_nbits(b, scales, k=k, n=n, block_size=BLOCK)).half().to(dev)
        bt, st = torch.from_numpy(b).to(dev), torch.from_numpy(scales).half().to(dev)
        int4_bytes = b.nbytes + scales.size * 2
        bts = [bt] + [bt.clone() for _ in range(cuda_weight_copies(int4_bytes, l2) - 1)]
        w16s = [w16] + [w16.clone() for _ in range(cuda_weight_copies(w16.numel() * 2, l2) - 1)]
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=dev)
            io_bytes = m * k * 2 + m * n * 2
            ours = functools.partial(torch.ops.quantlab.matmul_nbits, K=k, N=n, block_size=BLOCK)
            paths = {
                "ours_int4": ([functools.partial(ours, x, c, st) for c in bts], int4_bytes),
                "cublas_fp16": ([functools.partial(torch.nn.functional.linear, x, c) for c in w16s], n * k * 2),
            }
            for path, (fns, weight_bytes) in paths.items():
                for mode in MODES:
                    try:
                        ms_per_call = time_cuda(fns, graph=mode == "graph")
                    except Exception as err:  # a capture that fails must not lose the eager table
                        print(f"K={k} N={n} M={m} {path} {mode}: {type(err).__name__}: {err}", flush=True)
                        continue
                    rows.append({
                        "K": k, "N": n, "M": m, "path": path, "mode": mode, "median_ms": ms_per_call,
                        "GBps": (weight_bytes + io_bytes) / ms_per_call / 1e6,
                        "weight_copies": len(fns), "calls_per_run": max(CUDA_CALLS, len(fns)),
                    })  # fmt: skip
        del bts, w16s, w16
        torch.cuda.empty_cache()
    return rows


def write_cuda(out: Path, cells, ms) -> None:
    """kernels_cuda_<gpu>.{json,md}: ours int4 x fp16 against cuBLAS fp16 on the dequantized weights,
    per call from Python (eager) and under a CUDA graph (the kernels' own time)."""
    import torch

    name = torch.cuda.get_device_name().replace(" ", "_")
    shapes = sorted({c[:2] for c in cells})
    rows = bench_cuda(shapes, [m for m in ms if m <= 64])
    meta = {
        **machine(), "gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "method": f"median over {CUDA_REPS} runs of events around >= {CUDA_CALLS} calls / calls; weights rotate "
        "through copies totalling >= 2x L2 (HBM, as in decode); graph = the run replayed as one CUDA graph",
    }  # fmt: skip
    (out / f"kernels_cuda_{name}.json").write_text(json.dumps({"meta": meta, "gpu": name, "rows": rows}, indent=1))
    by = {(r["K"], r["N"], r["M"], r["path"], r["mode"]): r for r in rows}
    lines = [
        f"# int4 x fp16 on {name}",
        "",
        f"ms per call: median over {CUDA_REPS} runs of >= {CUDA_CALLS} back-to-back calls, weights streamed from HBM "
        "(rotating copies). Eager: called from Python, launch overhead included; graph: the same calls replayed as a "
        "CUDA graph (kernel time). Speedup and GB/s (bytes read and written per call) from the graph times.",
        "",
        "| K | N | M | ours eager ms | cuBLAS eager ms | ours graph ms | cuBLAS graph ms | speedup (graph) "
        "| ours GB/s | cuBLAS GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, n, m in sorted({(r["K"], r["N"], r["M"]) for r in rows}):
        got = {(p, mode): by.get((k, n, m, p, mode)) for p in ("ours_int4", "cublas_fp16") for mode in MODES}
        ms_ = {key: f"{r['median_ms']:.4f}" if r else "-" for key, r in got.items()}
        gbps = {key: f"{r['GBps']:.0f}" if r else "-" for key, r in got.items()}
        ours, base = got["ours_int4", "graph"], got["cublas_fp16", "graph"]
        speedup = f"{base['median_ms'] / ours['median_ms']:.2f}x" if ours and base else "-"
        lines.append(
            f"| {k} | {n} | {m} | {ms_['ours_int4', 'eager']} | {ms_['cublas_fp16', 'eager']} "
            f"| {ms_['ours_int4', 'graph']} | {ms_['cublas_fp16', 'graph']} | {speedup} "
            f"| {gbps['ours_int4', 'graph']} | {gbps['cublas_fp16', 'graph']} |"
        )
    (out / f"kernels_cuda_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in {1, 16}, (4096, 11008), blocks 128 and 32")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=1.5, help="seconds per (shape, block, M, threads) cell")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--cuda-only", action="store_true", help="only the GPU table (ours int4 vs cuBLAS fp16)")
    args = ap.parse_args()
    import torch

    cells = QUICK_CELLS if args.quick else CELLS
    ms = [1, 16] if args.quick else MS
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cuda_only:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kernels: --cuda-only needs a CUDA device")
        write_cuda(args.out, cells, ms)
        return 0
    import onnxruntime

    meta = {
        **cpu_info(),
        "quantlab_backend": kernels.backend(),
        "build_info": kernels.build_info(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "blocks": sorted({c[2] for c in cells}),
    }
    meta["loadavg_start"] = " ".join(open("/proc/loadavg").read().split()[:3])
    rows, roofline, accuracy = bench_cpu(cells, ms, args.threads, args.budget, meta["l3_bytes"])
    meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    suffix = "_quick" if args.quick else ""
    (args.out / f"kernels_cpu{suffix}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "roofline_GBps": roofline,
                "accuracy_max_rel_err": accuracy,
                "issue17": issue_rows(rows),
                "rows": rows,
            },
            indent=1,
        )
    )
    write_markdown(args.out / f"kernels_cpu{suffix}.md", rows, roofline, accuracy, meta)
    plot(args.out / f"kernels_cpu{suffix}.png", rows, roofline)
    if torch.cuda.is_available():
        write_cuda(args.out, cells, ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
