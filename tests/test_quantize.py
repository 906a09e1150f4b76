"""quantize + promote on a registered (tiny) teacher: INT8 checked against fp32 in one run,
registered with gate tags; promotion accepted within the margin, refused (nothing moved) beyond it."""
import logging

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from kd_sentiment.deploy import promote, quantize
from kd_sentiment.core.errors import UserError

PARENT = "kd-sentiment-teacher-imdb"
INT8 = f"{PARENT}-int8"
MIN_AGREEMENT = 0.95
# A margin for promotions that test something else than the margin: the tiny model's judged half is 100
# texts (one text is a point), and which candidate auto chooses depends on this CPU's timings.
WIDE_MARGIN = 10.0
# Small held-out sets and a short QAD: the tiny model's run stays seconds, every candidate built. On 200
# choice and 300 judged texts the accuracy bounds are several points wide: the budget is the wide margin.
ARGS = dict(model=f"models:/{PARENT}@champion", dataset="imdb", max_eval_samples=200, choice_samples=200,
            judge_samples=300, qad_steps=8, min_agreement=MIN_AGREEMENT, max_accuracy_drop=WIDE_MARGIN,
            max_ece_increase=0.05)


@pytest.fixture(scope="module")
def quantized(teacher_home):
    import os
    home, _ = teacher_home
    old = os.getcwd()
    os.chdir(home)
    try:
        # 200 choice texts can show 95% agreement (by its lower bound), not 99% (268 needed).
        metrics = quantize.run(quantize.QuantizeArgs(**ARGS))
    finally:
        os.chdir(old)
    return home, metrics


@pytest.fixture
def registry(quantized, monkeypatch):
    home, metrics = quantized
    monkeypatch.chdir(home)
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    return MlflowClient(), metrics


def test_int8_checked_against_fp32_and_registered(registry):
    client, metrics = registry
    for backend in ("torch_fp32", "onnx_fp32", "onnx_int8"):
        for split in ("judge", "test"):
            for metric in ("accuracy", "macro_recall", "ece"):
                assert 0 <= metrics[f"{backend}_{split}_{metric}"] <= 1
    assert metrics["onnx_fp32_max_abs_logit_diff"] < 1e-3       # same model, other runtime
    assert metrics["int8_agreement_with_fp32"] >= 0.9
    version = client.get_model_version_by_alias(INT8, "candidate")
    # The fixture runs --mode auto: the search may choose an INT8 graph (smaller) or a float graph
    # (ONNX Runtime's fused one, OpenVINO's unfused one), whichever is fastest within budget here.
    if version.tags["recipe"] in ("ort-f32", "openvino-f32", "openvino-bf16"):  # the float graph
        assert metrics["size_mb_onnx_int8"] == pytest.approx(metrics["size_mb_onnx_fp32"], rel=0.1)
    else:
        assert metrics["size_mb_onnx_int8"] < metrics["size_mb_onnx_fp32"]
    assert version.tags["parent"] == f"{PARENT}/1"
    # The gate is decided on held-out texts (the parent's validation split and the training texts its
    # run did not use), never on test, and not on the texts auto chose on.
    assert version.tags["gate.split"] == "judge" and version.tags["gate.judge_source"] == "validation+unused-train"
    assert version.tags["gate.eval_data"] == "imdb:judge:300" and version.tags["gate.n_texts"] == "300"
    assert version.tags["gate.accuracy"] == f"{metrics['onnx_int8_judge_accuracy']:.6f}"
    assert version.tags["gate.parent_accuracy"] == f"{metrics['torch_fp32_judge_accuracy']:.6f}"
    assert version.tags["gate.agreement"] == f"{metrics['int8_judge_agreement_with_fp32']:.6f}"
    assert version.tags["gate.agreement_low"] == f"{metrics['int8_judge_agreement_with_fp32_low']:.6f}"
    assert metrics["int8_judge_agreement_with_fp32_low"] < metrics["int8_judge_agreement_with_fp32"]
    # the paired bound lies below the change seen; the verdict is the bounds', the ECE's and the agreement's
    seen = 100 * (metrics["onnx_int8_judge_accuracy"] - metrics["torch_fp32_judge_accuracy"])
    assert metrics["gate_accuracy_change_low_points"] <= seen
    assert version.tags["gate.passed"] == ("true" if (
        min(metrics["gate_accuracy_change_low_points"], metrics["gate_macro_recall_change_low_points"]) >= -WIDE_MARGIN
        and metrics["gate_ece_change"] <= 0.05 and metrics["int8_judge_agreement_with_fp32_low"] >= MIN_AGREEMENT)
        else "false")
    run = mlflow.get_run(version.tags["run_id"])
    assert run.data.params["validation_size"] == "300"  # taken from the parent's run
    assert (run.data.params["n_choose"], run.data.params["n_judge"]) == ("200", "300")
    assert set(candidate_table(run.info.run_id)["choice_texts"]) == {200}
    digests = {tag.value: d.dataset.digest for d in run.inputs.dataset_inputs for tag in d.tags
               if tag.key == "mlflow.data.context"}
    assert set(digests) == {"choice", "judge", "test", "calibration"} and digests["choice"] != digests["judge"]
    assert run.info.status == "FINISHED" and run.data.tags["machine.cpu_arch"]
    assert run.data.tags["device"] == "cpu"  # INT8 is a CPU target, whatever GPU the machine has
    model = mlflow.pyfunc.load_model(f"models:/{INT8}@candidate")
    out = model.predict(["a wonderful film", "boring and bad"])
    assert set(out["label"]) <= {"negative", "positive"} and out["score"].between(0, 1).all()


