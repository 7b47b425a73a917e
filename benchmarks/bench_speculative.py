"""Speculative decoding on SmolLM2 with a distilled draft (issue 18), every step through the real CLI.

    python benchmarks/bench_speculative.py                         # all steps, reusing what a run made
    python benchmarks/bench_speculative.py --layers 3 --train-minutes 25 --head-vocab 8192 --draft-tokens 2,3,4

1. the target: SmolLM2-135M-Instruct as `quantlab convert --recipe w4a16-g32-asym --attention fused`;
2. training text the target writes itself: its sampled replies (temperature 0.7, top-p 0.95) to chat
   requests built from task x topic templates (PROMPTS below), in the native runtime, 16 at a time,
   saved as token ids (chat-formatted request + reply) in a .json file;
3. the draft: `quantlab distill --mode shrink --layers L --data that.json --loss ce --head-vocab N`: the
   teacher's layers spread over L, trained on the target's replies by next-token cross-entropy
   (sequence-level distillation: no teacher forward, ~5 s a step of 8 x 320 tokens on 2 Zen 1 cores where
   the KL loss takes ~28 s) with the head on the N tokens most frequent in them, within --train-minutes;
4. the draft artifact: `quantlab convert` with the target's recipe and `--head-vocab N --head-vocab-data
   that.json` (the N tokens most frequent in the training text, passes/prune_head_vocab.py); and the same
   draft with its full head, for the comparison;
5. `quantlab bench TARGET --draft DRAFT --draft-tokens k` on the native runtime (torch-kernels), greedy,
   on the bench's chat prompt ("a robot who learns to paint": no robot and no painting among the training
   requests) and on --eval-prompts of its own;
6. what verification costs: the target's forward over k + 1 new tokens against one (``verify_ms``), and the
   TPOT ratio a draft that is free and always right would give, verify(k + 1) / (k + 1) / verify(1)
   (``ceiling_ratio``): no draft does better on this machine.

Everything goes to --work (default out/speculative/) and is reused by a later run unless --fresh;
the results (rows of each bench, the commands, the machine) go to results/speculative_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = REPO / "benchmarks" / "results"
RECIPE = ["--recipe", "w4a16-g32-asym", "--attention", "fused"]

TASKS = [
    "Write a short story about {}.",
    "Write a poem about {}.",
    "Explain {} to a ten-year-old.",
    "Give me five facts about {}.",
    "Write a friendly email to a colleague about {}.",
    "What are the pros and cons of {}?",
    "Describe {} in two paragraphs.",
    "Write a blog post introduction about {}.",
    "Summarize the history of {}.",
    "Give me tips for learning about {}.",
    "Write a dialogue between two friends about {}.",
    "Why is {} important?",
    "Write a product description for something related to {}.",
    "Tell me a fun story involving {}.",
]
TOPICS = [
    "the ocean", "a lost cat", "volcanoes", "the moon landing", "baking bread", "a small village",
    "winter mornings", "photosynthesis", "the Roman Empire", "a dragon who is afraid of fire", "recycling",
    "learning to swim", "coffee", "a lighthouse keeper", "the water cycle", "friendship", "mountain climbing",
    "honey bees", "an old library", "electric cars", "time management", "the solar system",
    "a rainy day in the city", "gardening", "chess", "a magical forest", "healthy breakfast", "the internet",
    "trains", "a birthday party", "dinosaurs", "music", "a young inventor", "deserts",
    "the first day of school", "penguins", "exercise", "a haunted house", "renewable energy",
    "a long road trip", "kindness", "the human heart", "pirates", "climate", "a snowstorm",
]  # fmt: skip
# Held out: no task x topic pair above (the bench's own default prompt is the first measurement).
EVAL_PROMPTS = [
    "Tell me about the life of a honeybee queen and how a hive chooses a new one.",
    "Write a short story about an astronaut who finds a garden on Mars.",
]

COMMANDS: list[str] = []


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cli(*args) -> None:
    command = ["quantlab", *map(str, args)]
    COMMANDS.append(shlex.join(command))
    log("$ " + COMMANDS[-1])
    subprocess.run([sys.executable, "-m", "quantlab", *map(str, args)], check=True)


def prompts(n: int) -> list[str]:
    import numpy as np

    pairs = [(task, topic) for task in TASKS for topic in TOPICS]
    np.random.default_rng(0).shuffle(pairs)
    # Past the 630 task x topic pairs the requests come round again: each reply is sampled afresh.
    return [task.format(topic) for task, topic in (pairs[i % len(pairs)] for i in range(n))]


def write_training_text(target: Path, out: Path, n: int, new_tokens: int) -> dict:
    """The target's sampled replies to ``n`` chat requests, as token id rows (request + reply), in ``out``."""
    from tqdm import tqdm

    from quantlab.runtime.generate import SamplingConfig, generate_batch
    from quantlab.runtime.tokenizer import load_tokenizer
    from quantlab.runtime.torch_decoder import TorchDecoder

    tok = load_tokenizer(target)
    decoder = TorchDecoder(target)
    requests = prompts(n)
    rows: list[list[int]] = []
    start = time.perf_counter()
    for i in tqdm(range(0, n, 16), desc="replies", unit="batch"):
        chat = [tok.encode_chat(p) for p in requests[i : i + 16]]
        sampling = SamplingConfig(greedy=False, temperature=0.7, top_p=0.95, seed=i)
        replies = generate_batch(
            decoder, chat, max_new_tokens=new_tokens, sampling=sampling, stop_ids=sorted(tok.eos_token_ids)
        )
        rows += [c + r for c, r in zip(chat, replies, strict=True)]
    out.write_text(json.dumps(rows))
    return {
        "requests": n,
        "reply_tokens_max": new_tokens,
        "tokens": sum(map(len, rows)),
        "seconds": round(time.perf_counter() - start, 1),
        "sampling": "temperature 0.7, top-p 0.95, seed = first request's index",
    }


