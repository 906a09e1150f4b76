"""Report sections read from runs alone: here from hand-made MLflow runs, not a pipeline."""
import mlflow
import pytest

from kd_sentiment.report import results
from kd_sentiment.core import tracking


def load_test(version: str, p99: float, student: str = "tinybert", wrong: int | None = 0) -> None:
    """A finished open-loop load test of version `version` of a student's INT8 model; `wrong` None:
    one from before answers were checked."""
    mlflow.set_experiment("kd-sentiment/tweeteval")  # in the test's own store (conftest's _fresh_mlflow)
    with mlflow.start_run(tags={tracking.STEP_TAG: "loadtest"}):
        mlflow.log_params({"model": f"models:/kd-sentiment-{student}-tweeteval-int8@candidate", "model_version": version,
                           "mode": "open", "rate": 100.0, "requests": 1500, "workers": 2})
        mlflow.log_metrics({"ok": 1350, "errors": 0, "timeouts": 0, "unsent": 0, "malformed_rejected_4xx": 150,
                            "malformed_sent": 150, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": p99,
                            "latency_samples": 1350, "throughput_per_s": 89.0,
                            **({"wrong": wrong, "checked": 1} if wrong is not None else {})})


def numbers(version: str, drift) -> dict:
    """A report's numbers for tweeteval with tinybert's INT8 version `version` and minilm's version 1 deployed."""
    return {"tweeteval": {"config_drift": drift, "students": {student: {
        "int8": {"int8_agreement_with_fp32": 0.997}, "int8_name": f"kd-sentiment-{student}-tweeteval-int8",
        "int8_version": v} for student, v in (("tinybert", version), ("minilm", "1"))}}}


def test_serving_shows_the_deployed_version_only():
    def load_tests(version: str) -> dict:
        return results.deployed_load_tests(numbers(version, []))

    load_test("1", p99=176.5)  # an earlier pipeline's deployed version
    load_test("2", p99=82.9, wrong=3)
    text = results.serving_section(load_tests("2"))
    rows = [line for line in text.splitlines() if line.startswith("| models:/")]
    assert len(rows) == 1 and "| 2 | 2 | open loop, 100 req/s x 1500 | 1350 | 3 | 0 |" in rows[0]
    assert "82.9 (1350)" in rows[0]
    load_test("2", p99=82.9, wrong=None)  # the latest test of that version, from before answers were checked
    assert "| 1350 | not checked | 0 |" in results.serving_section(load_tests("2"))
    assert results.serving_section(load_tests("3")) == ""  # no load test of the deployed version: no section
    # The serving target reads the same tests: tinybert's deployed version's, not the earlier one's nor
    # minilm's (tested last).
    load_test("1", p99=50.0, student="minilm")
    assert results.served_latency(load_tests("2"), "kd-sentiment-tinybert-tweeteval-int8") == (82.9, 1350)
    assert results.served_latency(load_tests("3"), "kd-sentiment-tinybert-tweeteval-int8") == (None, None)


def knee_search(version: str, knee: float) -> None:
    """A finished `loadtest --find_knee` of tinybert's INT8 version `version` with 2 workers."""
    mlflow.set_experiment("kd-sentiment/tweeteval")
    with mlflow.start_run(tags={tracking.STEP_TAG: "loadtest"}):
        mlflow.log_params({"model": "models:/kd-sentiment-tinybert-tweeteval-int8@champion", "model_version": version,
                           "mode": "knee", "knee_p99_ms": 30.0, "workers": 2, "rate": 0.0})
        mlflow.log_metrics({"knee_rate_per_s": knee, "knee_p99_ms": 21.5, "knee_server_cpu_ms_per_request": 3.1,
                            "knee_trials": 7, "model_cpu_ms_per_call": 2.0})


