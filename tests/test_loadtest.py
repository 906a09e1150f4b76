"""The bounded load test (kd_sentiment/measure/loadtest.py) against a real `mlflow models serve`, and its bounds."""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import numpy as np
import pandas as pd
import pytest

from kd_sentiment.deploy import export, runtimes
from kd_sentiment.core.errors import UserError
from kd_sentiment.measure import loadtest
from kd_sentiment.measure.loadtest import invocations_url, poisson_schedule, run_load_test, run_open_loop, served

from conftest import DATA_DIR
from test_export import LABELS, tiny_classifier
from test_serving import MAX_LENGTH, free_port


@pytest.mark.parametrize("rt, workers", [("openvino", 1), ("onnxruntime", 2)])
def test_served_model_under_concurrent_load_answers_every_request_with_its_own_text(tiny_model, tmp_path, rt,
                                                                                  workers):
    """4 clients at once against one server process (the scoring server's thread pool) and against two;
    every answer compared with the in-process answer for its text."""
    tiny_classifier(tiny_model, tmp_path / "hf")
    fp32 = export.export_onnx(tmp_path / "hf", tmp_path / "fp32")
    with mlflow.start_run():
        uri = runtimes.log_onnx_pyfunc(fp32, fp32.parent, LABELS, MAX_LENGTH, ["great movie", "awful"], runtime=rt)
    texts = pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "test.csv", keep_default_na=False)["text"].iloc[:100].tolist()
    expected = loadtest.reference_answers(uri, texts)

    with served(uri, workers=workers) as server:  # the same server `kd-sentiment loadtest` starts
        result = run_load_test(server.url, texts, clients=4, requests_per_client=25, malformed_every=5, timeout_s=120,
                               expected=expected, tolerance=1e-4)

    assert result["wrong"] == 0 and result["errors"] == 0, result["error_samples"]
    assert result["checked"] == 1 and result["stopped_at_timeout"] == 0
    assert result["clients"] == 4 and result["requests"] == 100
    assert result["malformed_sent"] == 4 * 5  # every 5th of 25 per client, all three kinds rotated
    assert result["malformed_rejected_4xx"] == result["malformed_sent"]
    assert result["good_sent"] == 80 and result["ok"] == result["good_sent"]
    assert 0 < result["p50_ms"] <= result["p95_ms"] and result["latency_samples"] == 80
    assert result["p99_ms"] is None and result["cut_off"] == 0  # p99 needs 100 samples
    assert result["throughput_per_s"] > 0 and result["duration_s"] > 0


def test_an_answer_is_wrong_when_its_label_or_any_probability_is_not_its_texts():
    expected = {"label": "positive", "score": 0.8, "prob_negative": 0.2, "prob_positive": 0.8}
    assert loadtest.difference(dict(expected), expected, 1e-4) is None
    assert loadtest.difference({**expected, "prob_negative": 0.20005}, expected, 1e-4) is None
    assert "label" in loadtest.difference({**expected, "label": "negative"}, expected, 1e-4)
    assert "prob_negative" in loadtest.difference({**expected, "prob_negative": 0.21}, expected, 1e-4)
    assert "score" in loadtest.difference({k: v for k, v in expected.items() if k != "score"}, expected, 1e-4)


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
        time.sleep(2.0 if b"slow" in body else self.delay)
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
    assert result["ok"] == result["requests"] and 1 <= result["cut_off"] <= 2  # counted, not dropped


def test_warmup_requests_are_sent_first_and_not_counted(fake_server):
    bodies = []
    port = fake_server(0.0, bodies)
    result = run_load_test(f"http://127.0.0.1:{port}", ["first", "second"], clients=1, requests_per_client=4,
                           malformed_every=0, timeout_s=20, warmup_requests=3)
    assert len(bodies) == 3 + 4 and result["requests"] == result["ok"] == 4 and result["errors"] == 0
    assert [json.loads(b)["inputs"] for b in bodies[:3]] == [["first"], ["second"], ["first"]]


