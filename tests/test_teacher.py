import subprocess
import sys

import mlflow
from mlflow.tracking import MlflowClient

from conftest import run_cli

NAME = "kd-sentiment-teacher-imdb"


def test_teacher_beats_majority_and_logs_everything(teacher_home):
    home, metrics = teacher_home
    assert metrics["test_accuracy"] > 0.6  # balanced test slice: majority class scores 0.5
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    run = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                             filter_string="tags.`kd_sentiment.step` = 'teacher'")[0]
    assert run.info.status == "FINISHED"
    for key in ("test_accuracy", "test_macro_recall", "test_ece", "test_ece_after_ts", "test_nll", "test_brier",
                "val_accuracy", "temperature"):
        assert key in run.data.metrics, key
    assert run.data.params["max_train_samples"] == "1500" and run.data.params["dataset"] == "imdb"
    history = MlflowClient().get_metric_history(run.info.run_id, "history/val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert "figures/reliability_diagram.png" in artifacts
    assert (home / "mlartifacts").is_dir()


def test_registered_teacher_loads_by_alias_in_fresh_process(teacher_home):
    home, _ = teacher_home
    code = ("import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
            f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion');"
            "print(sorted(set(m.predict(['a wonderful, moving film', 'dull and awful'])['label'])))")
    out = subprocess.run([sys.executable, "-c", code], cwd=home, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    labels = eval(out.stdout.strip().splitlines()[-1])
    assert set(labels) <= {"negative", "positive"}


def test_bad_input_fails_run_and_registers_nothing(tiny_model, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,label\ngood,1\nbad,0\n\"\",1\n")
    (tmp_path / "d" / "test.csv").write_text("text,label\ngood,1\n")
    out = run_cli("teacher", "--model", str(tiny_model), "--dataset", str(tmp_path / "d"), cwd=tmp_path)
    assert out.returncode == 2
    assert "train.csv: row 3: text is empty" in out.stderr and "Traceback" not in out.stderr


def test_failure_after_run_start_marks_failed_and_registers_nothing(tiny_model, tmp_path):
    out = run_cli("teacher", "--model", str(tmp_path / "nope"), "--dataset", "imdb", "--max_train_samples", "50",
                  "--max_eval_samples", "20", cwd=tmp_path)
    assert out.returncode == 2 and "not found" not in out.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert MlflowClient().search_registered_models() == []
