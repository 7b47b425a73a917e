"""int4 matmul kernels: quantlab's against onnxruntime MatMulNBits and dense fp32/fp16/bf16, with a
measured streaming-bandwidth roofline. CPU always; CUDA (ours vs cuBLAS fp16) where a GPU is.

    python benchmarks/bench_kernels.py            # full grid (a few minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick    # M in {1, 16}, (4096, 11008) only

Writes benchmarks/results/kernels_cpu.{json,md,png} (and kernels_cuda_<gpu>.{json,md}).

Method. All paths of one (K, N, M, threads) cell are timed in the same process, in three passes
over the paths with a run of calls to each (see time_grouped); we report medians. Achieved GB/s is
the bytes a path must read once (weights in its own format + activations) over the median time;
% of roofline divides by the streaming read bandwidth measured at the start of the run with the
same thread count: an fp32 matrix-vector product over a 512 MiB matrix (torch, i.e. sgemv), as in
the issue. The int4 weights of one cell (24 MB for 4096 x 11008) fit this machine's L3, so a hot
kernel can exceed that DRAM roofline; the ``ours_cold`` column rotates through enough copies of
the weights (> 512 MiB) that every call streams them from DRAM.

Accuracy: max |y - y_ref| / max |y_ref| at M = 16, y_ref the float64 product of x with the
dequantized weights, for each path.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantlab import kernels  # noqa: E402
from quantlab.kernels.reference import dequantize_nbits  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (2048, 8192), (576, 1536)]
MS = [1, 2, 4, 8, 16, 32, 64]
BLOCK = 128
CPU_PATHS = [
    "ours",
    "ours_cold",
    "ort_nbits_acc4",
    "ort_nbits_acc0",
    "torch_fp32",
    "ort_fp32",
    "torch_fp16",
    "torch_bf16",
]


def measure_roofline(threads: int, mib: int = 512) -> tuple[float, float]:
    """Streaming read bandwidth in GB/s, fp32 sgemv over a `mib` MiB matrix (median of 9): by wall
    time, and by the calling thread's CPU time (meaningful for one thread, see time_grouped)."""
    import torch

    torch.set_num_threads(threads)
    n = 4096
    w = torch.randn(mib * 2**20 // (4 * n), n)
    x = torch.randn(n)
    med = time_grouped({"sgemv": lambda: torch.mv(w, x)}, budget_s=3.0, passes=1, min_reps=9, max_reps=9)["sgemv"]
    return w.numel() * 4 / med[0] / 1e9, w.numel() * 4 / med[1] / 1e9


def make_weights(k: int, n: int, rng: np.random.Generator):
    kb = (k + BLOCK - 1) // BLOCK
    b = rng.integers(0, 256, size=(n, kb, BLOCK // 2), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.03, size=n * kb).astype(np.float32)
    return b, scales


def ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def nbits_model(b: np.ndarray, scales: np.ndarray, k: int, n: int, accuracy_level: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=accuracy_level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")],
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


def _as_numpy(out) -> np.ndarray:
    if isinstance(out, list):  # onnxruntime
        out = out[0]
    if hasattr(out, "float"):  # torch
        return out.float().numpy()
    return np.asarray(out, dtype=np.float32)


def cpu_fns(x, b, scales, cold, k, n, threads, sessions, dense) -> dict:
    """The callables timed in one cell, each computing x @ W^T once."""
    import torch

    xt = torch.from_numpy(x)
    x16, xbf = xt.half(), xt.bfloat16()
    w_t32, w_t16, w_tbf = dense
    cold_i = [0]

    def ours_cold():
        cold_i[0] = (cold_i[0] + 1) % len(cold)
        return kernels.matmul_nbits(x, cold[cold_i[0]], scales, K=k, N=n, block_size=BLOCK, threads=threads)

    return {
        "ours": lambda: kernels.matmul_nbits(x, b, scales, K=k, N=n, block_size=BLOCK, threads=threads),
        "ours_cold": ours_cold,
        "ort_nbits_acc4": lambda: sessions["ort_nbits_acc4"].run(None, {"A": x}),
        "ort_nbits_acc0": lambda: sessions["ort_nbits_acc0"].run(None, {"A": x}),
        "torch_fp32": lambda: torch.nn.functional.linear(xt, w_t32),
        "ort_fp32": lambda: sessions["ort_fp32"].run(None, {"A": x}),
        "torch_fp16": lambda: torch.nn.functional.linear(x16, w_t16),
        "torch_bf16": lambda: torch.nn.functional.linear(xbf, w_tbf),
    }


def bench_cpu(shapes, ms, threads_list, budget_s: float) -> tuple[list[dict], dict, dict]:
    import torch

    rng = np.random.default_rng(0)
    rows, accuracy = [], {}
    roofline = {t: measure_roofline(t) for t in threads_list}
    for k, n in shapes:
        b, scales = make_weights(k, n, rng)
        w = dequantize_nbits(b, scales, k=k, n=n, bits=4, block_size=BLOCK)  # (n, k) fp32
        nbits_bytes = b.nbytes + scales.nbytes
        copies = max(1, int(np.ceil(512 * 2**20 / nbits_bytes)))
        cold = [b.copy() for _ in range(copies)]
        w_t32, w_t16, w_tbf = torch.from_numpy(w), torch.from_numpy(w).half(), torch.from_numpy(w).bfloat16()
        models = {
            "ort_nbits_acc4": nbits_model(b, scales, k, n, 4),
            "ort_nbits_acc0": nbits_model(b, scales, k, n, 0),
            "ort_fp32": dense_model(np.ascontiguousarray(w.T)),
        }
        for threads in threads_list:
            torch.set_num_threads(threads)
            sessions = {name: ort_session(m, threads) for name, m in models.items()}
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                fns = cpu_fns(x, b, scales, cold, k, n, threads, sessions, (w_t32, w_t16, w_tbf))
                med = time_grouped(fns, budget_s)
                act_bytes = x.nbytes + m * n * 4
                weight_bytes = {
                    "ours": nbits_bytes, "ours_cold": nbits_bytes, "ort_nbits_acc4": nbits_bytes,
                    "ort_nbits_acc0": nbits_bytes, "torch_fp32": w.nbytes, "ort_fp32": w.nbytes,
                    "torch_fp16": w.nbytes // 2, "torch_bf16": w.nbytes // 2,
                }  # fmt: skip
                for path, (sec, cpu) in med.items():
                    nbytes = weight_bytes[path] + act_bytes
                    row = {
                        "K": k, "N": n, "M": m, "threads": threads, "path": path, "median_ms": sec * 1e3,
                        "GBps": nbytes / sec / 1e9, "roofline_pct": 100 * nbytes / sec / 1e9 / roofline[threads][0],
                    }  # fmt: skip
                    if threads == 1:
                        row["cpu_ms"] = cpu * 1e3
                        row["GBps_cpu"] = nbytes / cpu / 1e9
                        row["roofline_pct_cpu"] = 100 * row["GBps_cpu"] / roofline[threads][1]
                    rows.append(row)
                print(
                    f"K={k} N={n} M={m} t={threads} "
                    + " ".join(f"{p}={s * 1e3:.3f}/{c * 1e3:.3f}" for p, (s, c) in med.items()),
                    flush=True,
                )
                if m == 16 and threads == threads_list[0] and (k, n) == (4096, 11008):
                    ref = x.astype(np.float64) @ w.astype(np.float64).T
                    outs = {name: _as_numpy(fn()) for name, fn in fns.items() if name != "ours_cold"}
                    outs["ours_fp32"] = kernels.matmul_nbits(x, b, scales, K=k, N=n, block_size=BLOCK, accuracy_level=0)
                    accuracy = {name: float(np.abs(y - ref).max() / np.abs(ref).max()) for name, y in outs.items()}
    return rows, {str(t): {"wall": v[0], "cpu": v[1]} for t, v in roofline.items()}, accuracy


def bench_cuda(shapes, ms) -> list[dict]:
    import torch

    from quantlab.kernels import torch_ops  # noqa: F401  (registers the op)

    rows = []
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    for k, n in shapes:
        b, scales = make_weights(k, n, rng)
        bt = torch.from_numpy(b).to(dev)
        st = torch.from_numpy(scales).half().to(dev)
        w16 = torch.from_numpy(dequantize_nbits(b, scales, k=k, n=n, block_size=BLOCK)).half().to(dev)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=dev)
            fns = {
                "ours_int4": functools.partial(torch.ops.quantlab.matmul_nbits, x, bt, st, K=k, N=n, block_size=BLOCK),
                "cublas_fp16": functools.partial(torch.nn.functional.linear, x, w16),
            }
            for name, fn in fns.items():
                for _ in range(10):
                    fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(50):
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                rows.append({"K": k, "N": n, "M": m, "path": name, "median_ms": statistics.median(times)})
    return rows


def write_markdown(path: Path, rows: list[dict], roofline: dict, accuracy: dict, meta: dict) -> None:
    roof = ", ".join(
        f"{t} thread(s) {v['wall']:.1f} GB/s" + (f" ({v['cpu']:.1f} GB/s by CPU time)" if t == "1" else "")
        for t, v in roofline.items()
    )
    lines = [
        "# int4 matmul kernels (CPU)",
        "",
        f"{meta['cpu']}; {meta['quantlab_backend']}; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}. "
        f"Block {BLOCK}, medians. Load average during the run: {meta['loadavg_start']} -> {meta['loadavg_end']} "
        "(2 vCPUs shared with other jobs: wall times are inflated and noisy).",
        "",
        f"Roofline (512 MiB fp32 sgemv): {roof}.",
        "",
        "Cells: median wall ms (GB/s, % of roofline); 1-thread tables add the calling thread's CPU ms and",
        "its % of the CPU-time roofline, which the other jobs on the machine do not inflate.",
        "",
    ]
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    for k, n in shapes:
        for t in sorted({r["threads"] for r in rows}):
            sel = [r for r in rows if r["K"] == k and r["N"] == n and r["threads"] == t]
            paths = [p for p in CPU_PATHS if any(r["path"] == p for r in sel)]
            lines += [
                f"## K={k}, N={n}, {t} thread(s)",
                "",
                "| M | " + " | ".join(paths) + " |",
                "|---" * (len(paths) + 1) + "|",
            ]
            for m in sorted({r["M"] for r in sel}):
                cells = []
                for p in paths:
                    r = next(r for r in sel if r["M"] == m and r["path"] == p)
                    cell = f"{r['median_ms']:.3f} ({r['GBps']:.1f}, {r['roofline_pct']:.0f}%)"
                    if "cpu_ms" in r:
                        cell += f"; cpu {r['cpu_ms']:.3f} ({r['roofline_pct_cpu']:.0f}%)"
                    cells.append(cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    if accuracy:
        lines += ["## Accuracy (M=16, K=4096, N=11008): max |y - y_ref| / max |y_ref|", ""]
        lines += [f"- {name}: {err:.2e}" for name, err in accuracy.items()]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], roofline: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        sel = [r for r in rows if r["K"] == 4096 and r["N"] == 11008 and r["threads"] == t]
        for p in CPU_PATHS:
            pts = sorted((r["M"], r["median_ms"]) for r in sel if r["path"] == p)
            if pts:
                ax.plot([m for m, _ in pts], [ms for _, ms in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M")
        ax.set_ylabel("median ms")
        ax.set_title(f"K=4096, N=11008, block {BLOCK}, {t} thread(s); roofline {roofline[str(t)]['wall']:.1f} GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in {1, 16}, (4096, 11008) only")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=1.5, help="seconds per (shape, M, threads) cell")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    import onnxruntime
    import torch

    shapes = [(4096, 11008)] if args.quick else SHAPES
    ms = [1, 16] if args.quick else MS
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "quantlab_backend": kernels.backend(),
        "build_info": kernels.build_info(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "block_size": BLOCK,
    }
    try:
        meta["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    meta["loadavg_start"] = " ".join(open("/proc/loadavg").read().split()[:3])
    rows, roofline, accuracy = bench_cpu(shapes, ms, args.threads, args.budget)
    meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    suffix = "_quick" if args.quick else ""
    (args.out / f"kernels_cpu{suffix}.json").write_text(
        json.dumps({"meta": meta, "roofline_GBps": roofline, "accuracy_max_rel_err": accuracy, "rows": rows}, indent=1)
    )
    write_markdown(args.out / f"kernels_cpu{suffix}.md", rows, roofline, accuracy, meta)
    plot(args.out / f"kernels_cpu{suffix}.png", rows, roofline)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().replace(" ", "_")
        cuda_rows = bench_cuda(shapes, [m for m in ms if m <= 64])
        (args.out / f"kernels_cuda_{name}.json").write_text(json.dumps({"gpu": name, "rows": cuda_rows}, indent=1))
        lines = [f"# int4 x fp16 on {name}", "", "| K | N | M | ours int4 ms | cuBLAS fp16 ms | speedup |"]
        lines.append("|---|---|---|---|---|---|")
        cublas = {(c["K"], c["N"], c["M"]): c["median_ms"] for c in cuda_rows if c["path"] == "cublas_fp16"}
        for r in cuda_rows:
            if r["path"] == "ours_int4":
                base, ours = cublas[(r["K"], r["N"], r["M"])], r["median_ms"]
                lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {ours:.4f} | {base:.4f} | {base / ours:.2f}x |")
        (args.out / f"kernels_cuda_{name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
