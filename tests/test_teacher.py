import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import DATA_DIR, run_cli

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
    assert (home / "mlruns").is_dir()  # the embedded store's one artifact root
    experiment = mlflow.get_experiment_by_name("kd-sentiment/imdb")
    assert experiment.artifact_location == str((home / "mlruns" / experiment.experiment_id).resolve())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens it on its runs


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


def test_model_no_better_than_the_majority_class_is_registered_without_alias(tiny_model, tmp_path):
    """Every evaluation reports the majority-class baseline (the most frequent training label); a
    model that does not beat it on validation is logged and registered, but gets no alias."""
    from kd_sentiment.training import teacher

    from conftest import tiny_train_config

    imdb = pd.read_csv(DATA_DIR / "imdb" / "train.csv.gz", keep_default_na=False)
    folder = tmp_path / "skewed"
    folder.mkdir()
    negative, positive = imdb[imdb["label"] == 0], imdb[imdb["label"] == 1]
    pd.concat([negative.iloc[:240], positive.iloc[:160]]).to_csv(folder / "train.csv", index=False)
    negative.iloc[300:360].to_csv(folder / "validation.csv", index=False)  # all of the majority class:
    pd.concat([negative.iloc[400:430], positive.iloc[400:430]]).to_csv(folder / "test.csv", index=False)
    # the majority class scores 1.0 on validation, which no model can beat.
    (folder / "labels.txt").write_text("negative\npositive\n")
    metrics = teacher.run(teacher.TeacherArgs(model=str(tiny_model), dataset=str(folder), name="kd-sentiment-floor",
                                              train=tiny_train_config(epochs=1)))
    assert metrics["val_majority_accuracy"] == 1.0 and metrics["test_majority_accuracy"] == 0.5
    assert metrics["test_majority_macro_recall"] == 0.5
    client = MlflowClient()
    assert client.get_registered_model("kd-sentiment-floor").aliases == {}
    version = client.get_model_version("kd-sentiment-floor", "1")
    assert "not better than the majority class" in version.tags["alias_withheld"]


def test_resuming_a_finished_run_trains_and_registers_nothing(tiny_model, tmp_path):
    """--resume true on a run that finished: one line says so; no new run, no new version."""
    from kd_sentiment.training import teacher
    from kd_sentiment.core.errors import UserError

    from conftest import tiny_train_config

    def args(resume):
        return teacher.TeacherArgs(model=str(tiny_model), dataset="imdb", validation_size=100, max_train_samples=200,
                                   max_eval_samples=100, output_dir=str(tmp_path / "ckpt"), resume=resume,
                                   train=tiny_train_config(epochs=1))

    teacher.run(args(False))
    runs_before = mlflow.search_runs(search_all_experiments=True, output_format="list")
    with pytest.raises(UserError, match=r"already finished and registered kd-sentiment-teacher-imdb version 1; "
                                        "nothing to resume"):
        teacher.run(args(True))
    assert [v.version for v in MlflowClient().search_model_versions(f"name='{NAME}'")] == [1]
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == len(runs_before)
