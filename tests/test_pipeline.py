"""The main pipeline on a tiny model: every step as a child run, benchmark results on disk and in
MLflow, and an interrupted pipeline that continues, reusing the steps that had finished."""
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from kd_sentiment import pipeline
from kd_sentiment.core import configs
from kd_sentiment.deploy import quantize
from kd_sentiment.report import results
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.data import load_splits
from kd_sentiment.training.loop import predict_logits

from conftest import DATA_DIR

STEPS = ["teacher", "distill-teacher-layers:0", "distill-teacher-layers:0-nokd", "quantize-teacher-layers:0",
         "promote-teacher-layers:0", "benchmark"]


@pytest.fixture
def config(tiny_model, tmp_path):
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"teacher": "tiny", "students": ["teacher-layers:0"],
                                                            "models": {"tiny": str(tiny_model)}}))
    cfg = {"catalog": str(tmp_path / "catalog.yaml"),
           "data": {"imdb": {"max_train_samples": 300, "max_eval_samples": 100, "validation_size": 100}},
           "teacher": {"epochs": 1, "lr": 2e-3, "max_length": 64, "checkpoint_every": 0},
           "distill": {"baseline": True, "epochs": 1, "lr": 2e-3, "max_length": 64, "checkpoint_every": 0},
           "quantize": {"mode": "dynamic", "choice_samples": 100, "judge_samples": 100},
           "benchmark": {"batch_sizes": "1,4", "rounds": 6, "samples": 18, "time_budget": 0.05, "min_batches": 1,
                         "max_eval_samples": 100, "threads": 1, "output_dir": str(tmp_path / "bench")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def contexts(run) -> set[str]:
    """The contexts of a run's dataset inputs (what the UI lists under Datasets)."""
    return {tag.value for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"}


def ui_story(parent, runs: dict) -> None:
    """What a user sees in the MLflow UI, read back through MLflow's client: descriptions built from
    the runs' own numbers (change one, the text changes), datasets where data was read."""
    from kd_sentiment.report import results

    client = mlflow.MlflowClient()
    record = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/pipeline_record.json")
    entry = record["students"]["teacher-layers:0"]
    teacher, student, q = (runs[record["teacher"]], runs[entry["selected"]], runs[entry["quantize"]])
    kept = student.data.metrics["test_accuracy"] / teacher.data.metrics["test_accuracy"]
    summary = parent.data.tags["mlflow.note.content"]
    row = next(line for line in summary.splitlines() if line.startswith("| teacher-layers:0 |"))
    assert f"{100 * student.data.metrics['test_accuracy']:.1f}% ({100 * kept:.1f}%)" in row
    assert f"`ort-dynamic` (onnxruntime, int8 graph) v{q.data.tags['registered_version']}" in row
    assert f"| {100 * q.data.metrics['int8_agreement_with_fp32']:.1f}% |" in row
    assert f"test accuracy {100 * teacher.data.metrics['test_accuracy']:.1f}% on 100 texts" in summary
    client.log_metric(student.info.run_id, "test_accuracy", 0.123)  # the table is read from the runs
    assert "12.3% (" in results.pipeline_summary(record, "imdb", {})

    version = client.get_model_version(q.data.tags["registered_model"], q.data.tags["registered_version"])
    m = q.data.metrics
    assert version.description == q.data.tags["mlflow.note.content"]
    assert (f"INT8 graph of `{student.data.tags['registered_model']}`" in version.description and "recipe `ort-dynamic`, run by onnxruntime "
            f"({int(m['int8_integer_nodes'])} integer nodes). On 100 held-out texts" in version.description)
    assert f"agrees with the fp32 parent on {100 * m['int8_judge_agreement_with_fp32']:.1f}%" in version.description
    assert f"gate {'passed' if m['gate_passed'] else 'failed'}" in version.description
    assert f"Validated on {version.tags['validated_on.cpu']}" in version.description
    trained = client.get_model_version(student.data.tags["registered_model"], student.data.tags["registered_version"])
    assert f"Validation accuracy {100 * student.data.metrics['val_accuracy']:.1f}%" in trained.description
    assert "distilled from `models:/kd-sentiment-teacher-imdb/" in trained.description
    for name in (q.data.tags["registered_model"], student.data.tags["registered_model"],
                 teacher.data.tags["registered_model"]):
        assert "`@champion`" in client.get_registered_model(name).description
    twin = runs[entry["nokd"][0]].data.tags["registered_model"]
    assert "registered without an alias" in client.get_registered_model(twin).description

    assert contexts(teacher) == {"train", "validation", "test"} == contexts(parent)
    assert contexts(q) == {"choice", "judge", "test"}  # dynamic mode reads no calibration texts
    benchmark = next(r for r in runs.values() if r.data.tags["kd_sentiment.step"] == "benchmark")
    assert contexts(benchmark) == {"test"}
    cache = next(r for r in runs.values() if r.data.tags["kd_sentiment.step"] == "soft-targets")
    assert contexts(cache) == {"train", "test"}  # what the teacher labelled for the KD student


def test_interrupted_pipeline_resumes_and_benchmark_is_reproducible(config, tmp_path, monkeypatch):
    args = pipeline.PipelineArgs(config=config, dataset="imdb")
    real_quantize = quantize.run

    def interrupted(_):
        raise KeyboardInterrupt("simulated Ctrl-C during quantize")
    monkeypatch.setattr(quantize, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(args)
    first = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")
    assert {r.data.tags["kd_sentiment.step"] for r in first if r.info.status == "FINISHED"} >= {"teacher", "distill"}
    assert [r.info.status for r in first if r.data.tags["kd_sentiment.step"] == "pipeline"] == ["KILLED"]

    monkeypatch.setattr(quantize, "run", real_quantize)
    result = pipeline.run(args)
    assert result["reused"] == STEPS[:3]               # finished steps were not run again
    again = pipeline.run(args)
    assert again["reused"] == STEPS                    # nothing left to do

    runs = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list")
    parents = {r.info.run_id for r in runs if r.data.tags["kd_sentiment.step"] == "pipeline"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    # Each step ran exactly once over the three attempts, always as a child of a pipeline run.
    assert len(children) == len(STEPS) and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["kd_sentiment.step_key"] for r in children}) == len(STEPS)
    # The training steps checkpointed under outputs/pipeline (cwd is tmp_path); finished, they left nothing.
    assert (tmp_path / "outputs" / "pipeline").is_dir() and not any((tmp_path / "outputs" / "pipeline").iterdir())

    csv = sorted((tmp_path / "bench").glob("imdb-*.csv"))
    assert len(csv) == 1
    frame = pd.read_csv(csv[0])
    assert set(frame["backend"]) == {"torch_fp32", "onnx_fp32", "onnx_int8", "optimum_int8"}  # with the peer
    assert set(frame["setting"]) == {"real", "fixed128"} and set(frame["batch_size"]) == {1, 4}
    assert (frame["rounds"] == 6).all() and frame["samples"].between(6, 18).all()
    teacher = frame[frame["role"] == "teacher"]
    assert np.allclose(teacher[["speedup_vs_teacher", "speedup_vs_teacher_low", "speedup_vs_teacher_high"]], 1.0)
    others = frame[frame["role"] != "teacher"]  # 6 rounds: every speedup has its interval, around its median
    assert (others["speedup_vs_teacher_low"] <= others["speedup_vs_teacher"]).all()
    assert (others["speedup_vs_teacher"] <= others["speedup_vs_teacher_high"]).all()
    int8 = frame[frame["backend"] == "onnx_int8"]
    assert int8["speedup_vs_peer"].notna().all() and int8["accuracy_vs_peer_points"].notna().all()
    assert frame.loc[frame["backend"] != "onnx_int8", "speedup_vs_peer"].isna().all()
    # p50 from every sample; p95 and p99 withheld: fewer than 20 samples hold them up
    assert frame["model_p50_ms"].notna().all() and frame[["model_p95_ms", "model_p99_ms"]].isna().all().all()
    assert (frame["runtime_rss_mb"] > 0).all() and (frame["model_rss_mb"] > 0).all()
    assert not frame.loc[frame["backend"].str.contains("onnx|optimum"), "imports_torch"].any()

    # Accuracy recomputed independently for the teacher: same texts, same number.
    splits = load_splits("imdb", validation_size=100, max_train_samples=300, max_eval_samples=100, seed=42)
    components = mlflow.transformers.load_model(result["models"][0], return_type="components")
    logits = predict_logits(components["model"], components["tokenizer"], splits.test["text"], 64)
    accuracy = float((logits.argmax(1) == splits.test["label"].to_numpy()).mean())
    assert teacher["accuracy"].iloc[0] == pytest.approx(accuracy, abs=1e-12)

    bench_run = [r for r in children if r.data.tags["kd_sentiment.step"] == "benchmark"][0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(bench_run.info.run_id, "figures")}
    assert {"figures/pareto_accuracy_vs_latency.png", "figures/speedup.png", "figures/reliability_diagrams.png"} <= artifacts
    assert bench_run.data.tags["machine.threads"] == "1"
    # What the next sizing reads: each step's wall time on the pipeline run (reused ones from their
    # original run), and the training texts' length in tokens on each training run.
    last = max((r for r in runs if r.info.run_id in parents), key=lambda r: r.info.start_time)
    seconds = {k.removeprefix("step_seconds."): v for k, v in last.data.metrics.items() if k.startswith("step_seconds.")}
    assert set(seconds) == set(STEPS) and all(v > 0 for v in seconds.values())
    step = {r.data.tags["kd_sentiment.step"]: r for r in children}
    t = step["teacher"].data.metrics
    assert 0 < t["train_tokens_p50"] <= t["train_tokens_p99"] <= t["train_tokens_max"]
    assert t["train_truncated_share"] == pytest.approx(0.9, abs=0.1)  # IMDb reviews at 64 tokens

    ui_story(last, {r.info.run_id: r for r in runs})

    # The report is generated from these runs: its numbers are theirs, and regenerating it gives the same file.
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.README_START}\nstale\n{results.README_END}\noutro\n")
    out = tmp_path / "results" / "RESULTS.md"
    args = results.ReportArgs(config="tiny", datasets="imdb", out=str(out), readme=str(readme))
    results.run(args)
    text = out.read_text()
    accuracy = step["teacher"].data.metrics["test_accuracy"]  # a target line computed from the run, verdict too
    assert (f"| imdb | teacher test accuracy >= 90.0 | {100 * accuracy:.1f} | "
            f"{'**met**' if accuracy >= 0.9 else '**not met**'} |") in text
    assert "| imdb | teacher-layers:0 (1 layers) keeps >= 95.0% of the teacher's test accuracy |" in text
    # the report reads the last pipeline run, which reused every step: their times are their own runs'
    assert f"| teacher (reused) | {seconds['teacher'] / 60:.1f} |" in text
    assert "summed over the steps; this pipeline run took " in text and f"reusing the {len(STEPS)} steps marked" in text
    teacher_row = next(line for line in text.splitlines() if line.startswith("| teacher ("))
    assert f"| {100 * step['teacher'].data.metrics['test_accuracy']:.1f} |" in teacher_row
    int8_row = next(line for line in text.splitlines() if "ort-dynamic (deployed)" in line)  # the recipe quantized with
    assert f"{step['quantize'].data.metrics['int8_accuracy_delta_points']:+.2f}" in int8_row
    q = step["quantize"].data.metrics  # the INT8 target lines say how the held-out texts judged it
    assert (f"| {100 * q['int8_judge_agreement_with_fp32']:.1f}%, at least "
            f"{100 * q['int8_judge_agreement_with_fp32_low']:.2f}%, on 100 held-out texts |") in text
    gate_line = next(line for line in text.splitlines() if "by the paired 95% bound" in line)
    assert f"accuracy at least {q['gate_accuracy_change_low_points']:+.2f}" in gate_line
    assert gate_line.endswith("| **not met** (judged on 100 texts, fewer than 5000) |")
    assert bench_run.info.run_id in text
    results.run(args)
    assert out.read_text() == text
    assert "a later re-run of this pipeline's own benchmark" not in text
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("outro\n")
    assert "stale" not in readme.read_text() and teacher_row in readme.read_text()
    # a page written elsewhere leaves the README (here, the one in the working directory) alone unless asked
    (tmp_path / "README.md").write_text(f"{results.README_START}\ncommitted\n{results.README_END}\n")
    results.run(results.ReportArgs(config="tiny", datasets="imdb", out=str(tmp_path / "draft.md")))
    assert "committed" in (tmp_path / "README.md").read_text() and (tmp_path / "draft.md").is_file()
    assert "another version of" not in text
    # A later benchmark of the same models and settings (a quiet machine's) is used, and said to be.
    from kd_sentiment.measure import benchmark
    from kd_sentiment.core import parameters

    fields = parameters.flat_fields(parameters.BenchmarkArgs)
    same = parameters.read_values(parameters.BenchmarkArgs, {k: v for k, v in bench_run.data.params.items() if k in fields}, "")
    benchmark.run(parameters.build(parameters.BenchmarkArgs, same))
    results.run(args)
    assert f"a later re-run of this pipeline's own benchmark (`{bench_run.info.run_id}`)" in out.read_text()
    # The configuration file changes after the run: the section says its numbers are not what it gives now.
    changed = yaml.safe_load(open(config))
    changed["teacher"]["epochs"] = 2
    changed["distill"]["transfer_size"] = "all"  # read as its flag reads it: the run's None, not a change
    changed["teacher"]["lr"] = "2e-3"  # a float the YAML loader leaves a string: the same value
    changed["data"]["tweeteval"] = {"max_train_samples": 10}  # another dataset's subsets: not this section's
    Path(config).write_text(yaml.safe_dump(changed))
    results.run(args)
    assert ("**This pipeline ran another version of " + config + " than the one here, so these are not the numbers "
            "that file gives now:** teacher.epochs: ran 1, now 2.") in out.read_text()
    assert "**imdb's rows come from a pipeline that ran another version of its configuration file**" in out.read_text()


def test_seeds_give_one_run_each_the_best_on_validation_and_paired_intervals(config, tmp_path):
    """distill.seeds: each student's KD and alpha=0 runs once per seed, on the same test texts; the
    KD version best on validation gets the alias and is quantized; the report's KD-vs-no-KD line is
    a paired interval over texts and seeds."""
    cfg = yaml.safe_load(open(config))
    cfg["distill"]["seeds"] = [0, 1]
    cfg["distill"]["mixed_precision"] = "bf16"  # after the fp32 teacher, in the same process
    cfg["distill"]["batch_size"] = 32  # 300 labelled texts: 10 optimizer steps an epoch
    cfg.pop("benchmark")
    cfg["benchmark"] = {"batch_sizes": "1", "rounds": 2, "samples": 2, "time_budget": 0.05, "min_batches": 1,
                        "peer": False, "max_eval_samples": 100, "threads": 1, "output_dir": str(tmp_path / "bench")}
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pipeline.run(pipeline.PipelineArgs(config=str(path), dataset="imdb"))
    parent = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                                filter_string="tags.`kd_sentiment.step` = 'pipeline'")[0]
    record = results.artifact_json(parent.info.run_id, "pipeline_record.json")
    student = record["students"]["teacher-layers:0"]
    kd = [mlflow.get_run(r) for r in student["kd"]]
    nokd = [mlflow.get_run(r) for r in student["nokd"]]
    assert [r.data.params["seed"] for r in kd] == ["0", "1"] == [r.data.params["seed"] for r in nokd]
    assert {r.data.params["mixed_precision"] for r in kd + nokd} == {"bf16"}
    assert len({r.data.params["test_fingerprint"] for r in kd + nokd}) == 1  # the same test texts
    best = max(kd, key=lambda r: r.data.metrics["val_accuracy"])
    assert student["selected"] == best.info.run_id
    client = mlflow.MlflowClient()
    version = client.get_model_version(best.data.tags["registered_model"], best.data.tags["registered_version"])
    assert version.tags["seed_runs"] == ",".join(student["kd"])
    if "alias_withheld" not in version.tags:
        assert "champion" in version.aliases
    quantized = mlflow.get_run(student["quantize"])
    assert quantized.data.params["parent_version"] == str(version.version)

    results.run(results.ReportArgs(config="seeds", datasets="imdb", out=str(tmp_path / "R.md"),
                                 readme=str(tmp_path / "none.md")))
    text = (tmp_path / "R.md").read_text()
    kd_line = next(line for line in text.splitlines() if line.startswith("| teacher-layers:0 + KD vs no KD"))
    assert "[" in kd_line and "n/a" not in kd_line
    assert "ran in fp32 for the teacher and bf16 mixed precision for the students, with fp32 weights" in text
    seeds_cell = next(line for line in text.splitlines() if line.startswith("| teacher-layers:0 + KD (fp32)"))
    # a tiny model's seed may do no better than the majority class: the cell says how many did
    floor = sum(r.data.metrics["val_accuracy"] <= r.data.metrics["val_majority_accuracy"] for r in kd)
    assert seeds_cell.split("|")[2].strip() == "2" + (f" ({floor} no better than the majority class)" if floor else "")
    # The INT8 row is the deployed seed's: its own fp32 row stands beside it, not only the seeds' mean.
    deployed = next(line for line in text.splitlines() if line.startswith("| teacher-layers:0 + KD, deployed seed"))
    assert deployed.startswith(f"| teacher-layers:0 + KD, deployed seed {best.data.params['seed']} (fp32) | 1 |")
    assert f"| {100 * best.data.metrics['test_accuracy']:.1f} |" in deployed
    # Nothing typed for another configuration: the teacher, budget, hardware and noise are these runs'.
    for phrase in ("mpnet", "2-core", "±20%", "1.5-2 points", "~3 points", "same data, seed and budget"):
        assert phrase not in text.lower(), phrase
    assert "tiny (0.3M parameters, 1 epoch(s) on 300 texts at 64 tokens)" in text
    assert "Students: 1 epoch(s) (10 optimizer steps at batch 32), lr 0.002, KD alpha 0.5, temperature 2.0." in text


@pytest.mark.parametrize("section, key", [("data.imdb", "max_train_sample"), ("teacher", "epoch"),
                                          ("distill", "student"), ("quantize", "modes"), ("promote", "margins"),
                                          ("benchmark", "batch_size")])
def test_a_misspelled_key_in_any_section_is_refused_with_the_valid_keys(section, key, tmp_path):
    cfg = {"teacher": {"epochs": 1}, "distill": {"epochs": 1}, "quantize": {"mode": "dynamic"},
           "promote": {"margin": 1.0}, "benchmark": {"batch_sizes": "1"}, "data": {"imdb": {"max_eval_samples": 10}}}
    block = cfg["data"]["imdb"] if section == "data.imdb" else cfg[section]
    block[key] = 1
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError) as refused:
        configs.load_config(str(path))
    message = str(refused.value)
    assert f"unknown key(s) ['{key}'] in section '{section}'" in message and str(path) in message
    assert "valid keys: [" in message


