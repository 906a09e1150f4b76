"""`kd-sentiment study calibration` on the tiny teacher: every teacher variant distils the same
student once per seed, trained variants are registered apart from the champion, a re-run reuses
everything, and the report's calibration section is built from exactly those runs, over the seeds."""
import logging
import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from kd_sentiment.report import results
from kd_sentiment.core import tracking
from kd_sentiment.cli import main


@pytest.fixture
def study(teacher_home, tiny_model, tmp_path, monkeypatch):
    """Run the study, as the CLI does, in a copy of teacher_home's store (its artifacts stay where they are)."""
    shutil.copy(teacher_home[0] / "mlflow.db", tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    argv = ["study", "calibration", "--dataset", "imdb", "--student", str(tiny_model), "--temperatures", "2",
            "--variants", "raw,calibrated,label-smoothed", "--seeds", "7,8", "--label_smoothing", "0.2", "--epochs", "1",
            "--lr", "2e-3", "--batch_size", "32", "--max_length", "64", "--max_train_samples", "300",
            "--max_eval_samples", "100"]
    return lambda: main(argv)


def test_study_runs_each_variant_once_and_reports_them(study, tmp_path, caplog):
    logger = logging.getLogger("kd_sentiment")  # the CLI's logger does not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        study()
    finally:
        logger.removeHandler(caplog.handler)
    # its 300 training texts are not the teacher's 1500: the trained variants would see other texts
    assert any(r.levelname == "WARNING" and "--max_train_samples 300, the registered teacher had 1500" in r.getMessage()
               for r in caplog.records)
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`kd_sentiment.study` = 'calibration'")
    by_step = {}
    for r in runs:
        by_step.setdefault(r.data.tags["kd_sentiment.step"], []).append(r)
    seeds = {(r.data.tags["teacher_variant"], r.data.params["seed"]) for r in by_step["distill"]}
    assert len(by_step["distill"]) == 6 and seeds == {(v, s) for v in ("raw", "calibrated", "label-smoothed")
                                                       for s in ("7", "8")}
    distills = {r.data.tags["teacher_variant"]: r for r in by_step["distill"] if r.data.params["seed"] == "7"}
    seed_8 = {r.data.tags["teacher_variant"]: r for r in by_step["distill"] if r.data.params["seed"] == "8"}
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
    assert parents[0].data.tags["reused_steps"].split(",") == ["teacher-label-smoothed"] + [
        f"distill-{v}-T2-s{s}" for s in (7, 8) for v in ("raw", "calibrated", "label-smoothed")]

    section = results.calibration_section(tmp_path / "results")
    assert (tmp_path / "results" / "calibration_study.png").stat().st_size > 0
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| teacher variant")]
    assert len(table) == 3
    row = next(line for line in table if line.startswith("| calibrated "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{calibrated.metrics['teacher_scaled_test_ece']:.3f}"
    assert cells[4] == f"{2 * t_cal:.2f}"  # the teacher-side temperature T_kd * T_cal
    assert cells[5] == "2"  # seeds
    mean = (calibrated.metrics["test_macro_recall"] + seed_8["calibrated"].data.metrics["test_macro_recall"]) / 2
    assert cells[7] == f"{100 * mean:.1f}"
    # (the means over seeds and the interval against the raw teacher: the next test, with known predictions)


def test_study_refuses_a_trained_longer_teacher_no_longer_than_the_registered_one(teacher_home, tmp_path, capsys):
    """A trained-longer variant at the registered teacher's own epochs would retrain the same recipe:
    refused by name before any run is opened."""
    shutil.copy(teacher_home[0] / "mlflow.db", tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    champion = MlflowClient().get_model_version_by_alias("kd-sentiment-teacher-imdb", "champion")
    epochs = mlflow.get_run(champion.run_id).data.params["epochs"]
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "calibration", "--dataset", "imdb", "--variants", "raw,trained-longer", "--longer_epochs", epochs])
    assert exit_info.value.code == 2
    assert f"longer_epochs={epochs}: the registered teacher already trained {epochs} epochs" in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`kd_sentiment.study` = 'calibration'") == []


def test_report_compares_each_variant_with_the_raw_teacher_over_both_sides_seeds(tmp_path):
    """The section's student columns are means over a variant's seeds, and its interval against the raw
    teacher resamples both sides' seeds; a later study of the same setting adds its runs to the section,
    one of another setting replaces it. Runs with known predictions, so every number is known."""
    import numpy as np

    from kd_sentiment.core.stats import paired_difference

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    labels = np.arange(200) % 2
    predicted = {}

    def log_study(share_right: dict, student: str = "tinybert") -> None:
        with mlflow.start_run(tags={tracking.STEP_TAG: "study", tracking.STUDY_TAG: "calibration"}):
            mlflow.log_params({"dataset": "tweeteval", "student": student})
            steps = {}
            for (variant, seed), share in share_right.items():
                predicted[variant, seed] = np.where(np.arange(200) < share * 200, labels, 1 - labels)
                tags = {tracking.STEP_TAG: "distill", tracking.STUDY_TAG: "calibration", tracking.VARIANT_TAG: variant}
                with mlflow.start_run(nested=True, tags=tags) as child:
                    mlflow.log_params({"temperature": 2.0, "teacher_logit_scale": 1.0, "n_test": 200, "seed": seed,
                                       "num_labels": 2, "student": student, "dataset": "tweeteval",
                                       "test_fingerprint": "same-texts", "n_train": 300, "epochs": 1})
                    mlflow.log_metrics({"teacher_test_macro_recall": 0.9, "teacher_scaled_test_ece": 0.05,
                                        "test_accuracy": share, "test_macro_recall": share, "test_ece": 0.1 * seed})
                    tracking.log_array(np.eye(2)[predicted[variant, seed]], "predictions/test_logits.npy")
                    tracking.log_array(labels, "predictions/test_labels.npy")
                    steps[f"distill-{variant}-T2-s{seed}"] = child.info.run_id
            mlflow.log_dict(steps, "study_steps.json")

    def table(section: str) -> dict[str, list[str]]:
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| teacher variant")]
        return {cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}

    # seed 1 alone would differ by 20 points, the means over both seeds by 22.5
    log_study({("raw", 1): 0.6, ("raw", 2): 0.7, ("calibrated", 1): 0.8, ("calibrated", 2): 0.95})
    section = results.calibration_section(tmp_path / "results")
    cells = table(section)["calibrated"]
    assert cells[5:8] == ["2", "87.5", "87.5"] and cells[9] == "0.150"  # seeds; means over them
    assert cells[8].startswith("+22.5 [")
    expected = paired_difference([predicted["calibrated", 1], predicted["calibrated", 2]],
                                 [predicted["raw", 1], predicted["raw", 2]], labels, "macro_recall", 2)
    assert cells[8] == expected.points()  # the interval resamples both sides' seeds too
    assert "training seeds 1, 2" in section
    assert "Held fixed across these runs (from their params): n_train=300, n_test=200, epochs=1." in section

    log_study({("sharpened", 1): 0.5})  # the same study, one more variant
    assert set(table(results.calibration_section(tmp_path / "results"))) == {"raw", "calibrated", "sharpened"}
    log_study({("raw", 1): 0.6}, student="minilm")  # another study
    assert set(table(results.calibration_section(tmp_path / "results"))) == {"raw"}