def bench(target: Path, draft: Path, k: int, prompt: str, gen: int, runs: int, out: Path) -> tuple[list[dict], dict]:
    """One `quantlab bench --draft` run: its speculative rows and the machine it ran on."""
    cli(
        "bench", target, "--draft", draft, "--draft-tokens", k, "--draft-prompt", prompt, "--backend",
        "torch-kernels", "--threads", "2", "--gen", gen, "--runs", runs, "--json", out,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    return [r for r in doc["results"] if r.get("mode") == "speculative"], doc["machine"]


def step_times(artifacts: dict[str, Path], reps: int = 5, steps: int = 20) -> dict[str, float]:
    """Median ms of a one-token forward after a 128-token prompt on the native runtime, for each artifact,
    the artifacts interleaved (``reps`` rounds of ``steps`` steps each): what a draft step costs beside the
    target's."""
    import numpy as np

    from quantlab.runtime.torch_decoder import TorchDecoder

    decoders = {name: TorchDecoder(path, threads=2) for name, path in artifacts.items()}
    caches = {name: d.forward(np.arange(100, 228)[None], d.empty_cache())[1] for name, d in decoders.items()}
    medians: dict[str, list[float]] = {name: [] for name in artifacts}
    for _ in range(reps):
        for name, d in decoders.items():
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                _, cache = d.forward(np.full((1, 1), 5), caches[name])
                times.append(time.perf_counter() - start)
                caches[name] = d.trim_cache(cache, 128)  # every step at the same length
            medians[name].append(float(np.median(times)) * 1e3)
    return {name: round(float(np.median(v)), 2) for name, v in medians.items()}


def verify_times(target: Path, widths: list[int], reps: int = 5, steps: int = 20) -> dict[str, float]:
    """Median ms of the target's forward over ``w`` new tokens after a 128-token prompt on the native runtime,
    for each width ``w`` (1: a plain decoding step; k + 1: a speculative round's verification), the widths
    interleaved. Their ratio bounds what any draft can give: with every drafted token accepted and drafting
    free, a round of k drafted tokens costs verify(k + 1) for k + 1 tokens."""
    import numpy as np

    from quantlab.runtime.torch_decoder import TorchDecoder

    decoder = TorchDecoder(target, threads=2)
    cache = decoder.forward(np.arange(100, 228)[None], decoder.empty_cache())[1]
    medians: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(reps):
        for w in widths:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                _, grown = decoder.forward(np.full((1, w), 5), cache)
                times.append(time.perf_counter() - start)
                del grown  # every step from the same 128 positions
            medians[w].append(float(np.median(times)) * 1e3)
    return {str(w): round(float(np.median(v)), 2) for w, v in medians.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "out" / "speculative")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--reply-tokens", type=int, default=256)
    p.add_argument("--train-minutes", type=float, default=25.0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head-vocab", type=int, default=8192)
    p.add_argument("--loss", default="ce", help="distill's --loss (the KL losses: ~4x the time a step here)")
    p.add_argument("--draft-tokens", default="2,3,4")
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--fresh", action="store_true")
    opts = p.parse_args()
    work = opts.work
    work.mkdir(parents=True, exist_ok=True)
    doc: dict = {"benchmark": "speculative", "settings": {k: str(v) for k, v in vars(opts).items()}}

    target = work / "target"
    if opts.fresh or not (target / "manifest.json").is_file():
        cli("convert", SMOLLM2, "-o", target, *RECIPE, "--no-eval", "--no-progress", "--force")
    data = work / "chat.json"
    if opts.fresh or not data.is_file():
        log(f"the target writes {opts.requests} replies -> {data}")
        doc["training_text"] = write_training_text(target, data, opts.requests, opts.reply_tokens)
    else:
        doc["training_text"] = {"reused": str(data), "tokens": sum(map(len, json.loads(data.read_text())))}
    student = work / f"student-{opts.layers}"
    if opts.fresh or not (student / "config.json").is_file():
        cli(
            "distill", SMOLLM2, "-o", student, "--mode", "shrink", "--layers", opts.layers, "--data", data,
            "--samples", opts.requests, "--seq-len", 320, "--steps", opts.steps, "--batch", opts.batch,
            "--lr", opts.lr, "--loss", opts.loss, "--head-vocab", opts.head_vocab, "--time-budget",
            int(opts.train_minutes * 60), "--force", "--no-progress",
        )  # fmt: skip
    doc["distill"] = json.loads((student / "distill.json").read_text())
    doc["distill"].pop("losses", None)
    drafts = {
        "full-head": work / f"draft-{opts.layers}",
        "pruned-head": work / f"draft-{opts.layers}-v{opts.head_vocab}",
    }
    if opts.fresh or not (drafts["full-head"] / "manifest.json").is_file():
        cli("convert", student, "-o", drafts["full-head"], *RECIPE, "--no-eval", "--no-progress", "--force")
    if opts.fresh or not (drafts["pruned-head"] / "manifest.json").is_file():
        cli(
            "convert", student, "-o", drafts["pruned-head"], *RECIPE, "--head-vocab", opts.head_vocab,
            "--head-vocab-data", data, "--no-progress", "--force",
        )  # fmt: skip
    doc["head_vocab"] = json.loads((drafts["pruned-head"] / "manifest.json").read_text())["head_vocab"]

    from quantlab.bench.runner import BenchConfig

    doc["step_ms"] = step_times({"target": target, **drafts})
    log(f"one-token steps (ms): {doc['step_ms']}")
    ks = [int(k) for k in opts.draft_tokens.split(",")]
    doc["verify_ms"] = verify_times(target, [1, *(k + 1 for k in ks)])
    one = doc["verify_ms"]["1"]
    # the best a draft can do: all k accepted, drafting free -> verify(k + 1) / (k + 1) per token
    doc["ceiling_ratio"] = {str(k): round(doc["verify_ms"][str(k + 1)] / (k + 1) / one, 3) for k in ks}
    log(f"target forward over w tokens (ms): {doc['verify_ms']}; free, always-right draft: {doc['ceiling_ratio']}")

    prompts_measured = [BenchConfig.__dataclass_fields__["draft_prompt"].default, *EVAL_PROMPTS]
    doc["rows"] = []
    for k in ks:
        for name, draft in drafts.items():
            for i, prompt in enumerate(prompts_measured):
                if name == "full-head" and (i > 0 or k != ks[len(ks) // 2]):
                    continue  # the full head beside the pruned one once: the middle k, the first prompt
                out = work / f"bench-{name}-k{k}-p{i}.json"
                rows, doc["machine"] = bench(target, draft, k, prompt, opts.gen, opts.runs, out)
                doc["rows"] += [{**r, "draft_head": name, "prompt_text": prompt} for r in rows]
    doc["commands"] = COMMANDS
    out = RESULTS / "speculative_smollm2.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out}")
    for r in doc["rows"]:
        log(
            f"{r['draft_head']:<12} k={r['draft_tokens']} {r['prompt_text'][:40]!r}: acceptance "
            f"{r.get('acceptance_rate')}, ratio {r.get('tpot_ratio')}, same ids {r.get('identical_to_plain')}"
        )


if __name__ == "__main__":
    main()