def test_config_values_read_like_their_flags_and_steps_keep_their_own_defaults(tmp_path):
    """A config's `2e-4` (a string to YAML), `all`, `3.0` and `auto` mean what they mean as flags; a
    distill section without alpha distils (alpha 0.5, distill's default), it does not fine-tune."""
    from kd_sentiment.core import parameters

    cfg = {"data": {"imdb": {"max_train_samples": "all", "validation_size": 200}},
           "teacher": {"lr": "2e-4", "epochs": 3.0}, "distill": {"students": ["tinybert"], "seeds": [1, 2]},
           "quantize": {"per_channel": "false", "reduce_range": "auto"}}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = configs.load_config(str(path))
    assert config["data"]["imdb"] == {"max_train_samples": None, "validation_size": 200}
    assert config["teacher"] == {"lr": 2e-4, "epochs": 3} and isinstance(config["teacher"]["epochs"], int)
    assert config["quantize"] == {"per_channel": False, "reduce_range": None}
    assert config["distill"] == {"students": ["tinybert"], "seeds": [1, 2]}
    distill = parameters.build(parameters.DistillArgs, {"student": "tinybert", "epochs": 1})
    assert (distill.train.alpha, distill.train.epochs) == (0.5, 1)
    assert "alpha" not in parameters.flat_fields(parameters.TeacherArgs)