def test_promotion_gate_accepts_then_refuses(registry):
    client, metrics = registry
    version = client.get_model_version_by_alias(INT8, "candidate").version
    assert promote.run(promote.PromoteArgs(name=INT8, version=version, alias="champion", margin=WIDE_MARGIN))
    assert client.get_model_version_by_alias(INT8, "champion").version == version
    assert client.get_model_version(INT8, version).tags["promotion.decision"] == "accepted"

    # Exactly the margin is within it (100 * (0.53 - 0.52) is 1.0000000000000009 in floating point).
    assert promote.gate({"gate.accuracy": "0.52", "gate.parent_accuracy": "0.53"}, margin=1.0)[0]
    # A version 3 points worse than its parent: refused, and the alias stays where it was.
    worse = client.create_model_version(INT8, client.get_model_version(INT8, version).source, tags={
        "gate.accuracy": "0.50", "gate.parent_accuracy": "0.53"})
    with pytest.raises(UserError, match="failed its gate.*accuracy_drop_points=3.0"):
        promote.run(promote.PromoteArgs(name=INT8, version=worse.version, alias="champion", margin=1.0))
    assert client.get_model_version_by_alias(INT8, "champion").version == version
    assert client.get_model_version(INT8, worse.version).tags["promotion.decision"] == "refused"
    # quantize's own verdict on the judged texts binds too, whatever the margin
    judged_out = client.create_model_version(INT8, client.get_model_version(INT8, version).source, tags={
        "gate.accuracy": "0.53", "gate.parent_accuracy": "0.53", "gate.passed": "false"})
    with pytest.raises(UserError, match="failed its gate.*quantize_gate_passed=0.0"):
        promote.run(promote.PromoteArgs(name=INT8, version=judged_out.version, alias="champion", margin=WIDE_MARGIN))
    assert client.get_model_version_by_alias(INT8, "champion").version == version
    # --force overrides, and says so.
    promote.run(promote.PromoteArgs(name=INT8, version=worse.version, alias="champion", force=True))
    assert client.get_model_version_by_alias(INT8, "champion").version == worse.version
    assert client.get_model_version(INT8, worse.version).tags["promotion.decision"] == "forced"
    client.set_registered_model_alias(INT8, "champion", version)  # leave the good one served