def test_open_loop_sends_every_request_and_counts_each_outcome(fake_server):
    port = fake_server(0.0)
    result = run_open_loop(f"http://127.0.0.1:{port}", ["x", "y"], rate=200, requests=60, malformed_every=6,
                           timeout_s=30)
    assert result["mode"] == "open" and result["scheduled"] == 60 and result["unsent"] == 0
    assert result["requests"] == 60 and result["malformed_sent"] == 10 and result["good_sent"] == 50
    assert result["ok"] == 50 and result["latency_samples"] == 50 and result["timeouts"] == 0
    assert result["p50_ms"] is not None and result["p95_ms"] is not None and result["p99_ms"] is None  # < 100 samples
    assert result["errors"] == 10  # the fake server rejects no malformed request with a 4xx


def test_open_loop_timeouts_are_counted_and_kept_in_the_percentiles(fake_server):
    port = fake_server(0.0)  # answers "slow" after 2 s, past the 0.3 s request timeout
    result = run_open_loop(f"http://127.0.0.1:{port}", ["fast", "slow"], rate=50, requests=10, malformed_every=0,
                           timeout_s=30, request_timeout_s=0.3)
    assert result["timeouts"] == 5 and result["ok"] == 5 and result["requests"] == 10
    assert result["latency_samples"] == 10  # the timed-out ones count, at the timeout (a lower bound)
    assert result["errors"] == 0


def test_open_loop_is_bounded_in_time_and_counts_what_it_did_not_send(fake_server):
    port = fake_server(0.0)
    result = run_open_loop(f"http://127.0.0.1:{port}", ["x"], rate=4, requests=40, malformed_every=0, timeout_s=1.0)
    assert result["stopped_at_timeout"] == 1 and result["unsent"] > 0
    assert result["requests"] + result["unsent"] == 40


def test_arrivals_are_poisson_and_seeded():
    gaps = np.diff(poisson_schedule(rate=100, requests=20000, seed=0), prepend=0)
    assert abs(gaps.mean() - 0.01) < 0.0005 and abs(gaps.std() - 0.01) < 0.0005  # exponential: sd = mean
    assert np.array_equal(poisson_schedule(5, 10, 1), poisson_schedule(5, 10, 1))


def test_a_test_where_nothing_succeeded_fails_the_step(fake_server, monkeypatch):
    """Every good request answered 500: the step logs what happened, then ends FAILED with one line."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from kd_sentiment.core import parameters, tracking

    port = fake_server(0.0)

    @contextmanager
    def fake_served(model_uri, workers=1):
        yield loadtest.Server(f"http://127.0.0.1:{port}", os.getpid())

    monkeypatch.setattr(tracking, "resolve_version", lambda uri, needed_by="": SimpleNamespace(name="m", version="1"))
    monkeypatch.setattr(loadtest, "served", fake_served)
    monkeypatch.setattr(loadtest, "reference_answers", lambda uri, texts, cost: [{"label": "x"}] * len(texts))
    monkeypatch.setattr(loadtest, "_prediction", lambda text: None)  # every answer is a wrong payload
    with pytest.raises(UserError, match="no request succeeded"):
        loadtest.run(parameters.LoadTestArgs(model="models:/m/1", rate=50, requests=20, malformed_every=0, timeout_s=30,
                                         warmup_requests=0))
    run = mlflow.search_runs(experiment_names=["kd-sentiment/tweeteval"], output_format="list")[0]
    assert run.info.status == "FAILED" and run.data.metrics["ok"] == 0 and run.data.metrics["errors"] == 20


def test_answers_that_are_another_texts_are_counted_and_fail_the_step(fake_server, monkeypatch):
    """The fake server answers every text with the same prediction: the texts whose in-process answer
    differs are `wrong` (not `ok`), the others pass, and the step ends FAILED naming the first."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from kd_sentiment.core import parameters, tracking

    port = fake_server(0.0)  # answers {"label": "x"} to every text

    @contextmanager
    def fake_served(model_uri, workers=1):
        yield loadtest.Server(f"http://127.0.0.1:{port}", os.getpid())

    monkeypatch.setattr(tracking, "resolve_version", lambda uri, needed_by="": SimpleNamespace(name="m", version="1"))
    monkeypatch.setattr(loadtest, "served", fake_served)
    # in-process, every third text has another label than the server gives it
    monkeypatch.setattr(loadtest, "reference_answers",
                        lambda uri, texts, cost: [{"label": "y" if k % 3 == 0 else "x"} for k in range(len(texts))])
    with pytest.raises(UserError, match="7 of 20 answers were not their own text's prediction"):
        loadtest.run(parameters.LoadTestArgs(model="models:/m/1", rate=50, requests=20, malformed_every=0, timeout_s=30,
                                         warmup_requests=0))
    run = mlflow.search_runs(experiment_names=["kd-sentiment/tweeteval"], output_format="list")[0]
    assert run.info.status == "FAILED"
    assert run.data.metrics["wrong"] == 7 and run.data.metrics["ok"] == 13 and run.data.metrics["errors"] == 0


