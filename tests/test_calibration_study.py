"""`kd-sentiment study calibration` on the tiny teacher: every teacher variant distils the same
student, trained variants are registered apart from the champion, a re-run reuses everything, and
the report's calibration section is built from exactly those runs."""
import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from kd_sentiment import report
from kd_sentiment.cli import main


@pytest.fixture
def study(teacher_home, tiny_model, tmp_path, monkeypatch):
    """Run the study, as the CLI does, in a copy of teacher_home's store (its artifacts stay where they are)."""
    shutil.copy(teacher_home[0] / "mlflow.db", tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    argv = ["study", "calibration", "--dataset", "imdb", "--student", str(tiny_model), "--temperatures", "2",
            "--variants", "raw,calibrated,label-smoothed", "--label_smoothing", "0.2", "--epochs", "1",
            "--lr", "2e-3", "--batch_size", "32", "--max_length", "64", "--max_train_samples", "300",
            "--max_eval_samples", "100"]
    return lambda: main(argv)


def test_study_runs_each_variant_once_and_reports_them(study, tmp_path):
    study()
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`kd_sentiment.study` = 'calibration'")
    by_step = {}
    for r in runs:
        by_step.setdefault(r.data.tags["kd_sentiment.step"], []).append(r)
    distills = {r.data.tags["teacher_variant"]: r for r in by_step["distill"]}
    assert set(distills) == {"raw", "calibrated", "label-smoothed"}
    assert all(r.info.status == "FINISHED" for r in runs)

    # The label-smoothed teacher copies the champion's recipe, with smoothing, under its own name.
    (smoothed,) = by_step["teacher"]
    champion = client.get_model_version_by_alias("kd-sentiment-teacher-imdb", "champion")
    recipe = mlflow.get_run(champion.run_id).data.params
    assert smoothed.data.params["label_smoothing"] == "0.2"
    assert all(smoothed.data.params[k] == recipe[k] for k in ("model", "epochs", "lr", "batch_size", "seed"))
    assert smoothed.data.tags["registered_model"] == "kd-sentiment-calibration-teacher-imdb"
    assert client.get_registered_model("kd-sentiment-calibration-teacher-imdb").aliases == {}
    assert distills["label-smoothed"].data.tags["teacher"] == "kd-sentiment-calibration-teacher-imdb/1"
    assert client.get_model_version_by_alias("kd-sentiment-teacher-imdb", "champion").version == champion.version

    # raw and calibrated share the teacher; only the logit scale (1/T_cal) differs.
    t_cal = mlflow.get_run(champion.run_id).data.metrics["temperature"]
    raw, calibrated = distills["raw"].data, distills["calibrated"].data
    assert float(calibrated.params["teacher_logit_scale"]) == pytest.approx(1 / t_cal)
    assert raw.metrics["teacher_test_ece"] == calibrated.metrics["teacher_test_ece"] == raw.metrics["teacher_scaled_test_ece"]

    study()  # a second run trains nothing
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
                                 filter_string="tags.`kd_sentiment.step` = 'study'")
    assert parents[0].data.tags["reused_steps"].split(",") == [
        "teacher-label-smoothed", "distill-raw-T2", "distill-calibrated-T2", "distill-label-smoothed-T2"]

    section = report.calibration_section(tmp_path / "results")
    assert (tmp_path / "results" / "calibration_study.png").stat().st_size > 0
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| teacher variant")]
    assert len(table) == 3
    row = next(line for line in table if line.startswith("| calibrated "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{calibrated.metrics['teacher_scaled_test_ece']:.3f}"
    assert cells[4] == f"{2 * t_cal:.2f}"  # the teacher-side temperature T_kd * T_cal
    assert cells[6] == f"{100 * calibrated.metrics['test_macro_recall']:.1f}"