def test_a_version_no_better_than_the_majority_class_is_not_promoted_unless_forced(registry):
    client, _ = registry
    good = client.get_model_version_by_alias(INT8, "candidate")
    assert good.tags["gate.selection_metric"] == "accuracy"  # imdb's; quantize wrote the baseline beside it
    assert float(good.tags["gate.majority_accuracy"]) == pytest.approx(0.5, abs=0.1)
    before = client.get_model_version_by_alias(INT8, "champion").version
    # predicts one class: macro-recall 1/2, accuracy the majority share, no loss against its parent
    one_class = client.create_model_version(INT8, good.source, tags={
        "gate.selection_metric": "accuracy", "gate.accuracy": "0.52", "gate.parent_accuracy": "0.52",
        "gate.majority_accuracy": "0.52", "gate.majority_macro_recall": "0.5", "gate.eval_data": "imdb:validation:200"})
    with pytest.raises(UserError, match=r"failed its gate \(not better than the majority class on "
                                        r"imdb:validation:200 \(accuracy 0.5200 vs 0.5200\);.*Set force"):
        promote.run(promote.PromoteArgs(name=INT8, version=one_class.version, alias="champion"))
    assert client.get_model_version_by_alias(INT8, "champion").version == before
    assert client.get_model_version(INT8, one_class.version).tags["promotion.decision"] == "refused"  # a recorded run
    promote.run(promote.PromoteArgs(name=INT8, version=one_class.version, alias="champion", force=True))
    tags = client.get_model_version(INT8, one_class.version).tags
    assert tags["promotion.decision"] == "forced" and "not better than the majority class" in tags["promotion.majority_floor"]
    client.set_registered_model_alias(INT8, "champion", before)
    # a majority-class student (no gate: its training run's validation numbers say it): refused, and
    # forced only with its floor recorded
    with mlflow.start_run() as trained:
        mlflow.log_param("selection_metric", "accuracy")
        mlflow.log_metrics({"val_accuracy": 0.5, "val_majority_accuracy": 0.5})
    student = client.create_model_version(PARENT, client.get_model_version_by_alias(PARENT, "champion").source,
                                          run_id=trained.info.run_id)
    with pytest.raises(UserError):
        promote.run(promote.PromoteArgs(name=PARENT, version=student.version, alias="probe"))
    promote.run(promote.PromoteArgs(name=PARENT, version=student.version, alias="probe", force=True))
    tags = client.get_model_version(PARENT, student.version).tags
    assert tags["promotion.majority_floor"] == "not better than the majority class on validation (accuracy 0.5000 vs 0.5000)"
    client.delete_registered_model_alias(PARENT, "probe")
    client.delete_model_version(PARENT, student.version)


def test_every_gate_number_rests_on_every_judged_text(registry):
    """The judged texts' logits are logged; the gate's agreement, accuracy and counts recomputed from
    them match what was logged (a number read from fewer texts than n_judge would not)."""
    from kd_sentiment.core import stats
    from kd_sentiment.core.tracking import load_array

    client, metrics = registry
    run_id = client.get_model_version_by_alias(INT8, "candidate").tags["run_id"]
    arrays = {k: load_array(run_id, f"predictions/judge_{k}.npy") for k in ("onnx_int8", "torch_fp32", "labels")}
    assert {len(a) for a in arrays.values()} == {300} == {int(metrics["n_judge"])}
    assert stats.agreement(arrays["onnx_int8"], arrays["torch_fp32"]) == pytest.approx(
        (metrics["int8_judge_agreement_with_fp32"], metrics["int8_judge_agreement_with_fp32_low"]))
    assert (arrays["onnx_int8"].argmax(1) == arrays["labels"]).mean() == pytest.approx(metrics["onnx_int8_judge_accuracy"])
    low = stats.change_lower_bound(arrays["onnx_int8"].argmax(1), arrays["torch_fp32"].argmax(1), arrays["labels"],
                                   "accuracy", 2)
    assert 100 * low == pytest.approx(metrics["gate_accuracy_change_low_points"])


def test_the_budget_holds_accuracy_macro_recall_ece_and_the_agreement_bound():
    """The fastest candidate whose macro-recall (or accuracy) change's lower bound, calibration or
    agreement's bound is short is passed over for a slower one within every part of the budget."""
    from pathlib import Path

    from kd_sentiment.deploy import candidates

    def candidate(name, accuracy_drop, recall_drop, ece_change, agreement_low, speed):
        found = candidates.Candidate(name, Path(f"{name}.onnx"))
        found.numbers.update(choice_accuracy_change_low_points=-accuracy_drop,
                             choice_macro_recall_change_low_points=-recall_drop, choice_ece_change=ece_change,
                             choice_agreement=agreement_low + 0.005, choice_agreement_low=agreement_low, speed=speed)
        return found

    loses_recall = candidate("loses-recall", 0.0, 2.0, 0.0, 0.995, 5.0)
    loses_accuracy = candidate("loses-accuracy", 1.0, 0.0, 0.0, 0.995, 4.0)
    loses_calibration = candidate("loses-calibration", 0.0, 0.0, 0.02, 0.995, 3.0)
    short_bound = candidate("short-bound", 0.0, 0.0, 0.0, 0.965, 2.0)
    within = candidate("within", 0.4, 0.4, 0.009, 0.971, 1.5)
    found = [loses_recall, loses_accuracy, loses_calibration, short_bound, within]
    assert candidates.choose(found, 0.5, 0.01, 0.97) is within
    at_margin = candidate("at-margin", 100 * (0.53 - 0.525), 0.0, 0.0, 0.99, 9.0)  # 0.5000000000000004 points
    assert candidates.shortfall(at_margin, 0.5, 0.01, 0.97) == 0
    assert [candidates.shortfall(c, 0.5, 0.01, 0.97) for c in found] == pytest.approx([1.5, 0.5, 1.0, 0.5, 0.0])


