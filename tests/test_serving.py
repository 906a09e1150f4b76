"""`mlflow models serve` on the logged ONNX pyfunc, over real HTTP on a loopback port."""
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import mlflow

from kd_sentiment.deploy import export, int8_recipes, runtimes
from kd_sentiment.core import processes

from conftest import wait_until_ok
from test_export import LABELS, tiny_classifier

MAX_LENGTH = 64
PROB_COLUMNS = [f"prob_{name}" for name in LABELS]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body, content_type: str = "application/json") -> tuple[int, str]:
    """POST `body` (a JSON-able object, or raw bytes sent as is) to /invocations; (status, response text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def predictions(status: int, text: str, n: int) -> list[dict]:
    assert status == 200, text
    rows = json.loads(text)["predictions"]
    assert len(rows) == n
    for row in rows:
        assert row["label"] in LABELS
        assert abs(sum(row[c] for c in PROB_COLUMNS) - 1) < 1e-5
        assert row["score"] == max(row[c] for c in PROB_COLUMNS)
    return rows


def test_served_model_answers_good_requests_and_rejects_bad_ones(tiny_model, tmp_path):
    tiny_classifier(tiny_model, tmp_path / "hf")
    export.export_onnx(tmp_path / "hf", tmp_path / "fp32")
    export.optimize_onnx(tmp_path / "fp32", tmp_path / "fused")
    int8, _ = int8_recipes.quantize_onnx(tmp_path / "fused", tmp_path / "int8")
    with mlflow.start_run():
        uri = runtimes.log_onnx_pyfunc(int8, int8.parent, LABELS, MAX_LENGTH, ["great movie", "awful"])
    # The runtime session travels with the model (served_model.py imports it), not from an installed kd_sentiment.
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert (local / "code" / "onnx_session.py").read_text() == Path(runtimes.SESSION_CODE).read_text()
    # The served environment carries uvicorn's C HTTP parser and event loop (it falls back to pure Python).
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text()
    lines = requirements.splitlines()
    assert f"httptools=={version('httptools')}" in lines, requirements
    assert f'uvloop=={version("uvloop")}; sys_platform != "win32"' in lines, requirements

    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        # Own session, so the whole server (it may fork workers) can be stopped by its group id.
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri,
                                   "--env-manager", "local", "-p", str(port), "--host", "127.0.0.1", "--workers", "2"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/ping", server, log, seconds=120)

        # The signature declares the input as text: a list of strings under `inputs`.
        info = mlflow.models.get_model_info(uri)
        assert [spec.type.name for spec in info.signature.inputs.inputs] == ["string"]
        rows = predictions(*post(port, {"inputs": ["great movie", "awful"]}), n=2)
        # A typed model takes `inputs` only; MLflow's 400 says so.
        status, text = post(port, {"dataframe_split": {"columns": ["text"], "data": [["great movie"]]}})
        assert status == 400 and "'inputs' key" in text, text

        # malformed requests: 4xx with a message naming what is wrong, or a defined answer
        status, text = post(port, b'{"inputs": ["great movie"')
        assert status == 400, text
        status, text = post(port, {"inputs": [1, 2]})  # not cast to the texts "1" and "2"
        assert status == 400 and "Expected type str, but got int" in text, text
        status, text = post(port, {"inputs": ["fine", None]})  # not the text "None"
        assert status == 400 and "Expected type str, but got NoneType" in text, text
        status, text = post(port, {"inputs": ["fine", True]})
        assert status == 400 and "Expected type str, but got bool" in text, text
        predictions(*post(port, {"inputs": ["", "   "]}), n=2)  # blank texts: predicted from special tokens alone
        predictions(*post(port, {"inputs": ["great movie " * 1700]}), n=1)  # 20,400 characters: truncated
        status, text = post(port, b"great movie", content_type="text/plain")
        assert status == 415, text
        status, text = post(port, {})
        assert status == 400, text

        assert predictions(*post(port, {"inputs": ["great movie", "awful"]}), n=2) == rows  # still serving
    finally:
        processes.stop(server, group=True)
    # `--workers 2` given as a flag (not as MLFLOW_MODELS_WORKERS) reached both workers' thread sizing
    threads = max(1, os.cpu_count() // 2)
    line = f"{threads} runtime thread(s) per process ({os.cpu_count()} cores / 2 server process(es), from uvicorn --workers)"
    assert log.read_text().count(line) == 2, log.read_text()[-3000:]
