"""Quality per byte: quantlab's recipes and llama.cpp's quantization types side by side on SmolLM2-135M-Instruct.

    python benchmarks/bench_pareto.py                                 # every row but OPT_IN (~20 min, 2 cores)
    python benchmarks/bench_pareto.py --quantlab-rows w4a16-g32-asym --llama-rows q4_K_M,q4_0
    python benchmarks/bench_pareto.py --llama-rows ''                 # quantlab rows only
    python benchmarks/bench_pareto.py --render                        # markdown, plot and README from the JSON

Both tools start from one fp32 model: the Q4_1 GGUF dequantized to fp32. quantlab converts that GGUF
(`quantlab convert`, which dequantizes every tensor) with each recipe; llama.cpp gets the same
dequantized weights as an f32 GGUF (written here with the gguf package, metadata and tokenizer kept)
and re-quantizes it with its own quantizer (`llama_model_quantize`, no imatrix). Each quantized model
is measured against its own tool's fp32 model on the same token sequences, 8 x 256 tokens of English
prose tokenized once with the model's tokenizer: the mean of KL(P_fp32 || P_quant) over the 8 x 255
predicted positions, top-1 agreement and perplexity (quantlab.quant.metrics, one code path for both
tools), against the size of the file a user ships (model.onnx + model.onnx.data; the .gguf). The two
fp32 references are also compared with each other, which bounds what the runtimes alone contribute.

The text is the prose of the Python Language Reference as CPython ships it in pydoc_data/topics.py
(every Python has it, nothing is downloaded): the paragraphs of plain sentences, code, grammar and lists
dropped. It is human-written English that no recipe saw: quantlab calibrates on text sampled from the
model itself and llama.cpp runs here without an imatrix. It is technical prose, so absolute perplexities
are not those of a novel; the ranking of the rows is what the table is for.

Rows are the two tables QUANTLAB_ROWS and LLAMA_ROWS: a new row is one line. A quantlab row whose
options this quantlab does not have (exit 2) is recorded as unavailable, not as a failure. The calibrated
rows (OPT_IN: GPTQ, AWQ) run only when named: on 2 cores they take hours.
Conversions stay in --workdir (default out/pareto) keyed by their options, so a rerun only measures.
Rows measured on the same tokens and model are merged into the existing results file, so
`--quantlab-rows NEW --llama-rows ''` adds one row to it. llama-cpp-python is optional
(`pip install -e .[llama]`, a source build of ~12 min); without it the llama.cpp rows are skipped and
say why. Writes benchmarks/results/pareto_smollm2.{json,md,png} and the README's "Quality per byte" block.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine  # noqa: E402  (benchmarks/ is the script folder)
from pareto_report import RESULT_NAME, markdown, merge, write_outputs  # noqa: E402

from quantlab.bench import peers  # noqa: E402

logger = logging.getLogger("bench_pareto")

MODEL = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = REPO / "benchmarks" / "results"
SEQUENCES, SEQ_LEN, THREADS = 8, 256, 2

# quantlab rows: name -> `quantlab convert` options. "fp32" is the reference and always runs.
CALIB = ("--calib-from-model", "32")
QUANTLAB_ROWS: dict[str, tuple[str, ...]] = {
    "fp32": ("--recipe", "fp32"),
    "w8a16-g32-asym": ("--recipe", "w8a16-g32-asym"),
    "w8a16-g128-asym": ("--recipe", "w8a16-g128-asym"),
    "w4a16-g32-asym": ("--recipe", "w4a16-g32-asym"),
    "w4a16-g128-asym": ("--recipe", "w4a16-g128-asym"),
    "w4a16-g128-sym": ("--recipe", "w4a16-g128-sym"),
    "w4a16-g128-gptq": ("--recipe", "w4a16-g128-gptq", *CALIB),
    "w4a16-g128-awq": ("--recipe", "w4a16-g128-awq", *CALIB),
    "source": ("--recipe", "source"),
    # the sizes: llama.cpp q4_0, q4_K_M and q8_0 on this model
    "max-size-91.7MB": ("--max-size", "91.7MB"),
    "max-size-105.5MB": ("--max-size", "105.5MB"),
    "max-size-144.8MB": ("--max-size", "144.8MB"),
    # the GGUF's own codes not kept: what a user converting a Hugging Face checkpoint gets
    "requantize-max-size-91.7MB": ("--max-size", "91.7MB", "--requantize"),
    "requantize-max-size-105.5MB": ("--max-size", "105.5MB", "--requantize"),
    "requantize-max-size-144.8MB": ("--max-size", "144.8MB", "--requantize"),
}
# Run only when named: calibration is slow here (GPTQ took ~5 min per decoder layer on 2 busy cores, 2.5 h in all).
OPT_IN = frozenset({"w4a16-g128-gptq", "w4a16-g128-awq"})
# llama.cpp rows: name -> the llama_ftype constant in llama_cpp. "f32" is the reference and always runs.
LLAMA_ROWS: dict[str, str] = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
}
QUANTLAB_REF, LLAMA_REF = "fp32", "f32"
GGML_TYPE_F32 = 0  # ggml_type of the KV cache: f32, as quantlab's graph keeps it
# llama.cpp's extra weight buffers (repacked Q4/Q8 layouts, AMX tiles), off only on AMX CPUs where
# llama-cpp-python 0.3.36 segfaults with them (see peers.llama_cpp_extra_buffers; quality is the same)
LLAMA_EXTRA_BUFFERS = peers.llama_cpp_extra_buffers()
VERSIONED = ("quantlab", "onnxruntime", "numpy", "gguf", "llama-cpp-python", "matplotlib")


# --- rows --------------------------------------------------------------------------------------------------------


def pick_rows(spec: str | None, table: Sequence[str], reference: str) -> list[str]:
    """Rows named in a comma list, the reference first and each once; None: every row but the OPT_IN ones;
    '' (or only commas): none, the tool is skipped. SystemExit naming unknown rows."""
    if spec is None:
        return [name for name in table if name not in OPT_IN]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        return []
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"bench_pareto: unknown row(s) {', '.join(unknown)}; known: {', '.join(table)}")
    return [reference] + [n for n in dict.fromkeys(names) if n != reference]


def row_key(options: Sequence[str]) -> str:
    """Short hash of a row's options: the cache folder changes when the row's definition does."""
    return hashlib.sha256("\0".join(options).encode()).hexdigest()[:8]


# --- the evaluation text -----------------------------------------------------------------------------------------


def prose_paragraphs(document: str, min_chars: int = 200) -> list[str]:
    """The paragraphs of plain sentences in a reStructuredText-like plain text, each on one line.

    Kept: blocks (between blank lines) with no indented line (indent marks code, grammar, nested
    lists), starting with a capital letter and ending with a full stop, at least ``min_chars`` long
    and at least 85% letters and spaces. ``*emphasis*`` markers are dropped.
    """
    out = []
    for block in re.split(r"\n[ \t]*\n", document):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line[:1] in (" ", "\t") for line in lines):
            continue
        text = re.sub(r"\*([^*\s][^*]*)\*", r"\1", " ".join(line.strip() for line in lines))
        if len(text) < min_chars or not text[0].isupper() or not text.endswith("."):
            continue
        if sum(c.isalpha() or c.isspace() for c in text) < 0.85 * len(text):
            continue
        out.append(text)
    return out


def eval_text() -> tuple[str, str]:
    """(text, description) of the evaluation prose: see the module docstring."""
    import platform
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    paragraphs = [p for name in sorted(topics) for p in prose_paragraphs(topics[name])]
    description = (
        f"Python {platform.python_version()} Language Reference prose (pydoc_data/topics.py, {len(topics)} topics "
        f"in name order): {len(paragraphs)} paragraphs of plain sentences; code, grammar and lists dropped"
    )
    return "\n\n".join(paragraphs), description


def token_windows(ids: Sequence[int], n: int, seq_len: int, bos: int | None = None) -> np.ndarray:
    """``n`` windows of ``seq_len`` tokens spread evenly over ``ids`` (first and last included), each
    starting with ``bos`` when given; ValueError when the text is too short. Returns (n, seq_len) int64."""
    body = seq_len - (bos is not None)
    if len(ids) < body * n:
        raise ValueError(f"{len(ids)} tokens cannot give {n} disjoint windows of {body}")
    last = len(ids) - body
    starts = [round(i * last / max(n - 1, 1)) for i in range(n)]
    rows = [([bos] if bos is not None else []) + list(ids[s : s + body]) for s in starts]
    return np.array(rows, dtype=np.int64)  # (n, seq_len)


# --- metrics: one code path for both tools -----------------------------------------------------------------------


def compare(ids: np.ndarray, reference: Sequence[np.ndarray], candidate: Iterable[np.ndarray]) -> dict:
    """KL(P_ref || P_cand) over every predicted position, top-1 agreement, and both perplexities.

    ids (n, seq); reference and candidate give (seq, vocab) logits per sequence, in order. Position t
    predicts token t + 1, so each sequence contributes seq - 1 positions (as quantlab.eval does).
    """
    from quantlab.quant.metrics import kl_divergence_per_token, log_softmax

    kl, agree, nll_ref, nll_cand = [], [], [], []
    for row, ref, cand in zip(ids, reference, candidate, strict=True):
        ref, cand = ref[:-1], cand[:-1]  # (seq - 1, vocab): the last position predicts nothing here
        targets = row[1:]
        kl.append(kl_divergence_per_token(ref, cand))
        agree.append(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1))
        for logits, nll in ((ref, nll_ref), (cand, nll_cand)):
            nll.append(-log_softmax(logits)[np.arange(targets.size), targets])
    kl_all = np.concatenate(kl)
    return {
        "positions": int(kl_all.size),
        "kld_mean": float(np.mean(kl_all)),
        "kld_median": float(np.median(kl_all)),
        "kld_p99": float(np.percentile(kl_all, 99)),
        "kld_max": float(np.max(kl_all)),
        "top1_agreement": float(np.mean(np.concatenate(agree))),
        "ppl": float(np.exp(np.mean(np.concatenate(nll_cand)))),
        "reference_ppl": float(np.exp(np.mean(np.concatenate(nll_ref)))),
    }


# --- quantlab ----------------------------------------------------------------------------------------------------


def quantlab_convert(model: Path, out: Path, options: Sequence[str]) -> dict:
    """`quantlab convert` into ``out`` unless it is already there: {"status", "command", ...}."""
    cmd = ["quantlab", "convert", str(model), "-o", str(out), *options, "--no-eval", "--no-progress"]
    info = {"command": " ".join(cmd)}
    if (out / "manifest.json").is_file():
        return {**info, "status": "ok", "cached": True}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        status = "unavailable" if proc.returncode == 2 else "failed"
        return {**info, "status": status, "reason": f"exit {proc.returncode}: {last}"}
    return {**info, "status": "ok", "cached": False, "convert_s": round(time.perf_counter() - start, 1)}


def quantlab_size(artifact: Path) -> int:
    """What the model weighs: model.onnx + model.onnx.data (the tokenizer and configs are left out)."""
    return sum(
        (artifact / name).stat().st_size for name in ("model.onnx", "model.onnx.data") if (artifact / name).exists()
    )


def quantlab_logits(artifact: Path, ids: np.ndarray, threads: int) -> Iterable[np.ndarray]:
    """(seq, vocab) logits of each sequence: one full forward from an empty cache in onnxruntime."""
    from quantlab.runtime.generate import OrtDecoder

    decoder = OrtDecoder(artifact, threads=threads)
    for row in ids:
        logits, _ = decoder.forward(row[None, :], decoder.empty_cache(1))  # (1, seq, vocab)
        yield logits[0]


# --- llama.cpp ---------------------------------------------------------------------------------------------------


def llama_cpp_missing() -> str | None:
    """Why llama.cpp rows cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return (
            f"llama-cpp-python is not installed ({e}); `pip install -e .[llama]` builds it from source "
            "(~12 min on 2 cores; pip caches the wheel)"
        )
    return None


