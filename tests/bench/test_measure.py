"""The measuring loop, the statistics and the backend table, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.bench import backends, runner, worker
from quantlab.bench.targets import describe_target, graph_weight_bytes


class CountingSession:
    """Greedy 'model' that returns token + 1 and records what was called."""

    vocab_size = 100

    def __init__(self):
        self.calls: list[str] = []
        self.length = 0
        self.marked = 0

    def prefill(self, ids, chunk):
        self.calls.append("prefill")
        self.length = len(ids)
        return ids[-1] + 1

    def decode(self, token):
        self.calls.append("decode")
        self.length += 1
        return token + 1

    def mark(self):
        self.marked = self.length

    def rewind(self):
        self.calls.append("rewind")
        self.length = self.marked

    def info(self):
        return {}


def test_measure_drops_the_warm_up_and_times_every_step():
    session = CountingSession()
    result = worker.measure(session, [5, 6, 7], gen=4, runs=3, warmup=1, chunk=512, reuse_prefill=False)
    assert session.calls.count("prefill") == 4 and session.calls.count("decode") == 4 * 3
    assert len(result["ttft_s"]) == 3 and [len(s) for s in result["steps_s"]] == [3, 3, 3]
    assert result["generated_ids"] == [8, 9, 10, 11]  # the first comes from the prefill


def test_measure_with_one_prefill_rewinds_before_each_run():
    session = CountingSession()
    result = worker.measure(session, list(range(50)), gen=3, runs=2, warmup=1, chunk=16, reuse_prefill=True)
    assert session.calls.count("prefill") == 1 and session.calls.count("rewind") == 3
    assert len(result["ttft_s"]) == 1 and len(result["steps_s"]) == 2
    assert session.length == 50 + 2  # each run started again at the prompt's length


def test_summarize_and_noise():
    s = runner.summarize([0.001] * 9 + [0.002])
    assert s == {"median": pytest.approx(1.0), "p90": pytest.approx(1.1), "n": 10}
    quiet = runner.noise([[0.010] * 10, [0.0101] * 10])
    assert not quiet["noisy"] and quiet["step_spread"] < 0.02
    disturbed = runner.noise([[0.010] * 5 + [0.030] * 5, [0.010] * 10])  # median 10 ms, p90 30 ms
    assert disturbed["noisy"]
    assert disturbed["step_spread"] == pytest.approx(2.0) and disturbed["run_spread"] == pytest.approx(1.0)


def test_a_backend_is_a_row_in_the_table(monkeypatch, stories_fp32):
    """An unavailable backend gets a row that says why; the others stay as they are."""
    fake = backends.Backend("fake", "a runtime that is not here", lambda t: True, lambda: "not built here", None)
    monkeypatch.setitem(backends.BACKENDS, "fake", fake)
    doc = runner.run_bench([str(stories_fp32)], runner.BenchConfig(backends=("fake",), roofline_mib=8))
    assert [(r["backend"], r["status"], r["reason"]) for r in doc["results"]] == [
        ("fake", "unavailable", "not built here")
    ]


def test_llama_cpp_says_why_when_absent():
    reason = backends.BACKENDS["llama.cpp"].why_unavailable()
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError:
        assert reason == backends.LLAMA_CPP_MISSING and "wheel" in reason
    else:
        assert reason is None


def test_graph_weight_bytes_leave_out_a_table_only_gathered(tmp_path):
    from quantlab.emit.artifact import save_model
    from quantlab.graph_builder.decoder import build_decoder
    from quantlab.passes.dead_nodes import RemoveDeadNodesPass
    from tests.tiny import tiny_checkpoint

    ckpt = tiny_checkpoint(1, tie=False)  # an untied head: the table is only gathered
    save_model(RemoveDeadNodesPass()(build_decoder(ckpt)).model, tmp_path, progress=False)
    streamed, gathered, cache = graph_weight_bytes(tmp_path / "model.onnx")
    assert gathered == 96 * 64 * 4 and cache == "float32"  # vocab x hidden fp32: decode gathers one row
    weights = sum(int(np.prod(s)) * 4 for s in ckpt.spec.expected_shapes().values())
    assert 0 <= streamed - (weights - gathered) < 4096  # and the graph's small constants (shapes, RoPE)


def test_a_tied_table_counts_as_streamed(stories_fp32, stories_w8):
    """stories260K ties its head to the embedding: the one shared table is read by the head every step."""
    fp32 = describe_target(stories_fp32)
    assert fp32.embedding_bytes == 0 and fp32.weight_bytes_per_step > 512 * 64 * 4
    assert fp32.cache_dtype == "float32" and fp32.variant == "fp32" and not fp32.quantized
    w8 = describe_target(stories_w8)
    assert w8.quantized and w8.embedding_bytes == 0
    assert w8.weight_bytes_per_step < fp32.weight_bytes_per_step / 2


def test_cpu_witness_sees_another_process_and_not_its_own_workers():
    import subprocess
    import sys
    import time

    spin = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < {}: pass"
    witness = runner.CpuWitness()
    subprocess.run([sys.executable, "-c", spin.format(1.0)], check=True)  # waited for: our own worker
    own = witness.others_share()
    witness = runner.CpuWitness()
    other = subprocess.Popen([sys.executable, "-c", spin.format(1.5)])
    time.sleep(1.4)
    foreign = witness.others_share()  # measured before the wait: someone else's CPU time
    other.wait()
    cores = runner.os.cpu_count()
    assert foreign > own
    assert foreign > 0.5 / cores  # one busy process for most of the window
    assert runner.noise_warnings({"others_cpu_share": foreign, "cores": cores}, [])


class CountingBatchSession(CountingSession):
    """CountingSession's rule (next = token + 1) for every sequence of a batch."""

    def prefill_batch(self, prompts, chunk):
        self.calls.append("prefill")
        self.length = len(prompts[0])
        return [p[-1] + 1 for p in prompts]

    def decode_batch(self, tokens):
        self.calls.append("decode")
        self.length += 1
        return [t + 1 for t in tokens]


