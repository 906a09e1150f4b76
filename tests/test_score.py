"""`kd-sentiment score`: a registered model labels files through real Spark (`local[2]`) and
`mlflow.pyfunc.spark_udf`; its output is the model's own in-process answer, row by row."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark", reason="Spark tests need the spark extra: pip install -e '.[spark]'")

from kd_sentiment.deploy import export, runtimes, score  # noqa: E402
from kd_sentiment.core.errors import UserError  # noqa: E402
from kd_sentiment.core.parameters import ScoreArgs  # noqa: E402
from kd_sentiment.deploy.served_model import THREADS_ENV  # noqa: E402

from conftest import DATA_DIR  # noqa: E402
from test_export import LABELS, tiny_classifier  # noqa: E402

NAME = "kd-sentiment-tiny-tweeteval-int8"
URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory) -> str:
    """A tracking store holding a tiny ONNX pyfunc registered as NAME@champion; its URI."""
    home = tmp_path_factory.mktemp("score-home")
    uri = f"sqlite:///{home}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("score-models")
    tiny_classifier(tiny_model, home / "hf")
    fp32 = export.export_onnx(home / "hf", home / "fp32")
    with mlflow.start_run():
        model_uri = runtimes.log_onnx_pyfunc(fp32, fp32.parent, LABELS, 64, ["great movie", "awful"])
    version = mlflow.register_model(model_uri, NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
    # set_tracking_uri and set_experiment exported these; left set, every later test module's steps would
    # write to this store and experiment
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return uri


@pytest.fixture(scope="module")
def spark():
    """One local[2] session for the module (a session starts in about 10 s); `score` reuses it."""
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
               .config("spark.pyspark.python", sys.executable).getOrCreate())
    yield session
    session.stop()


@pytest.fixture
def in_store(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


@pytest.fixture(scope="module")
def tweets() -> pd.DataFrame:
    """300 real tweets with an id and their gold label (a column the output also has)."""
    frame = pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "test.csv", keep_default_na=False).iloc[:300]
    return pd.DataFrame({"id": np.arange(1000, 1300), "text": frame["text"], "label": frame["label"]})


def write(frame: pd.DataFrame, path: Path, kind: str) -> Path:
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def last_run():
    """The newest `score` run of the module's store, whatever its status."""
    return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string="tags.`kd_sentiment.step` = 'score'", run_view_type=3)[0]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_spark_output_is_the_models_in_process_answer_row_by_row(spark, in_store, tweets, tmp_path, kind):
    # two files of a folder, read in name order: the rows of b follow those of a
    folder = tmp_path / "in"
    folder.mkdir()
    write(tweets.iloc[150:], folder / f"b.{kind}", kind)
    write(tweets.iloc[:150], folder / f"a.{kind}", kind)
    result = score.run(ScoreArgs(input=str(folder), output=str(tmp_path / "out"), model=URI, spark_master="local[2]",
                                 batch_rows=64))

    out = pd.read_parquet(tmp_path / "out")
    expected = mlflow.pyfunc.load_model(URI).predict(tweets["text"].tolist())
    assert len(out) == len(tweets) == result["rows"] and result["bad_rows"] == 0
    # the input's order; CSV values stay text (Spark reads no types into them)
    assert out["id"].astype(int).tolist() == tweets["id"].tolist()
    assert out["label_input"].astype(int).tolist() == tweets["label"].tolist()  # the input's own `label`, kept
    assert out["label"].tolist() == expected["label"].tolist()
    for column in ["score"] + [f"prob_{name}" for name in LABELS]:
        np.testing.assert_allclose(out[column], expected[column], atol=1e-5)
    assert out[score.ERROR].isna().all()
    assert not any(c.startswith("_kd") for c in out.columns)

    run = mlflow.get_run(last_run().info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model_name"] == NAME and run.data.params["model_version"] == "1"
    assert run.data.params["spark_master_url"] == "local[2]" and run.data.params["spark_version"]
    assert run.data.metrics["rows"] == 300 and run.data.metrics["texts_per_s"] > 0
    assert {d.tags[0].value for d in run.inputs.dataset_inputs} == {"input", "predictions"}


def bad_tweets(tweets: pd.DataFrame) -> str:
    """JSON Lines with every kind of row without a text, and a blank line (not a row)."""
    good = [json.dumps({"id": int(i), "text": t}) for i, t in zip(tweets["id"][:20], tweets["text"][:20])]
    bad = ['{"id": 1, "text": 5}', '{"id": 2, "text": null}', '{"id": 3}', "not json", '{"id": 4, "text": ["a"]}']
    return "\n".join(good[:5] + bad[:2] + [""] + good[5:12] + bad[2:] + good[12:]) + "\n"


def test_bad_rows_are_refused_by_file_row_and_column_and_the_run_fails(spark, in_store, tweets, tmp_path):
    frame = tweets.iloc[:40].copy()
    frame.loc[frame.index[6], "text"] = None  # an empty CSV field: row 7 of the data
    path = write(frame, tmp_path / "tweets.csv", "csv")
    with pytest.raises(UserError) as err:
        score.run(ScoreArgs(input=str(path), output=str(tmp_path / "out"), model=URI))
    assert f"1 of 40 rows have no text in column 'text'; the first: {path} row 7: missing (null)" in str(err.value)
    assert last_run().info.status == "FAILED"
    assert not (tmp_path / "out").exists() and list(tmp_path.glob("out.partial-*")) == []


def test_flagged_bad_rows_are_written_with_their_error_not_dropped(spark, in_store, tweets, tmp_path):
    path = tmp_path / "tweets.jsonl"
    path.write_text(bad_tweets(tweets))
    result = score.run(ScoreArgs(input=str(path), output=str(tmp_path / "out"), model=URI, bad_rows="flag"))

    out = pd.read_parquet(tmp_path / "out")
    assert len(out) == 25 and result["rows"] == 25 and result["bad_rows"] == 5
    errors = out[score.ERROR].tolist()
    assert errors[5:7] == ["not text (bigint)", "missing (null)"]
    assert errors[14:17] == ["missing (no such key)", "not a JSON object", "not text (array<string>)"]
    bad = out[score.ERROR].notna()
    assert out.loc[bad, "label"].isna().all() and out.loc[bad, "score"].isna().all()
    good = out[~bad]
    assert good["text"].tolist() == tweets["text"][:20].tolist()
    assert good["label"].tolist() == mlflow.pyfunc.load_model(URI).predict(good["text"].tolist())["label"].tolist()
    assert mlflow.get_run(last_run().info.run_id).data.metrics["bad_rows"] == 5


def test_a_non_text_column_is_refused_as_a_whole(spark, in_store, tmp_path):
    path = write(pd.DataFrame({"text": [1, 2, 3]}), tmp_path / "numbers.parquet", "parquet")
    with pytest.raises(UserError, match=r"3 of 3 rows .*numbers.parquet row 1: not text \(bigint\)"):
        score.run(ScoreArgs(input=str(path), output=str(tmp_path / "out"), model=URI))
    with pytest.raises(UserError, match=r"no column 'review' \(columns: \['text'\]\)"):
        score.run(ScoreArgs(input=str(path), output=str(tmp_path / "out"), model=URI, text_column="review"))


def test_the_model_gets_one_runtime_thread_per_task_slot(spark, in_store, tweets, tmp_path, monkeypatch):
    """Wiring: the UDF's environment carries KD_SENTIMENT_ORT_THREADS = spark.task.cpus, which served_model.py reads."""
    seen = {}
    real = mlflow.pyfunc.spark_udf

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "spark_udf", spy)
    path = write(tweets.iloc[:10], tmp_path / "t.parquet", "parquet")
    score.run(ScoreArgs(input=str(path), output=str(tmp_path / "out"), model=URI))
    assert seen["extra_env"] == {THREADS_ENV: spark.conf.get("spark.task.cpus", "1")} == {THREADS_ENV: "1"}
    assert seen["env_manager"] == "local"


