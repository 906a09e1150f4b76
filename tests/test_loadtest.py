"""The bounded load test (kd_sentiment/loadtest.py) against a real `mlflow models serve`, and its bounds."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pandas as pd
import pytest

from kd_sentiment import export, runtime
from kd_sentiment.errors import UserError
from kd_sentiment.loadtest import invocations_url, run_load_test, served

from conftest import DATA_DIR
from test_export import LABELS, tiny_classifier
from test_serving import MAX_LENGTH, free_port


def test_served_model_under_concurrent_load_with_malformed_requests(tiny_model, tmp_path):
    tiny_classifier(tiny_model, tmp_path / "hf")
    fp32 = export.export_onnx(tmp_path / "hf", tmp_path / "fp32")
    with mlflow.start_run():
        uri = runtime.log_onnx_pyfunc(fp32, fp32.parent, LABELS, MAX_LENGTH, ["great movie", "awful"])
    texts = pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "test.csv", keep_default_na=False)["text"].iloc[:50].tolist()

    with served(uri, workers=2) as url:  # the same server `kd-sentiment loadtest` starts
        result = run_load_test(url, texts, clients=4, requests_per_client=25, malformed_every=5, timeout_s=120)

    assert result["errors"] == 0, result["error_samples"]
    assert result["stopped_at_timeout"] == 0
    assert result["clients"] == 4 and result["requests"] == 100
    assert result["malformed_sent"] == 4 * 5  # every 5th of 25 per client, all three kinds rotated
    assert result["malformed_rejected_4xx"] == result["malformed_sent"]
    assert result["good_sent"] == 80 and result["ok"] == result["good_sent"]
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["throughput_per_s"] > 0 and result["duration_s"] > 0


@pytest.mark.parametrize("url", ["http://10.0.0.5:5000", "http://example.com/invocations", "http://0.0.0.0:5000",
                                 "https://192.168.1.2:8080", "ftp://127.0.0.1:21", "127.0.0.1:5000"])
def test_non_loopback_or_non_http_urls_are_refused_before_any_request(url):
    with pytest.raises(UserError, match="loopback|expected http"):
        run_load_test(url, ["hello"], clients=1, requests_per_client=1)


def test_loopback_urls_are_accepted_and_point_at_invocations():
    assert invocations_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000/invocations"
    assert invocations_url("http://127.8.9.1:5000/invocations") == "http://127.8.9.1:5000/invocations"
    assert invocations_url("http://localhost:5000/") == "http://localhost:5000/invocations"
    assert invocations_url("http://[::1]:5000") == "http://[::1]:5000/invocations"


def test_bad_arguments_are_user_errors():
    for kwargs in ({"texts": []}, {"texts": [1]}, {"clients": 0}, {"requests_per_client": 0},
                   {"malformed_every": -1}, {"warmup_requests": -1}, {"timeout_s": 0}):
        with pytest.raises(UserError):
            run_load_test("http://127.0.0.1:9", **{"texts": ["x"], **kwargs})


def test_no_server_counts_every_request_as_an_error():
    result = run_load_test(f"http://127.0.0.1:{free_port()}", ["x"], clients=2, requests_per_client=3,
                           malformed_every=0, timeout_s=20)
    assert result["requests"] == 6 and result["errors"] == 6 and result["ok"] == 0
    assert result["p50_ms"] is None and "Error" in result["error_samples"][0]


class _SlowHandler(BaseHTTPRequestHandler):
    """Answers 200 with a valid prediction after a delay; 500 for `{}`; accepts anything else."""

    delay = 0.0

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.bodies.append(body)
        time.sleep(self.delay)
        status, text = (500, b'{"error": "boom"}') if body == b"{}" else (200, b'{"predictions": [{"label": "x"}]}')
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    servers = []

    def start(delay: float, bodies: list | None = None) -> int:
        handler = type("Handler", (_SlowHandler,), {"delay": delay, "bodies": [] if bodies is None else bodies})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_malformed_requests_not_rejected_with_4xx_are_errors(fake_server):
    port = fake_server(0.0)
    result = run_load_test(f"http://127.0.0.1:{port}", ["x"], clients=1, requests_per_client=9, malformed_every=1,
                           timeout_s=20)
    # all nine malformed; the fake server answers 200 to two kinds and 500 to `{}`: none is a 4xx
    assert result["malformed_sent"] == 9 and result["malformed_rejected_4xx"] == 0 and result["errors"] == 9


def test_hard_stop_at_timeout(fake_server):
    port = fake_server(0.4)
    started = time.monotonic()
    result = run_load_test(f"http://127.0.0.1:{port}", ["x"], clients=2, requests_per_client=1000,
                           malformed_every=0, timeout_s=1.5)
    assert time.monotonic() - started < 10
    assert result["stopped_at_timeout"] == 1
    assert 2 <= result["requests"] < 2 * 1000
    assert result["errors"] == 0, result["error_samples"]  # slow is not broken: requests cut at the stop are not errors
    assert result["ok"] == result["requests"]


def test_warmup_requests_are_sent_first_and_not_counted(fake_server):
    bodies = []
    port = fake_server(0.0, bodies)
    result = run_load_test(f"http://127.0.0.1:{port}", ["first", "second"], clients=1, requests_per_client=4,
                           malformed_every=0, timeout_s=20, warmup_requests=3)
    assert len(bodies) == 3 + 4 and result["requests"] == result["ok"] == 4 and result["errors"] == 0
    assert [json.loads(b)["inputs"] for b in bodies[:3]] == [["first"], ["second"], ["first"]]