def llama_quantize(f32: Path, out: Path, ftype_name: str, threads: int) -> dict:
    """llama.cpp's quantizer (no imatrix) from the f32 GGUF into ``out`` unless it is already there."""
    command = f"llama_cpp.llama_model_quantize({f32.name}, {out.name}, ftype={ftype_name}, nthread={threads})"
    if out.is_file():
        return {"status": "ok", "command": command, "cached": True}
    start = time.perf_counter()
    try:
        command = peers.llama_quantize(f32, out, ftype_name, threads)
    except RuntimeError as e:
        return {"status": "failed", "command": command, "reason": str(e)}
    return {"status": "ok", "command": command, "cached": False, "convert_s": round(time.perf_counter() - start, 1)}


def llama_logits(path: Path, ids: np.ndarray, threads: int) -> Iterable[np.ndarray]:
    """(seq, vocab) logits of each sequence from llama.cpp: all positions (logits_all), f32 KV cache."""
    import llama_cpp.llama_cpp as low_level
    from llama_cpp import Llama

    seq = ids.shape[1]
    default_params = low_level.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = LLAMA_EXTRA_BUFFERS
        return params

    # Llama() takes no use_extra_bufts: it starts from llama_model_default_params(), so that is swapped
    # for as long as the model loads
    low_level.llama_model_default_params = model_params
    try:
        llm = Llama(
            model_path=str(path),
            n_ctx=seq,
            n_batch=seq,
            n_ubatch=seq,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            verbose=False,
        )
    finally:
        low_level.llama_model_default_params = default_params
    try:
        for row in ids:
            llm.reset()
            llm.eval(row.tolist())
            yield np.array(llm.scores[:seq], dtype=np.float32)  # a copy: the next eval overwrites scores
    finally:
        llm.close()