def test_each_sending_thread_keeps_one_connection_open():
    """Keep-alive: 2 clients x 15 requests reach an HTTP/1.1 server over 2 connections, not 30."""
    peers = []

    class KeepAliveHandler(_SlowHandler):
        protocol_version = "HTTP/1.1"
        bodies = []

        def do_POST(self):
            peers.append(self.client_address)
            super().do_POST()

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_load_test(f"http://127.0.0.1:{server.server_address[1]}", ["x"], clients=2,
                               requests_per_client=15, malformed_every=0, timeout_s=20)
    finally:
        server.shutdown()
        server.server_close()
    assert result["ok"] == 30 and len(peers) == 30
    assert len(set(peers)) == 2


def open_loop_result(rate: float, requests: int, p99: float, **counts) -> dict:
    return {"mode": "open", "rate": rate, "scheduled": requests, "requests": requests, "wrong": 0, "errors": 0,
            "timeouts": 0, "unsent": 0, "started_late": 0, "p99_ms": p99, "ok": requests, "good_sent": requests,
            "malformed_sent": 0, "malformed_rejected_4xx": 0, "p50_ms": None, "p95_ms": None,
            "latency_samples": requests, "throughput_per_s": rate, "cut_off": 0, **counts}


@pytest.mark.parametrize("counts, p99, why", [
    ({}, 29.0, None),
    ({}, 31.0, "p99 31.0 ms > 30 ms"),
    ({"wrong": 1}, 5.0, "1 wrong answers"),
    ({"errors": 2}, 5.0, "2 errors"),
    ({"timeouts": 1}, 5.0, "1 timeouts"),
    ({"started_late": 2}, 5.0, None),  # 2 of 1000 sent late: the client kept up
    ({"started_late": 20}, 5.0, "20 requests the client sent late"),
    ({}, None, "too few answers for a p99")])
def test_a_rate_is_held_only_with_p99_within_the_bound_and_every_answer_right(counts, p99, why):
    assert loadtest.knee_failure(open_loop_result(100, 1000, p99, **counts), 30.0) == why


def test_the_knee_search_doubles_then_halves_the_gap_and_logs_every_trial(monkeypatch):
    """A server that holds 230 requests/s: 50, 100, 200 held, 400 not, then 300, 250 not, 225 held."""
    from types import SimpleNamespace

    from kd_sentiment.core import parameters

    tried = []

    def fake_open_loop(url, texts, rate, requests, *args, **kwargs):
        tried.append((rate, requests))
        return open_loop_result(rate, requests, 12.0 if rate <= 230 else 80.0)

    monkeypatch.setattr(loadtest, "run_open_loop", fake_open_loop)
    args = parameters.LoadTestArgs(model="models:/m/1", find_knee=True, knee_trial_s=10, knee_steps=3)
    result = loadtest.find_knee(args, loadtest.Server("http://127.0.0.1:1", os.getpid()), ["x"], None)
    assert [rate for rate, _ in tried] == [50, 100, 200, 400, 300, 250, 225]
    assert [requests for _, requests in tried][:2] == [500, 1000]  # knee_trial_s of arrivals at each rate
    assert result["knee_rate_per_s"] == 225 and result["knee_first_failed_rate_per_s"] == 250
    assert [t["held"] for t in result["knee_trials"]] == [True, True, True, False, False, False, True]
    assert all("server_cpu_ms_per_request" in t for t in result["knee_trials"])

    with mlflow.start_run():
        loadtest.log_knee(args, {**result, "model_cpu_ms_per_call": 2.0}, SimpleNamespace(name="m", version="1"))
        run = mlflow.get_run(mlflow.active_run().info.run_id)
    assert run.data.metrics["knee_rate_per_s"] == 225 and run.data.metrics["knee_p99_ms"] == 12.0
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "knee_trial_rate")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [50, 100, 200, 400, 300, 250, 225]