def test_a_value_given_per_dataset_is_read_for_the_dataset_run_and_refused_where_it_has_none(tmp_path):
    """`epochs: {tweeteval: 1, imdb: 3}` gives each dataset's pipeline its own value, read as its flag
    would; a dataset the mapping leaves out is refused naming the key; a bad value names its dataset."""
    cfg = {"distill": {"epochs": {"tweeteval": 1, "imdb": "3"}, "lr": "1e-4", "seeds": {"imdb": [1, 2]}}}
    path = tmp_path / "per-dataset.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert configs.load_config(str(path), "imdb")["distill"] == {"epochs": 3, "lr": 1e-4, "seeds": [1, 2]}
    with pytest.raises(UserError, match=r"\['seeds'\] give a value per dataset but none for 'tweeteval'"):
        configs.load_config(str(path), "tweeteval")
    assert configs.load_config(str(path))["distill"]["epochs"] == {"tweeteval": 1, "imdb": 3}
    cfg["distill"]["epochs"]["imdb"] = "three"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="epochs for imdb: epochs"):
        configs.load_config(str(path))


@pytest.mark.parametrize("distill, expect", [({"seeds": "42"}, "seeds must be a list"),
                                             ({"students": "minilm"}, "students must be a list"),
                                             ({"baseline": "maybe"}, "baseline: expected true or false")])
