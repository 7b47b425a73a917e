"""Latency per token, peak memory, size and quality: the README's performance table, in one command.

    python benchmarks/bench_latency.py             # everything, then README.md's table (2-3 hours on 2 cores)
    python benchmarks/bench_latency.py --quick     # stories260K only, tiny runs, into results/quick/ (a minute)
    python benchmarks/make_readme_table.py         # render results/latency_*.json into README.md again
    python benchmarks/bench_latency.py --peers     # quantlab against its peers, SmolLM2, 2 threads (~15 min)

Run the full one on a quiet machine (`uptime` load well under 1): every JSON records the load average
and warns when it was high or when the spread of the steps says the machine was noisy.

Full run (artifacts are kept in --work and reused on the next run unless --fresh):

1. SmolLM2-135M-Instruct (from ../shared/models, the Q4_1 GGUF dequantized): fp32, fp16, w8a16-g128,
   w4a16-g128-asym and -sym artifacts (onnxruntime; the w4/w8 ones also through torch with our kernels),
   and the GGUF itself through transformers fp32/bf16 eager and llama.cpp. Prompt 128, 128 generated
   tokens, 5 runs, threads 1 and 2, quality against the fp32 artifact -> results/latency_smollm2.json
2. A Llama-3.2-1B-shaped model with RANDOM weights (speed only; benchmarks/bench_quantize.py writes it):
   the same recipes, and its bf16 HF folder through transformers -> results/latency_1b.json
3. TPOT against context (256, 1024, 4096 tokens in the KV cache) for fp32, w8, w4 of the 1B-shaped model
   at 2 threads, and any --kv-artifact (KV-cache variants) -> results/latency_1b_context.json

Each file comes with a .png. Every figure is measured by `quantlab bench` (see quantlab/bench/).

--peers (issue 18): SmolLM2 as quantlab converts it (w4a16-g32-asym, the default fused graph, with the fp32
cache and with --kv int4-static), as onnxruntime-genai's model builder converts it (int4, from the HF folder
transformers reads out of the GGUF) and as llama.cpp quantizes it (q4_0, q4_K_M from an f32 GGUF of the
same weights), with the peers' own tools (quantlab/bench/peers.py), then two `quantlab bench` runs at 2
threads:

    results/peers_smollm2.json   TPOT after prompts of --peer-contexts tokens (256,2048,4096): every artifact
                                 in onnxruntime-genai, quantlab's in its native runtime (torch-kernels), every
                                 GGUF in llama.cpp
    results/batch_smollm2.json   tokens/s decoding 1, 4, 16 sequences together (prompt 128 each), the
                                 artifacts in onnxruntime, onnxruntime-genai and torch-kernels, and
                                 w4a16-g128-asym with --kv int8 (the native runtime's batch artifact)

--peers-only sweep|batch runs one of the two (batch needs no llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_quantize import write_random_model  # noqa: E402

MODELS = REPO.parent / "shared" / "models"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES = MODELS / "stories260K.bin"
RECIPES = ("fp32", "fp16", "w8a16-g128", "w4a16-g128-asym", "w4a16-g128-sym")
CONTEXT_RECIPES = ("fp32", "w8a16-g128", "w4a16-g128-asym")
LABEL_1B = "Llama-3.2-1B-shaped, RANDOM weights (speed only)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def convert(source: Path, folder: Path, recipe: str, fresh: bool, extra: list[str] = ()) -> Path:
    """An artifact of ``source`` with ``recipe`` (and ``extra`` flags) in ``folder``, reused when it is there."""
    manifest = folder / "manifest.json"
    if not fresh and manifest.is_file() and json.loads(manifest.read_text())["recipe"]["name"] == recipe:
        log(f"reusing {folder}")
        return folder
    log(f"convert {source.name} --recipe {recipe} -> {folder}")
    cmd = [
        sys.executable,
        "-m",
        "quantlab",
        "convert",
        str(source),
        "-o",
        str(folder),
        "--recipe",
        recipe,
        "--no-eval",
        "--no-progress",
        "--force",
        *extra,
    ]
    subprocess.run(cmd, check=True)
    return folder


def bench(name: str, targets: list[Path], out_dir: Path, args: list[str], prefix: str = "latency_") -> Path:
    """``quantlab bench`` into out_dir/<prefix><name>.{json,png}; a failed row is reported, not fatal."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_file, png = out_dir / f"{prefix}{name}.json", out_dir / f"{prefix}{name}.png"
    cmd = [
        sys.executable,
        "-m",
        "quantlab",
        "bench",
        *map(str, targets),
        *args,
        "--json",
        str(json_file),
        "--plot",
        str(png),
    ]
    log(" ".join(cmd[1:]))
    code = subprocess.run(cmd).returncode
    if code not in (0, 1) or not json_file.is_file():
        raise SystemExit(f"quantlab bench {name} failed with exit code {code}")
    log(f"wrote {json_file} and {png}" + (" (some rows failed: see the table)" if code else ""))
    return json_file