def test_a_parent_whose_run_lacks_its_split_is_refused_not_defaulted(registry):
    client, _ = registry
    source = client.get_model_version_by_alias(PARENT, "champion").source
    with mlflow.start_run() as bare:  # a run that logged nothing about how the parent was trained
        pass
    version = client.create_model_version(PARENT, source, run_id=bare.info.run_id)
    with pytest.raises(UserError, match=r"records no max_length, validation_size, data_seed, which quantize needs"):
        quantize.run(quantize.QuantizeArgs(**{**ARGS, "model": f"models:/{PARENT}/{version.version}"}))
    client.delete_model_version(PARENT, version.version)


def test_quantize_unknown_model_is_clear(registry):
    with pytest.raises(UserError, match="not in the model registry"):
        quantize.run(quantize.QuantizeArgs(model="models:/nope@champion", dataset="imdb", max_eval_samples=50))


def test_every_promotion_is_a_run_with_history_and_rollback(registry, caplog):
    """Accepted, rolled-back and refused promotions each leave a run with the alias before and after;
    --history lists them; --rollback moves the alias back to its previous holder, gated."""
    client, _ = registry
    first = client.get_model_version_by_alias(INT8, "candidate")
    gate_tags = {k: v for k, v in first.tags.items() if k.startswith("gate.") or k == "dataset"}
    second = client.create_model_version(INT8, first.source, tags=gate_tags)
    promote.run(promote.PromoteArgs(name=INT8, version=str(first.version), alias="staging", margin=WIDE_MARGIN))
    promote.run(promote.PromoteArgs(name=INT8, version=str(second.version), alias="staging", margin=WIDE_MARGIN))
    promote.run(promote.PromoteArgs(name=INT8, alias="staging", rollback=True, margin=WIDE_MARGIN))
    assert str(client.get_model_version_by_alias(INT8, "staging").version) == str(first.version)

    worse = client.create_model_version(INT8, first.source, tags={**gate_tags, "gate.accuracy": "0.10"})
    with pytest.raises(UserError, match="failed its gate"):
        promote.run(promote.PromoteArgs(name=INT8, version=str(worse.version), alias="staging"))
    assert str(client.get_model_version_by_alias(INT8, "staging").version) == str(first.version)

    caplog.set_level("INFO", logger="kd_sentiment")
    logger = logging.getLogger("kd_sentiment")  # the CLI, if a test ran it here, stops propagation
    logger.addHandler(caplog.handler)
    try:
        rows = promote.history(INT8, "staging")
    finally:
        logger.removeHandler(caplog.handler)
    v1, v2 = str(first.version), str(second.version)
    assert [(r["decision"], r["before"], r["after"]) for r in rows] == [
        ("accepted", "none", v1), ("accepted", v1, v2), ("rolled back", v2, v1), ("refused", v1, v1)]
    assert f"now at version {v1}" in caplog.text
    runs = promote.promotion_runs(INT8, "staging")
    assert all(r.data.tags["kd_sentiment.step"] == "promote" and r.data.tags["machine.cpu_arch"] for r in runs)
    assert runs[-1].data.metrics["accuracy_drop_points"] > 1.0  # the gate's numbers, on the refused run too
    assert client.get_model_version(INT8, worse.version).tags["promotion.run_id"] == runs[-1].info.run_id
    # The rollback popped v2: there is no holder before v1 to go back to.
    with pytest.raises(UserError, match="no recorded earlier holder"):
        promote.run(promote.PromoteArgs(name=INT8, alias="staging", rollback=True))


def candidate_table(run_id: str):
    """The quantize run's table of candidates (logged with mlflow.log_table)."""
    import pandas as pd

    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/quantize_candidates.json")
    return pd.DataFrame(table["data"], columns=table["columns"])


