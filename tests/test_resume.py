"""A training run killed with SIGKILL resumes from its checkpoint, in the same MLflow run, and ends
with exactly the metrics of an uninterrupted run (CPU, fixed seed)."""
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

ARGS = ["teacher", "--dataset", "imdb", "--validation_size", "200", "--max_train_samples", "2000",
        "--max_eval_samples", "200", "--epochs", "2", "--batch_size", "32", "--lr", "2e-3", "--max_length", "64",
        "--seed", "3", "--checkpoint_every", "8", "--alias", ""]


def teacher_cmd(model, output_dir, resume=False):
    return [sys.executable, "-m", "kd_sentiment.cli", *ARGS, "--model", str(model), "--output_dir", str(output_dir),
            "--resume", str(resume).lower()]


def final_metrics(run):
    return {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # Reference: the same training, never interrupted.
    ref = subprocess.run(teacher_cmd(tiny_model, tmp_path / "ref"), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Kill as soon as a mid-epoch checkpoint of the first epoch exists.
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.json"
    proc = subprocess.Popen(teacher_cmd(tiny_model, tmp_path / "run"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if state["epoch"] == 0 and state["batches_done"] > 0:
                proc.send_signal(signal.SIGKILL)
                killed_at = state["global_step"]
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, "training ended before a mid-epoch checkpoint could be killed"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")
    killed_run = [r for r in runs if r.info.status == "RUNNING"]
    assert len(killed_run) == 1  # SIGKILL leaves no chance to end the run: resume must continue it

    # Another learning rate would continue the old optimizer over another run: refused, naming it, nothing touched.
    other = subprocess.run([*teacher_cmd(tiny_model, tmp_path / "run", resume=True), "--lr", "1e-3"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "was made with other settings (lr '0.002' there, '0.001' now)" in other.stderr
    assert mlflow.get_run(killed_run[0].info.run_id).info.status == "RUNNING"

    resumed = subprocess.run(teacher_cmd(tiny_model, tmp_path / "run", resume=True), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr

    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")}
    assert len(runs) == 2  # reference + the resumed one; no third run
    continued = runs[killed_run[0].info.run_id]
    assert continued.info.status == "FINISHED"
    assert int(continued.data.tags["resumed_from_step"]) == killed_at
    reference = [r for r in runs.values() if r.info.run_id != continued.info.run_id][0]
    assert final_metrics(continued) == pytest.approx(final_metrics(reference), abs=1e-6)