# Batch only: blocks of 128 and the per-token int8 cache, the native runtime's batch-16 artifact (a quarter
# of the fp32 cache's bytes a step; plain attention, which is what reads that cache).
BATCH_ONLY = {"w4a16-g128-asym-kv-int8": ("w4a16-g128-asym", ["--kv", "int8"])}


def prepare_peers(work: Path, fresh: bool, gguf: bool = True) -> dict[str, tuple[Path, str]]:
    """name -> (artifact or GGUF, the command that made it), each made once in ``work`` and reused; without
    ``gguf`` no llama.cpp files (the batch run does not time them)."""
    from quantlab.bench import peers

    work.mkdir(parents=True, exist_ok=True)
    made: dict[str, tuple[Path, str]] = {}
    # the default graph (--attention auto: fused) with the fp32 cache, and with the int4 cache it reads in place
    for name, extra in (("w4a16-g32-asym-fused", []), ("w4a16-g32-asym-fused-kv-int4", ["--kv", "int4-static"])):
        extra = [*extra, "--attention", "fused"]
        folder = convert(SMOLLM2, work / name, "w4a16-g32-asym", fresh, extra)
        made[name] = folder, " ".join(["quantlab convert", SMOLLM2.name, "--recipe w4a16-g32-asym", *extra])
    for name, (recipe, extra) in BATCH_ONLY.items():
        folder = convert(SMOLLM2, work / name, recipe, fresh, extra)
        made[name] = folder, " ".join(["quantlab convert", SMOLLM2.name, "--recipe", recipe, *extra])

    def once(path: Path, make) -> str:
        if path.exists() and not fresh:
            log(f"reusing {path}")
            return "(reused: made by an earlier run of this script)"
        log(f"making {path}")
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return make()

    hf = work / "hf"
    hf_cmd = once(hf, lambda: peers.hf_folder_from_gguf(SMOLLM2, hf))
    builder = work / "genai-builder-int4"
    made["genai-builder-int4"] = builder, once(builder, lambda: peers.genai_builder(hf, builder)) + f" (from {hf_cmd})"
    if not gguf:
        return made
    f32 = work / f"{SMOLLM2.stem}.f32.gguf"
    f32_cmd = once(f32, lambda: peers.write_f32_gguf(SMOLLM2, f32))
    for kind in ("q4_0", "q4_K_M"):
        out = work / f"{SMOLLM2.stem}.{kind}.gguf"
        command = once(out, lambda out=out, kind=kind: peers.llama_quantize(f32, out, kind))
        made[f"llama.cpp-{kind}"] = out, f"{command} (from {f32_cmd})"
    return made