def test_knee_searches_and_cpu_per_request_reach_the_serving_tables_and_the_targets():
    load_test("2", p99=25.0)
    with mlflow.start_run(run_id=mlflow.search_runs(output_format="list")[0].info.run_id):
        mlflow.log_metrics({"server_cpu_ms_per_request": 3.3, "client_cpu_ms_per_request": 0.8,
                            "model_cpu_ms_per_call": 2.0})
    knee_search("2", knee=250)
    tests = results.deployed_load_tests(numbers("2", []))
    text = results.serving_section(tests)
    assert "| 89.0 | 3.30 / 0.80 / 2.00 |" in text  # the open-loop row, with its CPU per request
    knee = [line for line in text.splitlines() if "knee search" in line]
    assert knee == ["| models:/kd-sentiment-tinybert-tweeteval-int8@champion | 2 | 2 | knee search, p99 <= 30 ms | "
                    "250 | 21.5 | 3.10 | 7 |"]
    rows = results.served_rows("tweeteval", "kd-sentiment-tinybert-tweeteval-int8", tests)
    assert rows[0].endswith("| 25.0 ms over 1350 requests | **met** |")
    assert rows[1].endswith("| 1.65x (3.30 / 2.00 ms) | **not met** |")
    assert results.knee_row("tweeteval", "kd-sentiment-tinybert-tweeteval-int8", tests).endswith(
        "| 250 requests/s | **not met** |")
    assert results.knee_row("imdb", "kd-sentiment-tinybert-imdb-int8", tests).endswith("| not measured | not measured |")


def spark_score(version: str, ratio: float) -> None:
    """A finished `score --compare_in_process` run of tinybert's INT8 version `version`."""
    mlflow.set_experiment("kd-sentiment/tweeteval")
    with mlflow.start_run(tags={tracking.STEP_TAG: "score"}):
        mlflow.log_params({"model_name": "kd-sentiment-tinybert-tweeteval-int8", "model_version": version,
                           "input": "/data/tweets-100k.parquet", "spark_master_url": "local[2]"})
        mlflow.log_metrics({"rows": 100000, "texts_per_s": 700 * ratio, "in_process_texts_per_s_before": 690,
                            "in_process_texts_per_s_after": 710, "spark_to_in_process": ratio,
                            "spark_to_in_process_low": ratio * 700 / 710, "spark_to_in_process_high": ratio * 700 / 690})


def test_spark_scoring_shows_the_deployed_versions_latest_run_with_its_verdict():
    spark_score("2", ratio=0.5)
    spark_score("2", ratio=0.8)  # the latest of the deployed version
    spark_score("1", ratio=0.9)  # another version: not the deployed model's
    text = results.spark_section(results.spark_scoring(numbers("2", [])))
    rows = [line for line in text.splitlines() if line.startswith("| kd-sentiment-")]
    assert rows == ["| kd-sentiment-tinybert-tweeteval-int8 | 2 | tweets-100k.parquet | 100000 | local[2] | 560.0 | "
                    "690.0 / 710.0 | 0.80x [0.79, 0.81] | **met** |"]
    spark_score("2", ratio=0.6)
    assert "0.60x [0.59, 0.61] | **not met** |" in results.spark_section(results.spark_scoring(numbers("2", [])))
    assert results.spark_section(results.spark_scoring(numbers("3", []))) == ""


@pytest.mark.parametrize("drift, note", [
    ([], None),
    (["teacher.epochs: ran 1, now 2"], "**tweeteval's rows come from a pipeline that ran another version of its "
                                        "configuration file**"),
    (None, "**tweeteval's pipeline configuration could not be compared with its file here.**")])
def test_targets_and_claims_say_when_a_section_is_not_what_its_config_gives(drift, note):
    notes = "\n".join(results.drift_notes(numbers("2", drift)))
    assert (note in notes) if note else notes == ""


def test_the_seeds_column_counts_the_runs_no_better_than_the_majority_class():
    """A seed that predicts one class is named beside the count, not hidden in the mean."""
    def training_run(val: float) -> str:
        with mlflow.start_run() as run:
            mlflow.log_param("selection_metric", "accuracy")
            mlflow.log_metrics({"val_accuracy": val, "val_majority_accuracy": 0.5})
        return run.info.run_id

    learnt, collapsed = training_run(0.78), training_run(0.5)
    assert results.seeds_cell([learnt, training_run(0.71)]) == "2"
    assert results.seeds_cell([learnt, collapsed, training_run(0.5)]) == "3 (2 no better than the majority class)"