def test_the_pipelines_own_distill_keys_are_checked(distill, expect, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"distill": distill}))
    with pytest.raises(UserError, match=expect):
        configs.load_config(str(path))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.yaml")
                                        if not p.name.startswith("catalog") and p != results.TARGETS_FILE))
def test_every_shipped_configuration_reads_under_the_schema(name):
    """Each shipped config reads, and so does each of its datasets' pipeline (a value given per
    dataset must name every dataset the config has a data block for)."""
    path = str(Path(__file__).parents[1] / "experiments" / name)
    for dataset in [None, *(configs.load_config(path).get("data") or {})]:
        configs.load_config(path, dataset)


def test_a_transfer_set_trains_each_student_three_ways_and_the_report_compares_them(config, tmp_path):
    """distill.transfer_set: the KD student learns from it, a KD twin without it and the alpha=0
    baseline (which never uses it) are trained on the same labelled texts; the report gives the
    transfer set's gain with its paired interval."""
    cfg = yaml.safe_load(open(config))
    cfg["distill"].update(transfer_set="train-unlabelled", transfer_size=300, batch_size=32)
    cfg["benchmark"].update(batch_sizes="1", rounds=1, samples=2, peer=False)
    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pipeline.run(pipeline.PipelineArgs(config=str(path), dataset="imdb"))
    parent = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                                filter_string="tags.`kd_sentiment.step` = 'pipeline'")[0]
    student = results.artifact_json(parent.info.run_id, "pipeline_record.json")["students"]["teacher-layers:0"]
    kd, plain, nokd = (mlflow.get_run(student[kind][0]) for kind in ("kd", "kd_no_transfer", "nokd"))
    assert kd.data.params["n_transfer"] == "300" and kd.data.params["transfer_source"] == "train-unlabelled"
    assert "n_transfer" not in plain.data.params and "n_transfer" not in nokd.data.params
    assert plain.data.params["alpha"] == kd.data.params["alpha"] and nokd.data.params["alpha"] == "0.0"
    assert plain.data.tags["registered_model"] == "kd-sentiment-cut-l0-imdb-kd-no-transfer"

    results.run(results.ReportArgs(config="transfer", datasets="imdb", out=str(tmp_path / "R.md"),
                                 readme=str(tmp_path / "none.md")))
    text = (tmp_path / "R.md").read_text()
    gain = next(line for line in text.splitlines() if "with vs without the transfer set" in line)
    assert "[" in gain and "n/a" not in gain
    assert "| teacher-layers:0 + KD + 300 transfer texts (fp32) |" in text
    # 300 labelled + 300 transfer texts at batch 32: 19 steps for KD, 10 for its twins
    assert "(19 optimizer steps at batch 32 with 300 transfer texts, 10 on the labelled texts alone)" in text