def run_peers(work: Path, out_dir: Path, fresh: bool, opts: argparse.Namespace) -> None:
    made = prepare_peers(work / "peers", fresh, gguf=opts.peers_only != "batch")
    label = ["--model-label", "SmolLM2-135M-Instruct"]
    common = ["--threads", "2", "--runs", str(min(opts.runs, 3)), *label] + (["--pin", opts.pin] if opts.pin else [])
    # quantlab's artifacts in onnxruntime-genai (the runtime the builder's output is made for) and in quantlab's
    # native runtime (torch-kernels: one C++ call per decoder layer); the builder's in onnxruntime-genai; the
    # GGUFs in llama.cpp
    runtimes = ["--backend", "onnxruntime-genai", "--backend", "torch-kernels"]
    every = [path for name, (path, _) in made.items() if name not in BATCH_ONLY]
    onnx = [path for path, _ in made.values() if path.is_dir()]
    sweep = [*common, "--contexts", opts.peer_contexts, "--gen", str(min(opts.gen, 64)), *runtimes]
    files = []
    if opts.peers_only != "batch":
        files.append(bench("smollm2", every, out_dir, [*sweep, "--backend", "llama.cpp"], prefix="peers_"))
    runtimes = ["--backend", "onnxruntime", *runtimes]
    batch = [*common, "--batch", "1,4,16", "--prompt-len", "128", "--gen", str(min(opts.gen, 32)), *runtimes]
    if opts.peers_only != "sweep":
        files.append(bench("smollm2", onnx, out_dir, batch, prefix="batch_"))
    for json_file in files:  # how each target was made, beside what was measured
        doc = json.loads(json_file.read_text())
        doc["made_by"] = {os.fspath(path): command for path, command in made.values()}
        json_file.write_text(json.dumps(doc, indent=1) + "\n")


def run_quick(work: Path, out_dir: Path, fresh: bool) -> None:
    recipes = ("fp32", "fp16", "w8a16-g128", "w4a16-g128-asym")
    arts = [convert(STORIES, work / "stories260K" / r, r, fresh) for r in recipes]
    common = ["--threads", "1", "--runs", "3", "--gen", "16", "--roofline-mib", "128"]
    bench("quick", [*arts, STORIES], out_dir, [*common, "--prompt-len", "32", "--baseline", str(arts[0])])
    # 1024 does not fit stories260K's 512 positions: the table says so
    bench(
        "quick_context",
        [arts[0], arts[2], arts[3]],
        out_dir,
        [*common, "--contexts", "64,256,1024", "--backend", "onnxruntime"],
    )