# --- the run -----------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def quantlab_source() -> dict:
    """The commit the working tree is on and the files that differ from it: the quantlab that was measured."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "modified_files": changed}


def machine_section() -> dict:
    """common.machine() plus the CPU's model and flags, the versions, and llama.cpp's own system line."""
    from quantlab.bench.runner import machine_info

    info = {**machine(), **machine_info()}
    info.pop("loadavg_start", None)
    info["versions"] = {}
    for dist in VERSIONED:
        try:
            info["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][dist] = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_flags"] = next(ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        info["cpu_flags"] = None
    if llama_cpp_missing() is None:
        import llama_cpp

        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    return info


def measure_tool(tool: str, rows: list[str], prepare, logits_of, ids: np.ndarray) -> tuple[list[dict], list]:
    """Each row of one tool against that tool's reference (rows[0]); (result rows, reference logits)."""
    results, reference = [], None
    for name in rows:
        info = prepare(name)
        row = {"tool": tool, "row": name, **{k: v for k, v in info.items() if k != "path"}}
        if info["status"] == "ok":
            logger.info("%s %s: measuring", tool, name)
            start = time.perf_counter()
            logits = list(logits_of(info["path"], ids))
            if reference is None:
                reference = logits
            row.update(compare(ids, reference, logits), measure_s=round(time.perf_counter() - start, 1))
        elif name == rows[0]:
            raise SystemExit(f"bench_pareto: {tool}'s reference {name} failed: {info.get('reason')}")
        logger.info("%s %s: %s", tool, name, {k: row.get(k) for k in ("status", "size_bytes", "kld_mean", "reason")})
        results.append(row)
    return results, reference