def test_a_step_label_with_a_comma_still_logs_its_wall_time():
    """A student like `teacher-layers:0,1` (smoke.yaml's) labels its steps with a comma, which MLflow
    refuses in the `step_seconds.<label>` metric; the label is logged with `_` instead."""
    from dataclasses import dataclass

    from kd_sentiment.core import tracking

    @dataclass
    class Args:
        seed: int = 42

    def step(args):
        with tracking.step_run("distill", "a comma student"):
            pass

    with mlflow.start_run() as parent:
        runner = pipeline.StepRunner("imdb", None, None)
        runner.step("distill-teacher-layers:0,1-s42", step, Args())
        runner.step("distill-teacher-layers:0,1-s42", step, Args())  # reused: listed without a comma inside
    metrics = mlflow.get_run(parent.info.run_id).data.metrics
    assert "step_seconds.distill-teacher-layers:0_1-s42" in metrics
    assert runner.reused == ["distill-teacher-layers:0_1-s42"]


def test_a_step_runs_again_when_what_makes_its_result_changes_and_says_which_part(tmp_path):
    """Reused while arguments, data content, catalog sources, libraries and code stay; run again when
    one changes; the run's tags hold each part's hash."""
    import shutil
    from dataclasses import dataclass

    from kd_sentiment.core import tracking

    data = tmp_path / "data" / "tweeteval_sentiment"
    shutil.copytree(DATA_DIR / "tweeteval_sentiment", data)
    for path in data.iterdir():
        path.chmod(0o644)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": {"tiny": "/models/tiny-a"}}))

    @dataclass
    class Args:
        lr: float = 1.0

    calls = []

    def step(args):
        with tracking.step_run("distill", "a student"):
            calls.append(args)

    def run(args) -> dict:
        with mlflow.start_run():
            finished = pipeline.StepRunner("tweeteval", str(tmp_path / "data"), str(catalog)).step("s", step, args)
        return {k.rpartition(".")[2]: v for k, v in finished.data.tags.items() if k.startswith("kd_sentiment.step_key.")}

    first = run(Args())
    assert run(Args()) == first and len(calls) == 1  # nothing changed: reused
    assert run(Args(lr=2.0))["arguments"] != first["arguments"] and len(calls) == 2
    test = data / "test.csv"
    test.write_text(test.read_text().replace("\n", "\nan added tweet,1\n", 1))  # one row more
    changed = run(Args())
    assert len(calls) == 3 and changed["data"] != first["data"]
    assert {k for k in first if first[k] != changed[k]} == {"data"}
    catalog.write_text(yaml.safe_dump({"models": {"tiny": "/models/tiny-b"}}))
    moved = run(Args())
    assert len(calls) == 4 and {k for k in first if moved[k] != changed[k]} == {"catalog"}
    assert set(first) == {"arguments", "upstream", "code", "data", "catalog", "libraries"}


def test_code_version_ignores_comments_and_docstrings_not_code(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "m.py").write_text('"""A module."""\ndef f(x):\n    """Double."""\n    return 2 * x\n')
    (tmp_path / "b" / "m.py").write_text('"""Reworded."""\ndef f(x):  # why\n    """Twice x."""\n    return 2 * x\n')
    (tmp_path / "c" / "m.py").write_text('"""A module."""\ndef f(x):\n    """Double."""\n    return 3 * x\n')
    versions = [pipeline.code_version(tmp_path / name) for name in "abc"]
    assert versions[0] == versions[1] != versions[2]


def test_a_refused_promotion_is_recorded_for_any_student_name():
    """A student cut from the teacher's layers (`teacher-layers:0,1`) made the pipeline crash when its
    INT8 promotion was refused: MLflow refuses a comma in a tag key."""
    with mlflow.start_run():
        mlflow.set_tag(pipeline.refusal_tag("teacher-layers:0,1"), "refused")
        assert mlflow.get_run(mlflow.active_run().info.run_id).data.tags["promotion.cut-l0-1"] == "refused"
