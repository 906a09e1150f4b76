"""Bad input at every entry point, through the CLI, as a user would meet it.

Each case must exit with status 2, print exactly one `error:` line on stderr, last (argparse's
usage lines may come before it), and no traceback. Where the step had started its MLflow run, the
run must end FAILED (never left RUNNING), and nothing may be registered. Cases that need a
registered model work on a copy of `teacher_home`'s store (an imdb teacher registered as
kd-sentiment-teacher-imdb@champion), never on the original store.

Fresh processes (`python -m kd_sentiment.cli`, CASES) for everything that reads data, loads a
model or touches the store, and for one flag error of each validation layer (argparse, the
training config, a step's own arguments). Each process spends ~4-5 s importing torch and
transformers, so the selected cases run a few at a time in one module fixture and each test
checks its own outcome. The full matrix of bad sizes and rates (FLAG_CASES) goes through the same
`kd_sentiment.cli.main` in this process: those fail before any data, model or store is touched.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

TEACHER = "kd-sentiment-teacher-imdb"
FAST = ["--epochs", "1", "--max_length", "32", "--checkpoint_every", "0", "--batch_size", "16"]
TRAIN = b"text,label\ngreat film,1\nawful film,0\nloved it,1\nhated it,0\n"
TEST = b"text,label\nfine film,1\nbad film,0\n"
# A valid tiny dataset, with imdb's (the teacher's) labels, for cases whose error lies elsewhere.
MINI = {"mini/train.csv": TRAIN, "mini/validation.csv": TEST, "mini/test.csv": TEST,
        "mini/labels.txt": b"negative\npositive\n"}
ON_MINI = ["--dataset", "{dir}/mini", "--teacher", f"models:/{TEACHER}@champion"]


@dataclass
class Case:
    id: str
    args: list[str]                    # "{model}": the tiny model folder, "{dir}": the case's folder
    expect: list[str]                  # each must appear in the error line
    files: dict[str, bytes] = field(default_factory=dict)  # written under the case's folder first
    teacher: bool = False              # run in a copy of teacher_home's store
    failed_run: str | None = None      # the step whose run must exist and be FAILED


def data_case(id: str, expect: list[str], files: dict[str, bytes]) -> Case:
    return Case(id, ["teacher", "--model", "{model}", "--dataset", "{dir}/d"], expect, files)


CASES = [
    # ---------------------------------------------------------------- data (all fail before any run starts)
    Case("unknown-dataset", ["teacher", "--model", "{model}", "--dataset", "no_such_dataset"],
         ["Unknown dataset 'no_such_dataset'", "imdb", "tweeteval"]),
    data_case("missing-train-file", ["no train file"], {"d/test.csv": TEST}),
    data_case("empty-file", ["train.csv", "cannot be read"], {"d/train.csv": b"", "d/test.csv": TEST}),
    data_case("wrong-columns", ["train.csv", "missing column(s) ['text']", "text,label"],
              {"d/train.csv": b"sentence,label\ngreat,1\nawful,0\n", "d/test.csv": TEST}),
    Case("label-out-of-range", ["teacher", "--model", "{model}", "--dataset", "imdb", "--data_dir", "{dir}/data"],
         ["imdb/test.csv", "row 2", "label 2 is outside 0..1"],
         {"data/imdb/train.csv": TRAIN, "data/imdb/test.csv": b"text,label\nfine,1\nodd,2\n"}),
    data_case("string-labels", ["train.csv", "row 1", "'positive'", "not an integer"],
              {"d/train.csv": b"text,label\ngreat,positive\nawful,negative\n", "d/test.csv": TEST}),
    data_case("test-label-not-in-train", ["test.csv", "[2]", "do not occur in train"],
              {"d/train.csv": TRAIN, "d/test.csv": b"text,label\nfine,1\nmeh,2\n"}),
    data_case("empty-text", ["train.csv", "row 3", "text is empty"],
              {"d/train.csv": TRAIN.replace(b"loved it", b'""'), "d/test.csv": TEST}),
    data_case("whitespace-only-text", ["validation.csv", "row 1", "whitespace only"],
              {"d/train.csv": TRAIN, "d/validation.csv": b'text,label\n"   ",1\n', "d/test.csv": TEST}),
    data_case("non-utf8-bytes", ["train.csv", "line 4", "not valid UTF-8"],
              {"d/train.csv": TRAIN.replace(b"loved it", b"caf\xe9 film"), "d/test.csv": TEST}),
    # ---------------------------------------------------------------- models (fail after the run started)
    Case("model-folder-without-config", ["teacher", "--model", "{dir}/m", "--dataset", "{dir}/mini", *FAST],
         ["not a model folder", "config.json"], {**MINI, "m/notes.txt": b"not a model"}, failed_run="teacher"),
    Case("model-name-offline", ["teacher", "--model", "no-such-org/no-such-model", "--dataset", "{dir}/mini", *FAST],
         ["'no-such-org/no-such-model'", "Offline?", "local model folder"], MINI, failed_run="teacher"),
    Case("max-length-beyond-model", ["teacher", "--model", "{model}", "--dataset", "{dir}/mini", *FAST,
                                     "--max_length", "1000"],
         ["max_length=1000", "at most 512 tokens"], MINI, failed_run="teacher"),
    # ---------------------------------------------------------------- registry
    Case("distill-teacher-alias-missing", ["distill", "--student", "{model}", "--dataset", "{dir}/mini",
                                           "--teacher", f"models:/{TEACHER}@nosuch", *FAST],
         ["@nosuch' is not in the model registry", "teacher step on dataset=", "teacher to"], MINI, teacher=True),
    Case("distill-teacher-with-other-labels", ["distill", "--student", "{model}", "--dataset", "tweeteval",
                                               "--teacher", f"models:/{TEACHER}@champion", "--max_train_samples",
                                               "30", "--max_eval_samples", "30", *FAST],
         ["predicts [negative,positive]", "'negative', 'neutral', 'positive'"], teacher=True),
    Case("distill-student-not-a-model", ["distill", "--student", "{dir}/m", *ON_MINI, *FAST],
         ["not a model folder"], {**MINI, "m/notes.txt": b"not a model"}, teacher=True, failed_run="distill"),
    Case("distill-transfer-file-without-text-column", ["distill", "--student", "{model}", *ON_MINI, *FAST,
                                                        "--transfer_set", "{dir}/extra.csv"],
         ["extra.csv", "no `text` column"], {**MINI, "extra.csv": b"sentence\nhello\n"}, teacher=True,
         failed_run="distill"),
    Case("quantize-model-missing", ["quantize", "--model", f"models:/{TEACHER}@nosuch", "--dataset", "{dir}/mini"],
         [f"models:/{TEACHER}@nosuch' is not in the model registry"], MINI, teacher=True),
    Case("promote-model-missing", ["promote", "no-such-model", "--version", "1"],
         ["models:/no-such-model/1' is not in the model registry"], teacher=True),
    Case("promote-without-gate", ["promote", TEACHER, "--version", "1"],
         ["no gate.* measurements", "Set force"], teacher=True),
    Case("pipeline-config-misspelled-key", ["pipeline", "--config", "{dir}/typo.yaml", "--dataset", "imdb"],
         ["typo.yaml", "unknown key(s) ['epoch'] in section 'teacher'", "valid keys:"],
         {"typo.yaml": b"teacher: {epoch: 3}\n"}),
    Case("pipeline-config-value-unreadable", ["pipeline", "--config", "{dir}/bad.yaml", "--dataset", "imdb"],
         ["bad.yaml", "section 'distill'", "epochs", "expected a whole number, got 'two'"],
         {"bad.yaml": b"distill: {epochs: two}\n"}),
    # (one flag error per validation layer: taken from FLAG_CASES below)
]


# (id, argv, texts the error line must hold); "{model}"/"{dir}" as in CASES; files from FLAG_FILES.
FLAG_CASES = [
    ("max-train-samples-zero", ["teacher", "--max_train_samples", "0"],
     ["--max_train_samples", "must be a positive number"]),
    ("max-eval-samples-negative", ["distill", "--max_eval_samples", "-5"], ["--max_eval_samples", "positive"]),
    ("validation-size-zero", ["teacher", "--validation_size", "0"], ["--validation_size", "fraction"]),
    ("epochs-zero", ["teacher", "--epochs", "0"], ["epochs=0", "greater than 0"]),
    ("epochs-fractional", ["teacher", "--epochs", "1.5"], ["--epochs", "whole number"]),
    ("lr-negative", ["teacher", "--lr", "-1"], ["lr=-1", "greater than 0"]),
    ("batch-size-zero", ["distill", "--batch_size", "0"], ["batch_size=0", "greater than 0"]),
    ("max-length-zero", ["teacher", "--max_length", "0"], ["max_length=0", "greater than 0"]),
    ("alpha-above-one", ["distill", "--alpha", "1.5"], ["alpha=1.5", "[0, 1]"]),
    ("alpha-negative", ["distill", "--alpha", "-0.1"], ["alpha=-0.1", "[0, 1]"]),
    ("temperature-zero", ["distill", "--temperature", "0"], ["temperature=0", "greater than 0"]),
    ("warmup-ratio-one", ["teacher", "--warmup_ratio", "1"], ["warmup_ratio=1", "[0, 1)"]),
    ("mixed-precision-unknown", ["teacher", "--mixed_precision", "fp8"], ["--mixed_precision", "invalid choice: 'fp8'"]),
    ("study-seeds-text", ["study", "calibration", "--seeds", "42,x"], ["seeds='42,x'", "whole numbers"]),
    ("study-seeds-repeated", ["study", "calibration", "--seeds", "7,7"], ["seeds='7,7'", "each once"]),
    ("benchmark-batch-size-zero", ["benchmark", "--batch_sizes", "0"], ["batch_sizes='0'", "at least 1"]),
    ("benchmark-batch-size-text", ["benchmark", "--batch_sizes", "1,big"], ["batch_sizes='1,big'", "integers"]),
    ("benchmark-time-budget-zero", ["benchmark", "--time_budget", "0"], ["time_budget", "positive"]),
    ("quantize-calibration-samples-zero",
     ["quantize", "--model", f"models:/{TEACHER}@champion", "--calibration_samples", "0"],
     ["calibration_samples=0", "positive"]),
    ("quantize-sensitivity-texts-above-calibration",
     ["quantize", "--model", f"models:/{TEACHER}@champion", "--sensitivity_texts", "400"],
     ["sensitivity_texts=400", "calibration_samples=300"]),
    ("quantize-min-agreement-one", ["quantize", "--model", f"models:/{TEACHER}@champion", "--min_agreement", "1"],
     ["min_agreement=1", "[0, 1)", "lower confidence bound"]),
    ("quantize-optimize-level-unknown", ["quantize", "--model", f"models:/{TEACHER}@champion", "--optimize_level", "5"],
     ["--optimize_level", "invalid choice: 5"]),
    ("promote-negative-margin", ["promote", TEACHER, "--version", "1", "--margin", "-1"], ["margin=-1", "negative"]),
    ("alias-invalid", ["teacher", "--alias", "1st place"], ["alias='1st place'"]),
    ("max-train-samples-below-classes", ["teacher", "--model", "{model}", "--dataset", "{dir}/d",
                                         "--validation_size", "2", "--max_train_samples", "1"],
     ["max_train_samples=1", "fewer than the 2 classes"]),
    ("validation-size-takes-all-train", ["teacher", "--model", "{model}", "--dataset", "{dir}/d",
                                         "--validation_size", "4"], ["validation_size=4", "none to train on"]),
    ("label-without-name-in-labels-txt", ["teacher", "--model", "{model}", "--dataset", "{dir}/named"],
     ["train.csv", "row 5", "label 2 has no name in", "labels.txt"]),
    ("output-dir-is-a-file", ["teacher", "--model", "{model}", "--dataset", "{dir}/d", "--validation_size", "2",
                              "--output_dir", "{dir}/f"], ["output_dir=", "not a folder"]),
]
# One flag error of each validation layer (argparse, the training config, a step's own arguments)
# also runs in a fresh process, as a user meets it.
CASES += [Case(id, argv, expect) for id, argv, expect in FLAG_CASES
          if id in ("max-train-samples-zero", "epochs-zero", "benchmark-batch-size-zero")]
FLAG_FILES = {"d/train.csv": TRAIN, "d/test.csv": TEST, "f": b"a file",
              "named/train.csv": TRAIN + b"so-so,2\n", "named/test.csv": TEST, "named/labels.txt": b"negative\npositive\n"}


def _expand(value: str, model: Path, folder: Path) -> str:
    return value.replace("{model}", str(model)).replace("{dir}", str(folder))


def _run_case(case: Case, folder: Path, model: Path, teacher_home: Path | None):
    folder.mkdir(parents=True)
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    if case.teacher:  # the store (runs, registry) is copied; its artifacts stay where they are, read-only
        shutil.copy(teacher_home / "mlflow.db", folder / "mlflow.db")
    return run_cli(*[_expand(a, model, folder) for a in case.args], cwd=folder, timeout=300)


@pytest.fixture(scope="module")
def outcomes(request, tiny_model, tmp_path_factory) -> dict:
    """case id -> (CompletedProcess, its folder), for the cases selected in this session."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    cases = [c for c in CASES if c.id in wanted]
    home = request.getfixturevalue("teacher_home")[0] if any(c.teacher for c in cases) else None
    root = tmp_path_factory.mktemp("bad-input")
    # An in-process step before this (teacher_home) leaves MLFLOW_EXPERIMENT_ID exported by
    # mlflow.set_experiment; a child would take it for `mlflow run`'s and use that experiment id.
    with pytest.MonkeyPatch.context() as env, ThreadPoolExecutor(max_workers=min(3, (os.cpu_count() or 1) + 1)) as pool:
        env.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        env.delenv("MLFLOW_RUN_ID", raising=False)
        futures = {c.id: pool.submit(_run_case, c, root / c.id, tiny_model, home) for c in cases}
        return {case_id: (future.result(), root / case_id) for case_id, future in futures.items()}


