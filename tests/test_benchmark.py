"""The benchmark's summary table (the measurements themselves are checked in test_pipeline.py)."""
import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kd_sentiment.measure import benchmark
from kd_sentiment.measure.benchmark import summary_table
from kd_sentiment.core.parameters import BenchmarkArgs
from kd_sentiment.core.machine import peak_rss_mb


def test_two_versions_of_one_model_get_a_row_each():
    nan = float("nan")
    rows = [{"model": "kd-sentiment-minilm-tweeteval-int8", "version": version, "backend": "onnx_int8",
             "setting": "fixed128", "batch_size": batch, "parameters": 22.7e6, "size_mb": 22.0,
             "macro_recall": recall, "accuracy": recall, "ece": 0.05, "model_p50_ms": p50, "model_p99_ms": nan,
             "samples": 60, "speedup_vs_teacher": 75 / p50, "speedup_vs_teacher_low": 70 / p50,
             "speedup_vs_teacher_high": 80 / p50, "speedup_vs_peer": 1.4, "speedup_vs_peer_low": nan,
             "speedup_vs_peer_high": nan, "runtime_rss_mb": 60.0, "model_rss_mb": 40.0}
            for version, recall, p50 in (("1", 0.68, 2.0), ("2", 0.69, 3.0)) for batch in (1, 32)]
    table = summary_table(pd.DataFrame(rows), "tweeteval").splitlines()
    assert len(table) == 4
    assert table[2].startswith("| kd-sentiment-minilm-tweeteval-int8 v1 | onnx_int8 |") and "| 0.6800 |" in table[2]
    # p50, p99 withheld (too few samples), the sample count, the speedup with its interval, vs the peer without one
    assert table[3].startswith("| kd-sentiment-minilm-tweeteval-int8 v2 | onnx_int8 |")
    assert "| 3.0 | n/a | 60 | 25.0x [23.3, 26.7] | 25.0x [23.3, 26.7] | 1.4x | 60 | 40 |" in table[3]


def test_peak_memory_of_a_subprocess_is_its_own():
    """A measuring subprocess must not report its parent's peak (getrusage's ru_maxrss would)."""
    ballast = np.ones(400 * 2 ** 20 // 8)  # 400 MB, touched, in this (parent) process
    ballast += 1
    out = subprocess.run([sys.executable, "-c", "from kd_sentiment.core.machine import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True).stdout
    assert 0 < float(out) < 300  # an interpreter with numpy, pandas and MLflow imported, not 400 MB more
    assert peak_rss_mb() > 400


def test_the_memory_probe_sees_a_planted_allocation():
    code = ("import numpy as np; from kd_sentiment.core.machine import rss_mb, peak_rss_mb; before = rss_mb(); "
            "ballast = np.ones(300 * 2 ** 20 // 8); after = rss_mb(); del ballast; print(before, after, peak_rss_mb())")
    before, after, peak = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout.split())
    assert 290 < after - before < 320 and peak > after - 2  # the kernel updates the peak in batches


def worker_hello(backend: str) -> dict:
    process = subprocess.Popen([sys.executable, "-m", "kd_sentiment.measure.bench_worker", backend, "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(process.stdout.readline())
    process.communicate('{"cmd": "exit"}\n', timeout=60)
    assert process.returncode == 0
    return hello


def test_an_onnx_worker_never_imports_torch():
    """ONNX rows measure ONNX Runtime and `tokenizers` alone, as served; a PyTorch row's runtime is torch."""
    onnx, torch = worker_hello("onnx_int8"), worker_hello("torch_fp32")
    assert onnx["imports_torch"] is False and torch["imports_torch"] is True
    assert 0 < onnx["runtime_rss_mb"] < torch["runtime_rss_mb"]


@pytest.mark.parametrize("rounds, warned", [(5, True), (6, False)])
def test_too_few_rounds_for_a_speedup_interval_are_warned_before_measuring(rounds, warned, monkeypatch, caplog):
    """Five rounds bound the median speedup with 93.75% only: the intervals come out empty, and the
    user learns it before the measurement, not from an n/a in the report."""
    def stop(*args, **kwargs):
        raise RuntimeError("stopped before loading data")

    monkeypatch.setattr(benchmark, "load_splits", stop)
    logger = logging.getLogger("kd_sentiment")  # the CLI's logger does not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        with pytest.raises(RuntimeError, match="stopped before"):
            benchmark.run(BenchmarkArgs(rounds=rounds))
    finally:
        logger.removeHandler(caplog.handler)
    assert any(r.levelname == "WARNING" and f"rounds={rounds}: too few" in r.getMessage()
               for r in caplog.records) == warned


def test_speedups_point_the_right_way_round():
    """Rows from planted timings: a model that takes a fifth of the teacher's time is 5x faster (not
    0.2x), the served INT8 model against its own peer baseline; the peer's accuracy is subtracted."""
    from kd_sentiment.measure.benchmark import PEER, Target, rows_of

    targets = [Target("kd-sentiment-teacher-imdb", "1", "teacher", "torch_fp32", "u", 64),
               Target("kd-sentiment-tiny-imdb", "1", "distill", "torch_fp32", "u", 64),
               Target("kd-sentiment-tiny-imdb-int8", "1", "quantize", "onnx_int8", "u", 64),
               Target("kd-sentiment-tiny-imdb-int8", "1", "peer", PEER, "u", 64)]
    ms = {"teacher": 100.0, "distill": 20.0, "quantize": 5.0, "peer": 10.0}
    labels = np.array([0, 1, 1, 0])
    right, wrong = np.array([[2.0, 0], [0, 2], [0, 2], [2, 0]]), np.array([[2.0, 0], [0, 2], [2, 0], [0, 2]])
    measured = {"times": {t.label: {("fixed64", 1): {r: {"model_ms": [ms[t.role]] * 3, "tokenize_ms": [0.1] * 3}
                                                      for r in range(6)}} for t in targets},
                "facts": {t.label: {"logits": wrong if t.role == "peer" else right, "size_mb": 1.0, "parameters": 1,
                                    "runtime_rss_mb": 10.0, "peak_rss_mb": 20.0, "imports_torch": False,
                                    "peak_gpu_mb": None} for t in targets}}
    frame, _ = rows_of(targets, measured, [("fixed64", 1, 64)], labels, ["negative", "positive"], 1)
    speed = frame.set_index("role")
    assert speed.loc["teacher", "speedup_vs_teacher"] == pytest.approx(1.0)
    assert speed.loc["distill", "speedup_vs_teacher"] == pytest.approx(5.0)
    assert speed.loc["quantize", "speedup_vs_teacher"] == pytest.approx(20.0)
    assert speed.loc["quantize", "speedup_vs_peer"] == pytest.approx(2.0)
    assert speed.loc["quantize", "accuracy_vs_peer_points"] == pytest.approx(50.0)  # 100% against the peer's 50%
    assert np.isnan(speed.loc["distill", "speedup_vs_peer"])