def test_measure_a_batch_steps_every_sequence_and_reports_the_first():
    session = CountingBatchSession()
    prompts = [[5, 6, 7], [20, 21, 22], [40, 41, 42]]
    result = worker.measure(session, prompts, gen=4, runs=2, warmup=1, chunk=512, reuse_prefill=True)
    assert session.calls.count("prefill") == 1 and session.calls.count("decode") == 3 * 3
    assert result["generated_ids"] == [8, 9, 10, 11] and [len(s) for s in result["steps_s"]] == [3, 3]


def test_a_backend_that_does_not_batch_gets_an_unavailable_row(monkeypatch, stories_fp32):
    fake = backends.Backend("one-at-a-time", "no batches", lambda t: True, lambda: None, None)
    monkeypatch.setitem(backends.BACKENDS, "one-at-a-time", fake)
    config = runner.BenchConfig(backends=("one-at-a-time",), batches=(4,), roofline_mib=8)
    row = runner.measured_row(describe_target(stories_fp32), "one-at-a-time", 1, None, config, {}, batch=4)
    assert row["status"] == "unavailable" and row["batch"] == 4 and "one sequence at a time" in row["reason"]


def test_batch_sizes_are_checked():
    with pytest.raises(runner.InputError, match="--batch"):
        runner.BenchConfig(batches=(1, 0)).check()


def test_worker_job_with_a_batch(monkeypatch, tmp_path):
    """run_job draws one prompt per sequence, none with the special ids 0-2, the first the same as batch 1's."""
    fake = backends.Backend("counting", "", lambda t: True, lambda: None, lambda path, **kw: CountingBatchSession())
    monkeypatch.setitem(backends.BACKENDS, "counting", fake)
    job = {"path": str(tmp_path), "backend": "counting", "threads": 1, "prompt_len": 40, "gen": 3, "runs": 1,
           "warmup": 0, "seed": 0, "prefill_chunk": 512, "reuse_prefill": False, "pin": None}  # fmt: skip
    alone = worker.run_job(job)
    batched = worker.run_job({**job, "batch": 3})
    assert batched["prompt_ids_head"] == alone["prompt_ids_head"]
    assert min(alone["prompt_ids_head"]) >= worker.FIRST_PROMPT_ID == 3
    assert batched["generated_ids"] == alone["generated_ids"] and len(batched["steps_s"][0]) == 2