def test_auto_mode_registers_the_fastest_candidate_within_budget_with_its_hardware(registry):
    """--mode auto (the default): every candidate is measured on the choice texts and logged, with
    its integer nodes; the version is the fastest one within budget, tagged with the runtime,
    precision, graph and CPU it was validated on, and it serves probabilities scaled by the
    temperature fitted on the choice texts."""
    import json

    import numpy as np

    from kd_sentiment.deploy import runtimes
    from kd_sentiment.core.machine import DECIDING_FEATURES

    client, metrics = registry
    version = client.get_model_version_by_alias(INT8, "candidate")
    run_id = version.tags["run_id"]
    table = candidate_table(run_id)
    assert {"ort-dynamic", "ort-static", "ort-dynamic-ffn-fp32", "openvino-f32", "openvino-int8", "qad-ort-static",
            "qad-openvino-int8", "nncf-openvino-int8", "nncf-ort-int8"} <= set(table["candidate"])
    # plain optimum INT8 is timed in the same rounds as a reference, never a candidate
    assert "peer-optimum-int8" not in set(table["candidate"]) and (table["speed_vs_peer"] > 0).all()
    integer = dict(zip(table["candidate"], table["integer_nodes"]))
    assert integer["ort-f32"] == integer["openvino-f32"] == 0
    assert min(integer["qad-ort-static"], integer["nncf-openvino-int8"], integer["ort-dynamic"]) > 0
    assert version.tags["graph"] == ("int8" if integer[version.tags["recipe"]] else version.tags["precision"])
    within = table[table["within_budget"]]
    # ONNX Runtime on the fp32 graph is a candidate, within any budget: auto never chooses slower than it
    assert "ort-f32" in set(within["candidate"])
    assert version.tags["recipe"] == within.loc[within["speed"].idxmax(), "candidate"]
    chosen = table[table["candidate"] == version.tags["recipe"]].iloc[0]
    assert chosen["choice_agreement_low"] >= MIN_AGREEMENT and chosen["choice_accuracy_change_low_points"] >= -WIDE_MARGIN
    assert (version.tags["runtime"], version.tags["precision"]) == (chosen["runtime"], chosen["precision"])
    assert all(f"validated_on.{k}" in version.tags for k in DECIDING_FEATURES)
    assert metrics["onnx_int8_temperature"] > 0 and 0 <= metrics["onnx_int8_judge_ece_after_ts"] <= 1

    folder = mlflow.artifacts.download_artifacts(f"models:/{INT8}/{version.version}")
    config = json.loads(next(__import__("pathlib").Path(folder).rglob("serving_config.json")).read_text())
    assert config["temperature"] == pytest.approx(metrics["onnx_int8_temperature"])
    graph = next(__import__("pathlib").Path(folder).rglob("*.onnx"))
    texts = ["a wonderful film", "boring and bad"]
    run_fp32 = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx_fp32")
    logits = runtimes.OnnxClassifier(graph, run_fp32, runtime=config["runtime"],
                                    precision=config["precision"]).predict_logits(texts, 64) / config["temperature"]
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    served = mlflow.pyfunc.load_model(f"models:/{INT8}/{version.version}").predict(texts)
    assert np.allclose(served[["prob_negative", "prob_positive"]].to_numpy(), expected, atol=1e-4)


def test_auto_mode_with_an_impossible_budget_registers_nothing(registry):
    client, _ = registry
    before = {v.version for v in client.search_model_versions(f"name = '{INT8}'")}
    with pytest.raises(UserError, match="no candidate is within.*closest: .*points short"):
        quantize.run(quantize.QuantizeArgs(**{**ARGS, "max_accuracy_drop": -50}))
    assert {v.version for v in client.search_model_versions(f"name = '{INT8}'")} == before
    failed = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                                filter_string="tags.`kd_sentiment.step` = 'quantize'")[0]
    assert failed.info.status == "FAILED"
    assert len(candidate_table(failed.info.run_id)) >= 7


