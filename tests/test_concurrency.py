"""Every runtime the project serves or measures answers each caller with its own answer when many
threads call at once (MLflow's scoring server runs `predict` in a thread pool), and a served model
sizes its threads however the server was started."""
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest

from kd_sentiment.deploy import export, int8_recipes, runtimes, served_model
from kd_sentiment.core import machine

from conftest import DATA_DIR
from test_export import LABELS, tiny_classifier

MAX_LENGTH = 64
THREADS, CALLS = 8, 240  # callers at once, and calls in all: enough that overlapping calls are certain


@pytest.fixture(scope="module")
def tweets():
    return pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "test.csv", keep_default_na=False)["text"].iloc[:40].tolist()


@pytest.fixture(scope="module")
def graphs(tiny_model, tmp_path_factory, tweets):
    """Every (name, graph, runtime, precision) the project deploys, on the tiny classifier."""
    tmp = tmp_path_factory.mktemp("graphs")
    tiny_classifier(tiny_model, tmp / "hf")
    fp32 = export.export_onnx(tmp / "hf", tmp / "fp32")
    fused = export.optimize_onnx(tmp / "fp32", tmp / "fused")
    dynamic, _ = int8_recipes.quantize_onnx(tmp / "fused", tmp / "dynamic")
    static, _ = int8_recipes.quantize_onnx(tmp / "fp32", tmp / "static", mode="static", calibration_texts=tweets,
                                           max_length=MAX_LENGTH)
    found = [("ort-f32", fused, "onnxruntime", "f32"), ("ort-dynamic", dynamic, "onnxruntime", "f32"),
             ("ort-static", static, "onnxruntime", "f32"), ("openvino-f32", fp32, "openvino", "f32"),
             ("openvino-int8", static, "openvino", "f32")]
    if machine.bf16_capable(machine.cpu_features()):
        found.append(("openvino-bf16", fp32, "openvino", "bf16"))
    return {name: (path, rt, precision, fp32.parent) for name, path, rt, precision in found}


def at_once(call, jobs: list) -> list:
    """`call(job)` for every job from THREADS threads at once; results in job order (exceptions raised)."""
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(call, jobs))


def jobs_of(texts: list[str]) -> list[list[str]]:
    """CALLS requests of one to three texts each, every text in many of them, in a fixed shuffled order."""
    rng = np.random.default_rng(0)
    return [[texts[i] for i in rng.choice(len(texts), size=rng.integers(1, 4), replace=False)] for _ in range(CALLS)]


@pytest.mark.parametrize("name", ["ort-f32", "ort-dynamic", "ort-static", "openvino-f32", "openvino-int8",
                                  "openvino-bf16"])
def test_served_model_gives_every_concurrent_caller_its_own_answer(graphs, tweets, name):
    if name not in graphs:
        pytest.skip(f"{name}: this CPU does not compute bf16 natively")
    path, rt, precision, tokenizer_dir = graphs[name]
    with mlflow.start_run():
        uri = runtimes.log_onnx_pyfunc(path, tokenizer_dir, LABELS, MAX_LENGTH, tweets[:2], runtime=rt,
                                      precision=precision)
    model = mlflow.pyfunc.load_model(uri)
    jobs = jobs_of(tweets)
    alone = [model.predict(texts) for texts in jobs]  # each call made by one caller, one call at a time
    answers = at_once(model.predict, jobs)
    for texts, answer, expected in zip(jobs, answers, alone):
        # the same call's answer: same labels, same numbers (a dynamic INT8 graph's depend on the texts
        # that share a call, which is why the reference is the same call, not each text alone)
        assert list(answer["label"]) == list(expected["label"]), (name, texts)
        np.testing.assert_allclose(answer.drop(columns="label").to_numpy(float),
                                   expected.drop(columns="label").to_numpy(float), atol=1e-5)


@pytest.mark.parametrize("name", ["ort-dynamic", "openvino-f32", "openvino-int8"])
def test_measuring_runner_gives_every_concurrent_caller_its_own_logits(graphs, tweets, name):
    path, rt, precision, tokenizer_dir = graphs[name]
    runner = runtimes.OnnxClassifier(path, tokenizer_dir, runtime=rt, precision=precision)
    alone = {text: runner.predict_logits([text], MAX_LENGTH)[0] for text in tweets}
    answers = at_once(lambda text: runner.predict_logits([text], MAX_LENGTH)[0], tweets * 6)
    for text, logits in zip(tweets * 6, answers):
        np.testing.assert_allclose(logits, alone[text], atol=1e-5)


@pytest.mark.parametrize("argv, environ, expected", [
    (["/env/bin/uvicorn", "--host", "127.0.0.1", "--workers", "2", "mlflow.pyfunc.scoring_server.app:app"], {},
     (2, "uvicorn --workers")),
    (["/env/bin/uvicorn", "--workers=4", "app"], {}, (4, "uvicorn --workers")),
    (["/env/bin/uvicorn", "app"], {"WEB_CONCURRENCY": "3"}, (3, "uvicorn's default workers")),
    (["/env/bin/uvicorn", "--workers", "1", "app"], {"MLFLOW_MODELS_WORKERS": "2"}, (2, "$MLFLOW_MODELS_WORKERS")),
    (["gunicorn", "-w", "4"], {"__pyfunc_model_path__": "/m"}, (1, None)),  # a server it cannot read
    (["pytest"], {}, (1, "loaded in-process")),
])
def test_server_processes_are_read_from_the_environment_or_uvicorns_command_line(argv, environ, expected):
    assert served_model.server_processes(argv, environ) == expected


def test_threads_are_the_cores_shared_among_server_processes_and_an_unknown_server_is_warned_about(
        monkeypatch, caplog, capsys):
    monkeypatch.setattr(served_model.os, "cpu_count", lambda: 8)
    uvicorn = ["/env/bin/uvicorn", "--workers", "2", "mlflow.pyfunc.scoring_server.app:app"]
    assert served_model.intra_op_threads(0, uvicorn, {}) == 4
    assert "4 runtime thread(s) per process (8 cores / 2 server process(es), from uvicorn --workers)" in \
        capsys.readouterr().err
    assert served_model.intra_op_threads(0, ["pytest"], {}) == 8
    assert served_model.intra_op_threads(3, uvicorn, {}) == 3  # the model's own setting
    assert served_model.intra_op_threads(3, uvicorn, {"KD_SENTIMENT_ORT_THREADS": "1"}) == 1  # the user's, above all
    assert not caplog.records
    assert served_model.intra_op_threads(0, ["gunicorn"], {"__pyfunc_model_path__": "/m"}) == 8
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "MLFLOW_MODELS_WORKERS" in record.getMessage()


def test_openvino_never_pins_its_threads_to_cores(graphs):
    """OpenVINO pins inference threads by default; in Spark's Python workers (one runtime thread each)
    that put every task on the same core. The session turns pinning off."""
    from kd_sentiment.deploy.onnx_session import Session

    path, _, _, _ = graphs["openvino-f32"]
    assert Session(path, "openvino", "f32", threads=1).compiled.get_property("ENABLE_CPU_PINNING") is False