def run(args) -> dict:
    from quantlab.runtime.tokenizer import load_tokenizer

    work = Path(args.workdir)
    ql_rows = pick_rows(args.quantlab_rows, QUANTLAB_ROWS, QUANTLAB_REF)
    ll_rows = pick_rows(args.llama_rows, LLAMA_ROWS, LLAMA_REF)
    model_sha = sha256_file(args.model)

    def prepare_quantlab(name: str) -> dict:
        options = QUANTLAB_ROWS[name]
        out = work / "quantlab" / f"{name}-{row_key(options)}"
        info = quantlab_convert(args.model, out, options)
        return {**info, "path": out, "size_bytes": quantlab_size(out)} if info["status"] == "ok" else info

    reference_dir = prepare_quantlab(QUANTLAB_REF)["path"]  # the tokenizer lives in the fp32 artifact
    tokenizer = load_tokenizer(reference_dir)
    text, text_source = eval_text()
    bos = tokenizer.bos_token_id if tokenizer.add_bos_default else None
    ids = token_windows(tokenizer.encode(text, add_bos=False), args.sequences, args.seq_len, bos)
    data = {
        "text": text_source,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "sequences": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "bos_first": bos is not None,
        "token_ids_sha256": hashlib.sha256(np.ascontiguousarray(ids, "<i8").tobytes()).hexdigest(),
        "threads": args.threads,
        "first_window": tokenizer.decode(ids[0].tolist())[:200],
    }
    logger.info("eval data: %s", data)

    ql_results, ql_reference = measure_tool(
        "quantlab", ql_rows, prepare_quantlab, lambda p, x: quantlab_logits(p, x, args.threads), ids
    )
    notes, ll_results, cross = [], [], None
    missing = llama_cpp_missing() if ll_rows else None
    if missing:
        notes.append(f"llama.cpp rows skipped: {missing}")
        logger.warning("llama.cpp rows skipped: %s", missing)
    elif ll_rows:
        f32 = work / "llama" / f"{args.model.stem}.f32.gguf"
        if not f32.is_file():
            f32.parent.mkdir(parents=True, exist_ok=True)
            logger.info("writing %s", f32)
            peers.write_f32_gguf(args.model, f32)

        def prepare_llama(name: str) -> dict:
            if name == LLAMA_REF:
                return {
                    "status": "ok",
                    "command": f"write_f32_gguf({args.model.name})",
                    "path": f32,
                    "size_bytes": f32.stat().st_size,
                }
            out = work / "llama" / f"{args.model.stem}.{name}.gguf"
            info = llama_quantize(f32, out, LLAMA_ROWS[name], args.threads)
            return {**info, "path": out, "size_bytes": out.stat().st_size} if info["status"] == "ok" else info

        ll_results, ll_reference = measure_tool(
            "llama.cpp", ll_rows, prepare_llama, lambda p, x: llama_logits(p, x, args.threads), ids
        )
        if ql_reference is not None and ll_reference is not None:
            cross = {"what": "llama.cpp f32 GGUF against quantlab's fp32 artifact (the runtimes alone)"}
            cross.update(compare(ids, ql_reference, ll_reference))
    return {
        "benchmark": "pareto",
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"file": args.model.name, "sha256": model_sha, "bytes": args.model.stat().st_size},
        "machine": machine_section(),
        "quantlab_source": quantlab_source(),
        "eval": data,
        "references": {"quantlab": QUANTLAB_REF, "llama.cpp": LLAMA_REF, "cross_check": cross},
        "settings": {
            "quantlab": "onnxruntime CPU, one full forward per sequence from an empty cache, f32 KV cache",
            "llama.cpp": {
                "kv_cache": "f32",
                "use_extra_bufts": LLAMA_EXTRA_BUFFERS,
                "imatrix": None,
                "n_ctx": int(ids.shape[1]),
                "logits_all": True,
            },
        },
        "commands": ["python benchmarks/bench_pareto.py " + " ".join(args.argv)],
        "results": ql_results + ll_results,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--workdir", default=str(REPO / "out" / "pareto"), help="cached conversions (default out/pareto)")
    ap.add_argument(
        "--quantlab-rows",
        help=f"comma list of {', '.join(QUANTLAB_ROWS)} (default all but {', '.join(sorted(OPT_IN))}; '' none)",
    )
    ap.add_argument("--llama-rows", help=f"comma list of {', '.join(LLAMA_ROWS)} (default all; '' none)")
    ap.add_argument("--sequences", type=int, default=SEQUENCES)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown, plot and README from the JSON")
    args = ap.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    path = args.results / f"{RESULT_NAME}.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if args.render:
        if old is None:
            raise SystemExit(f"bench_pareto: no {path} to render (run without --render first)")
        doc = old
    else:
        if not args.model.is_file():
            raise SystemExit(f"bench_pareto: {args.model} not found")
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        doc = merge(old, run(args))
    write_outputs(doc, args.results, args.readme)
    print(markdown(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