def test_candidates_restrict_the_search_to_the_named_ones(registry):
    """--candidates openvino-f32 registers an OpenVINO model whatever else would have been faster; an
    unknown name, or candidates outside auto mode, is refused before any run opens."""
    client, _ = registry
    quantize.run(quantize.QuantizeArgs(**{**ARGS, "candidates": "openvino-f32", "alias": "forced"}))
    version = client.get_model_version_by_alias(INT8, "forced")
    assert (version.tags["recipe"], version.tags["runtime"]) == ("openvino-f32", "openvino")
    assert list(candidate_table(version.tags["run_id"])["candidate"]) == ["openvino-f32"]
    runs = {r.info.run_id for r in mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")}
    with pytest.raises(UserError, match=r"candidates='openvino-f32,ort-fast': unknown \['ort-fast'\]; choose from"):
        quantize.run(quantize.QuantizeArgs(**{**ARGS, "candidates": "openvino-f32,ort-fast"}))
    with pytest.raises(UserError, match="candidates='ort-static': chooses among auto's candidates; mode=dynamic"):
        quantize.run(quantize.QuantizeArgs(model=f"models:/{PARENT}@champion", dataset="imdb", max_eval_samples=200,
                                           mode="dynamic", candidates="ort-static"))
    assert {r.info.run_id for r in mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")} == runs


def test_auto_mode_refuses_too_few_choice_texts_before_any_run(registry):
    """50 choice texts, all agreeing, bound the agreement at 94.9%: 0.99 cannot be shown, so nothing is built."""
    client, _ = registry
    versions = {v.version for v in client.search_model_versions(f"name = '{INT8}'")}
    runs = {r.info.run_id for r in mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")}
    with pytest.raises(UserError, match="min_agreement=0.99: auto chooses on 50 held-out texts, which cannot show "
                                        "it.*choice_samples of at least 268"):
        quantize.run(quantize.QuantizeArgs(**{**ARGS, "choice_samples": 50, "min_agreement": 0.99}))
    assert {v.version for v in client.search_model_versions(f"name = '{INT8}'")} == versions
    assert {r.info.run_id for r in mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")} == runs


def test_auto_gate_reads_the_agreement_by_its_lower_bound(monkeypatch, tmp_path):
    """A faster candidate at 99.5% agreement on 1,000 texts (bound 98.98%) is not shown to reach 99%;
    the slower one agreeing on all of them (bound 99.73%) is chosen."""
    import numpy as np

    from kd_sentiment.deploy import candidates

    labels = np.arange(1000) % 2
    reference = np.stack([1 - labels, labels], axis=1).astype(float)  # fp32 predicts every label
    flipped = reference.copy()
    flipped[:5] = flipped[:5, ::-1]  # 5 of 1,000 predictions differ
    fast, slow = candidates.Candidate("fast", tmp_path / "a.onnx"), candidates.Candidate("slow", tmp_path / "b.onnx")
    logits = {"fast": flipped, "slow": reference}

    class Runner:
        def __init__(self, name):
            self.name = name

        def predict_logits(self, texts, max_length):
            return logits[self.name]

    monkeypatch.setattr(candidates.Candidate, "runner", lambda self, *a, **k: Runner(self.name))
    candidates.validate([fast, slow], tmp_path, ["text"] * 1000, labels, ["negative", "positive"], reference, 64)
    fast.numbers["speed"], slow.numbers["speed"] = 3.0, 1.5
    assert fast.numbers["choice_agreement"] == pytest.approx(0.995) and fast.numbers["choice_agreement_low"] < 0.99
    assert candidates.choose([fast, slow], max_accuracy_drop=2.0, max_ece_increase=1.0, min_agreement=0.99) is slow


def test_promote_refuses_a_version_validated_on_another_cpu_unless_forced(registry, monkeypatch):
    from kd_sentiment.core.machine import cpu_features

    client, _ = registry
    version = client.get_model_version_by_alias(INT8, "candidate")
    other = {**cpu_features(), "vnni": not cpu_features()["vnni"]}
    monkeypatch.setattr(promote, "cpu_features", lambda: other)
    with pytest.raises(UserError, match="this CPU differs .*vnni.*run quantize on this machine"):
        promote.run(promote.PromoteArgs(name=INT8, version=str(version.version), alias="elsewhere"))
    promote.run(promote.PromoteArgs(name=INT8, version=str(version.version), alias="elsewhere", force=True))
    tags = client.get_model_version(INT8, version.version).tags
    assert tags["promotion.decision"] == "forced" and "vnni" in tags["promotion.hardware"]


def test_the_alias_holder_is_read_not_guessed(monkeypatch):
    """No such alias: NONE; no such model: one line; any other registry error is not read as "no alias"
    (it would write a wrong holder into the rollback history)."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    client.create_registered_model("kd-sentiment-x-int8")
    assert promote.alias_holder("kd-sentiment-x-int8", "champion") == promote.NONE
    with pytest.raises(UserError, match="kd-sentiment-nope: not in the model registry"):
        promote.alias_holder("kd-sentiment-nope", "champion")

    def unavailable(self, name):
        raise MlflowException("the tracking server is restarting", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_registered_model", unavailable)
    with pytest.raises(MlflowException, match="restarting"):
        promote.alias_holder("kd-sentiment-x-int8", "champion")