def run_full(work: Path, out_dir: Path, fresh: bool, opts: argparse.Namespace) -> None:
    timing = ["--runs", str(opts.runs), "--gen", str(opts.gen), "--prompt-len", "128", "--threads", opts.threads]
    if opts.pin:
        timing += ["--pin", opts.pin]
    smol = {}
    if "smollm2" not in opts.skip or opts.context_model == "smollm2":
        smol = {r: convert(SMOLLM2, work / "smollm2" / r, r, fresh) for r in RECIPES}
    if "smollm2" not in opts.skip:
        arts = list(smol.values())
        bench(
            "smollm2",
            [*arts, SMOLLM2],
            out_dir,
            [*timing, "--baseline", str(arts[0]), "--model-label", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"],
        )
    context_args = [
        "--contexts",
        "256,1024,4096",
        "--threads",
        "2",
        "--runs",
        "3",
        "--gen",
        str(min(opts.gen, 32)),
        "--backend",
        "onnxruntime",
        "--backend",
        "torch-kernels",
    ] + (["--pin", opts.pin] if opts.pin else [])
    if "1b-context" not in opts.skip and opts.context_model == "smollm2":
        targets = [smol[r] for r in CONTEXT_RECIPES] + [Path(p) for p in opts.kv_artifact]
        label = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
        bench("smollm2_context", targets, out_dir, [*context_args, "--model-label", label])
    if "1b" in opts.skip and ("1b-context" in opts.skip or opts.context_model == "smollm2"):
        return
    hf = work / "llama-1b-random-hf"
    if fresh or not (hf / "model.safetensors.index.json").is_file():
        log(f"writing the random-weight Llama-3.2-1B-shaped model to {hf}")
        shutil.rmtree(hf, ignore_errors=True)
        write_random_model(hf, layers=16)
    arts = {r: convert(hf, work / "llama-1b-random" / r, r, fresh) for r in opts.recipes_1b}
    if "1b" not in opts.skip:
        # transformers on the bf16 folder (--hf-model) is "what users run today"; --no-hf-1b leaves it out
        extra = [] if opts.no_hf_1b else [hf]
        bench("1b", [*arts.values(), *extra], out_dir, [*timing, "--model-label", LABEL_1B])
    if "1b-context" not in opts.skip and opts.context_model == "1b":
        targets = [arts[r] for r in CONTEXT_RECIPES if r in arts] + [Path(p) for p in opts.kv_artifact]
        bench("1b_context", targets, out_dir, [*context_args, "--model-label", LABEL_1B])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="stories260K only, tiny runs, into results/quick/")
    ap.add_argument("--peers", action="store_true", help="quantlab against genai's builder and llama.cpp (SmolLM2)")
    ap.add_argument(
        "--peer-contexts", default="256,2048,4096", help="prompt lengths of --peers (default 256,2048,4096)"
    )
    ap.add_argument(
        "--peers-only",
        choices=["sweep", "batch"],
        default=None,
        help="with --peers: only the context sweep (peers_smollm2.json) or only the batch run (batch_smollm2.json, "
        "no llama.cpp needed)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "quantlab-bench-latency",
        help="where artifacts are converted and kept between runs (about 20 GB for the full run)",
    )
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--fresh", action="store_true", help="convert again even when an artifact is in --work")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", default="1,2", help="thread counts for the tables (default 1,2)")
    ap.add_argument("--pin", default=None, help="pin the workers to these CPUs, e.g. 0,1")
    ap.add_argument("--skip", nargs="*", default=[], choices=["smollm2", "1b", "1b-context"])
    ap.add_argument("--no-readme", action="store_true", help="do not render the results into README.md")
    ap.add_argument(
        "--recipes-1b",
        nargs="+",
        default=list(RECIPES),
        choices=RECIPES,
        help="recipes converted and timed for the 1B-shaped model (default: all)",
    )
    ap.add_argument("--no-hf-1b", action="store_true", help="leave transformers out of the 1B table (slow)")
    ap.add_argument(
        "--context-model",
        choices=["1b", "smollm2"],
        default="1b",
        help="the model of the TPOT-against-context sweep (smollm2: about 10x quicker)",
    )
    ap.add_argument(
        "--kv-artifact",
        action="append",
        default=[],
        metavar="DIR",
        help="a 1B-shaped artifact with a compressed KV cache, added to the context sweep",
    )
    opts = ap.parse_args()
    out_dir = opts.out or REPO / "benchmarks" / "results" / ("quick" if opts.quick else "")
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.2f}: other work is running, timings will be noise")
    start = time.perf_counter()
    if opts.peers:
        if not SMOLLM2.is_file():
            raise SystemExit(f"{SMOLLM2} is not there (the shared models folder beside the repository)")
        run_peers(opts.work, opts.out or REPO / "benchmarks" / "results", opts.fresh, opts)
    elif opts.quick:
        if not STORIES.is_file():
            raise SystemExit(f"{STORIES} is not there (the shared models folder beside the repository)")
        run_quick(opts.work, out_dir, opts.fresh)
    else:
        if "smollm2" not in opts.skip and not SMOLLM2.is_file():
            raise SystemExit(f"{SMOLLM2} is not there (the shared models folder beside the repository)")
        run_full(opts.work, out_dir, opts.fresh, opts)
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    if opts.quick or opts.peers or opts.no_readme or opts.out is not None:
        log("README.md untouched (render with python benchmarks/make_readme_table.py)")
        return 0
    # the README's table is generated from what was just written; without its markers this says so and fails
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_readme_table.py")]).returncode


if __name__ == "__main__":
    sys.exit(main())