def test_unknown_encoder_layers_are_an_error_not_the_lenient_target():
    """The retention target depends on the layers: a run that records none, whose model cannot be read,
    stops the report with one line instead of falling to the 3-layer target."""
    from kd_sentiment.core.errors import UserError

    with mlflow.start_run(tags={"registered_model": "kd-sentiment-gone-imdb", "registered_version": "1"}) as run:
        pass
    with pytest.raises(UserError, match="its encoder layers are unknown"):
        results.encoder_layers(mlflow.get_run(run.info.run_id))
    with mlflow.start_run() as run:
        mlflow.log_param("encoder_layers", 6)
    assert results.encoder_layers(mlflow.get_run(run.info.run_id)) == 6


def test_a_graph_is_called_int8_only_where_it_holds_integer_nodes():
    """The candidate table reads each graph's integer nodes; the INT8 target is met only by an INT8
    graph whose gate passed on at least int8_min_judged held-out texts."""
    import pandas as pd

    mlflow.set_experiment("kd-sentiment/tweeteval")
    rows = [("openvino-bf16", "openvino", "bf16", 0, 2.5), ("nncf-openvino-int8", "openvino", "f32", 63, 2.0),
            ("openvino-int8", "openvino", "f32", 0, 1.5)]  # a float graph under an INT8-sounding name
    with mlflow.start_run(tags={"recipe": "openvino-bf16"}) as run:
        mlflow.log_param("mode", "auto")
        mlflow.log_table(pd.DataFrame([{
            "candidate": name, "runtime": runtime, "precision": precision, "integer_nodes": nodes, "speed": speed,
            "choice_texts": 2000, "choice_agreement": 0.99, "choice_agreement_low": 0.985,
            "choice_accuracy_drop_points": 0.1, "choice_accuracy_change_low_points": -0.4, "choice_ece_change": 0.002,
            "speed_vs_peer": speed / 2, "within_budget": True} for name, runtime, precision, nodes, speed in rows]),
            "quantize_candidates.json")
    lines = results.candidate_lines({"students": {"tinybert": {"quantize": run.info.run_id}}})
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "|---" not in line}
    assert "| bf16 (float) |" in table["openvino-bf16 (deployed)"]
    assert "| int8 |" in table["nncf-openvino-int8"] and "| f32 (float) |" in table["openvino-int8"]
    assert "| 2.00x | 1.00x | yes |" in table["nncf-openvino-int8"]  # speed vs fp32, vs optimum INT8
    assert "on 2000 held-out choice texts" in lines[0]

    gate = {"gate_passed": 1.0, "n_judge": 5000, "gate_accuracy_change_low_points": -0.3,
            "gate_macro_recall_change_low_points": -0.4, "gate_ece_change": 0.004,
            "int8_judge_agreement_with_fp32": 0.992, "int8_judge_agreement_with_fp32_low": 0.9896}
    assert results.int8_verdict(gate, "int8") == "**met**"
    assert results.int8_verdict(gate, "bf16") == "**not met** (a bf16 graph)"
    assert results.int8_verdict({**gate, "n_judge": 300}, "int8") == "**not met** (judged on 300 texts, fewer than 5000)"
    # the target's thresholds, not the run's own verdict (a run given a wider budget passed its gate)
    assert results.int8_verdict({**gate, "gate_accuracy_change_low_points": -0.8}, "int8") == "**not met**"
    assert results.int8_verdict({**gate, "gate_ece_change": 0.02}, "int8") == "**not met**"
    entry = {"int8": gate, "int8_recipe": "nncf-openvino-int8", "int8_graph": "int8"}
    gate_line, agreement_line = results.int8_gate_lines("tweeteval", "tinybert", entry)
    assert "accuracy at least -0.30, macro-recall at least -0.40 points, ECE +0.0040, on 5000 held-out texts | **met** |" \
        in gate_line
    assert agreement_line.endswith("| 99.2%, at least 98.96%, on 5000 held-out texts | **not met** |")