def test_an_existing_output_is_refused_and_kept(spark, in_store, tweets, tmp_path):
    path = write(tweets.iloc[:10], tmp_path / "t.csv", "csv")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="output .*out exists"):
        score.run(ScoreArgs(input=str(path), output=str(tmp_path / "out"), model=URI))
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_a_job_killed_half_way_leaves_no_output_and_the_next_one_cleans_up(spark, in_store, tweets, tmp_path):
    texts = pd.concat([tweets] * 100, ignore_index=True)  # 30,000 rows: several seconds of scoring
    path = write(texts, tmp_path / "many.parquet", "parquet")
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "kd_sentiment.cli", "score", "--input", str(path), "--output",
                            str(out), "--model", URI, "--spark_master", "local[2]"], cwd=tmp_path,
                           env={**os.environ, "MLFLOW_TRACKING_URI": in_store}, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("out.partial-*/_temporary")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    # the write has begun (its job scores the rows): kill the job and its Spark JVM at once, nothing can clean up
    assert job.poll() is None, "the job ended before it started writing"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not out.exists() and list(tmp_path.glob("out.partial-*"))  # killed mid-write: the partial folder stays

    score.run(ScoreArgs(input=str(path), output=str(out), model=URI))
    assert len(pd.read_parquet(out)) == len(texts)
    assert list(tmp_path.glob("out.partial-*")) == []


def test_the_default_model_is_the_datasets_one_int8_champion(in_store):
    from kd_sentiment.core import tracking

    tracking.configure()
    assert score.default_model("tweeteval") == URI
    with pytest.raises(UserError, match=r"no single INT8 champion for imdb \(none\)"):
        score.default_model("imdb")


@pytest.mark.parametrize("name, message", [("missing.csv", "no such file"), ("notes.txt", "found \\['.txt'\\]")])
def test_unreadable_inputs_are_refused_before_spark_starts(tmp_path, name, message):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=message):
        score.input_format(str(tmp_path / name))