@pytest.fixture(scope="module")
def before(request) -> dict:
    """teacher_home's runs and registered versions (with aliases), which every copy starts from."""
    home = request.getfixturevalue("teacher_home")[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    runs = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    return {"runs": runs,
            "versions": {(v.name, v.version, tuple(sorted(v.aliases))) for v in client.search_model_versions()}}


def test_cases_have_unique_ids():
    assert len({c.id for c in CASES}) == len(CASES)


def check_one_clear_line(code, stderr: str, expect: list[str]) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    line = errors[0]
    assert line.startswith("kd-sentiment ") and line == stderr.rstrip("\n").splitlines()[-1], stderr[-3000:]
    for text in expect:
        assert text in line, f"{text!r} not in: {line}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(case, outcomes, request):
    out, folder = outcomes[case.id]
    before = request.getfixturevalue("before") if case.teacher else None
    check_one_clear_line(out.returncode, out.stderr, case.expect)

    # The store: no run left RUNNING, the step's run FAILED where it had started, nothing registered.
    if not (folder / "mlflow.db").exists():
        assert case.failed_run is None, "the run should have started"
        return
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    step_runs = [r for r in runs if r.data.tags.get("kd_sentiment.step") == case.failed_run]
    new_runs = [r for r in step_runs if r.info.run_id not in before["runs"]] if case.teacher else step_runs
    if case.failed_run:
        assert [r.info.status for r in new_runs] == ["FAILED"], [(r.info.run_name, r.info.status) for r in new_runs]
    versions = {(v.name, v.version, tuple(sorted(v.aliases))) for v in client.search_model_versions()}
    assert versions == (before["versions"] if case.teacher else set())


@pytest.mark.parametrize("argv, expect", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_bad_sizes_and_rates_exit_2_with_one_clear_line(argv, expect, tiny_model, tmp_path, capsys):
    from kd_sentiment import cli

    for name, content in FLAG_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:  # any other exception is a bug, and fails here
        cli.main([_expand(a, tiny_model, tmp_path) for a in argv])
    check_one_clear_line(exit_info.value.code, capsys.readouterr().err, expect)
    assert not list(tmp_path.glob("mlruns/*/*")), "nothing may be logged"
