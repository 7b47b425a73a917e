"""The measuring loop, the statistics and the backend table, without a model."""

from __future__ import annotations

import pytest

from quantlab.bench import backends, runner, worker
from quantlab.bench.targets import describe_target


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


def test_graph_weight_bytes_leave_out_the_embedding(stories_fp32, stories_w8):
    fp32 = describe_target(stories_fp32)
    assert fp32.embedding_bytes == 512 * 64 * 4  # vocab x hidden fp32: decode gathers one row
    assert fp32.cache_dtype == "float32" and fp32.variant == "fp32" and not fp32.quantized
    w8 = describe_target(stories_w8)
    assert w8.quantized and 0 < w8.embedding_bytes < fp32.embedding_bytes  # GatherBlockQuantized table
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
