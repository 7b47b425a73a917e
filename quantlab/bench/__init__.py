"""Latency, memory and quality of artifacts and of the baselines, side by side (``quantlab bench``).

    targets.py   what a path is (artifact folder or checkpoint), its size and the bytes a decode step reads
    backends.py  the runtimes, as a table: onnxruntime (CPU, CUDA), torch with our kernels, transformers,
                 llama.cpp; each says which targets it runs and, when it cannot run here, why
    worker.py    one measurement in a fresh process: load, warm up, time prefill and each decode step
    runner.py    the parent: one worker per (target, backend, threads, context), its peak RSS (VmHWM),
                 statistics, roofline, quality against a baseline, machine and library versions
    speculative.py  --draft: plain against speculative decoding of each artifact in one worker, on a chat
                 prompt (acceptance rate, effective TPOT of both and their ratio), rows of their own
    report.py    the text table, the README's markdown table and the plots

Method (also written into every JSON): the prompt is ``prompt_len`` random token ids (seeded) and
``gen`` tokens follow greedily whatever they are (no stop at end-of-sequence). Time to first token
(TTFT) is the prefill of the prompt with the argmax of its last logits; time per output token (TPOT)
is one decode step with its argmax. One warm-up run is excluded; the median and 90th percentile are
over the decode steps of all measured runs.
"""

from quantlab.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
