"""The benchmark's summary table (the measurements themselves are checked in test_pipeline.py)."""
import subprocess
import sys

import numpy as np
import pandas as pd

from kd_sentiment.benchmark import peak_rss_mb, summary_table


def test_two_versions_of_one_model_get_a_row_each():
    rows = [{"model": "kd-sentiment-minilm-tweeteval-int8", "version": version, "backend": "onnx_int8",
             "setting": "fixed128", "batch_size": batch, "parameters": 22.7e6, "size_mb": 22.0,
             "macro_recall": recall, "accuracy": recall, "ece": 0.05, "model_p50_ms": p50, "speedup_vs_teacher": 75 / p50}
            for version, recall, p50 in (("1", 0.68, 2.0), ("2", 0.69, 3.0)) for batch in (1, 32)]
    table = summary_table(pd.DataFrame(rows), "tweeteval").splitlines()
    assert len(table) == 4
    assert table[2].startswith("| kd-sentiment-minilm-tweeteval-int8 v1 | onnx_int8 |") and "| 0.6800 |" in table[2]
    assert table[3].startswith("| kd-sentiment-minilm-tweeteval-int8 v2 | onnx_int8 |") and "| 3.0 | 25.0x |" in table[3]


def test_peak_memory_of_a_subprocess_is_its_own():
    """A measuring subprocess must not report its parent's peak (getrusage's ru_maxrss would)."""
    ballast = np.ones(400 * 2 ** 20 // 8)  # 400 MB, touched, in this (parent) process
    ballast += 1
    out = subprocess.run([sys.executable, "-c", "from kd_sentiment.benchmark import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True).stdout
    assert 0 < float(out) < 300  # an interpreter with numpy, pandas and MLflow imported, not 400 MB more
    assert peak_rss_mb() > 400
