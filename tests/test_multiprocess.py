"""Two CPU processes (torchrun, gloo): one MLflow run, one registration, every test example
evaluated exactly once, identical weights on both ranks (checked inside the training loop)."""
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from kd_sentiment.core.data import load_splits
from kd_sentiment.training.loop import predict_logits

# 1,500 reviews, 2 epochs: what the tiny random encoder needs to beat the majority class (else no alias).
COMMON = ["--dataset", "imdb", "--validation_size", "101", "--max_train_samples", "1500", "--max_eval_samples", "101",
          "--epochs", "2", "--max_length", "64", "--lr", "2e-3", "--checkpoint_every", "0", "--cpu", "true"]


def torchrun(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kd_sentiment.cli", *args]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_two_process_teacher_and_distill(tiny_model, tmp_path):
    torchrun("teacher", "--model", str(tiny_model), *COMMON, cwd=tmp_path)
    torchrun("distill", "--student", "teacher-layers:0", *COMMON, cwd=tmp_path)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                              filter_string="tags.`kd_sentiment.step` != 'soft-targets'")
    assert sorted(r.data.tags["kd_sentiment.step"] for r in runs) == ["distill", "teacher"]
    assert all(r.data.params["num_processes"] == "2" and r.info.status == "FINISHED" for r in runs)
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name='kd-sentiment-teacher-imdb'")] == ["1"]
    assert [str(v.version) for v in client.search_model_versions("name='kd-sentiment-cut-l0-imdb'")] == ["1"]

    # The logged test accuracy is over all 101 examples (odd: one rank gets more), recomputed here
    # in one process from the registered model.
    teacher_run = [r for r in runs if r.data.tags["kd_sentiment.step"] == "teacher"][0]
    splits = load_splits("imdb", validation_size=101, max_train_samples=1500, max_eval_samples=101, seed=42)
    components = mlflow.transformers.load_model("models:/kd-sentiment-teacher-imdb@champion", return_type="components")
    logits = predict_logits(components["model"], components["tokenizer"], splits.test["text"], 64)
    accuracy = float((logits.argmax(1) == splits.test["label"].to_numpy()).mean())
    assert teacher_run.data.params["n_test"] == "101"
    assert teacher_run.data.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
