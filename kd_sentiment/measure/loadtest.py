"""A bounded load test of a model server's `/invocations` endpoint (`mlflow models serve`), closed or open loop.

Closed loop (`run_load_test`): `clients` threads each send `requests_per_client` POSTs one after the
other, each a single text as `{"inputs": [text]}` (texts taken round-robin). A client waits for
its answer before it sends again, so a slow server slows the offered load down with it: this
measures how the server serves a fixed number of callers, and hides queueing.
Open loop (`run_open_loop`): `requests` POSTs at `rate` per second on average, their send times
drawn in advance from a Poisson process (exponential gaps, seeded), each sent at its time whatever
happened to the ones before, as independent users would. Latency runs from the scheduled send
time, so time a request waited on the client side counts too (no coordinated omission). A server
that cannot hold the rate shows it as growing latency and timeouts.

In both, every `malformed_every`-th request is malformed instead, rotating through invalid JSON,
`{"inputs": [123]}` (not a string) and `{}` (no input): a healthy server rejects each with a 4xx.
Latency is measured to the last byte of the answer. Each sending thread keeps one HTTP/1.1
connection open (as client libraries do), so neither side pays a TCP handshake per request.
`warmup_requests` good requests go first, one at a time, before the clock starts (a fresh server's
one-off costs); one not answered 200 with one prediction is an error.

Bounded on every side, and nothing is dropped from the counts: a fixed number of requests; a hard
stop at `timeout_s` (closed loop: no request starts after it, one cut off by it is counted in
`cut_off`; open loop: a request not yet sent by then is counted in `unsent`); open loop also a
per-request timeout, after which the request counts in `timeouts`, with the timeout as its latency
(a lower bound) in the percentiles. Only loopback servers (127.0.0.0/8, localhost, ::1) are
accepted: this is a tool for a server you started yourself, not for someone else's.

Answers are checked where `expected` holds the model's in-process answer for each text (`loadtest`
always passes it; `difference` says what counts): an answer with one prediction that is not its own
text's is `wrong`.

Result, a dict of numbers: mode, requests (answered or failed), good_sent, ok (good requests answered
200 with their own text's prediction, or with one prediction where nothing is expected), wrong,
errors (5xx, 2xx with a wrong payload, a good request answered 4xx, a malformed request not
answered 4xx, connection errors), checked (1 where answers were compared), malformed_sent, malformed_rejected_4xx,
p50_ms / p95_ms / p99_ms over `latency_samples` good requests (a percentile with fewer samples than
it needs, 20 for p95 and 100 for p99, is None), throughput_per_s (ok requests per second of wall
time), duration_s, stopped_at_timeout; closed loop: clients, cut_off; open loop: rate, scheduled,
unsent, timeouts, started_late (sent more than LATE_S after their time: the client itself could not
keep up, so the offered rate was lower than asked); plus error_samples and wrong_samples, the first
few of each, for diagnosis.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd
import psutil

from kd_sentiment.core import processes, timing
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.parameters import LoadTestArgs

log = logging.getLogger(__name__)

MALFORMED_BODIES = (
    b'{"inputs": ["unterminated',      # not JSON
    json.dumps({"inputs": [123]}).encode(),  # JSON, but the item is not a text
    b"{}",                              # JSON, but no input at all
)
ERROR_SAMPLES = 5
LATE_S = 0.05           # open loop: sent this much after its time, the client itself could not keep up
NOT_ONE_PREDICTION = "not one prediction"  # a 200 whose payload is not an MLflow answer of one prediction
OPEN_LOOP_THREADS = 64  # open loop: requests in flight at most (more are sent late and counted as such)


def invocations_url(url: str) -> str:
    """`url` with path /invocations (appended unless already there), or a UserError unless it is
    an http(s) URL of a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"url={url!r}: expected http://127.0.0.1:PORT (a model server you started).")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: never resolved, never contacted
        loopback = False
    if not loopback:
        raise UserError(f"url={url!r}: the load test only targets loopback servers (127.0.0.0/8, localhost, ::1), "
                        f"not {host!r}.")
    path = parts.path.rstrip("/")
    if not path.endswith("/invocations"):
        path += "/invocations"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


_CONNECTIONS = threading.local()  # each sending thread's open connection per target URL: {url: (connection, path)}


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """This thread's keep-alive connection for `url` (made on first use), and the path to post to."""
    pool = _CONNECTIONS.__dict__.setdefault("by_url", {})
    if url not in pool:
        parts = urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        pool[url] = kind(parts.hostname, parts.port, timeout=timeout), parts.path
    connection, path = pool[url]
    connection.timeout = timeout
    if connection.sock is not None:
        connection.sock.settimeout(timeout)
    return connection, path


def _drop_connection(url: str) -> None:
    connection, _ = _CONNECTIONS.__dict__.get("by_url", {}).pop(url, (None, None))
    if connection is not None:
        connection.close()


def _post(url: str, body: bytes, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, body text), or (None, reason) when no answer came. Each sending thread keeps one
    HTTP/1.1 connection open to the server, as client libraries do, so a request costs neither side
    a TCP handshake; a kept connection the server closed while idle is opened again, once."""
    connection, path = _connection(url, timeout)
    reused = connection.sock is not None
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
        _drop_connection(url)
        return _post(url, body, timeout) if reused else (None, f"{type(err).__name__}: {err}")
    except (OSError, http.client.HTTPException) as err:  # refused, timed out, a broken answer
        _drop_connection(url)
        return None, f"{type(err).__name__}: {err}"


def _prediction(text: str) -> dict | None:
    """The one prediction of an MLflow scoring answer, or None if it does not hold exactly one."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if isinstance(predictions, list) and len(predictions) == 1 and isinstance(predictions[0], dict):
        return predictions[0]
    return None


def difference(row: dict, expected: dict, tolerance: float) -> str | None:
    """How a served prediction differs from the in-process one for the same text (None: it does not):
    another label, or a number (score, probability) further than `tolerance` from its expected value."""
    if row.get("label") != expected["label"]:
        return f"label {row.get('label')!r}, expected {expected['label']!r}"
    for key, value in expected.items():
        if key != "label" and not (isinstance(row.get(key), (int, float)) and abs(row[key] - value) <= tolerance):
            return f"{key} {row.get(key)!r}, expected {value:.6f} (tolerance {tolerance:g})"
    return None


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and its live descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:  # ended between the listing and the reading
            pass
    return total


def reference_answers(model_uri: str, texts: list[str], cost: dict | None = None) -> list[dict]:
    """The model's answer for each text, loaded in this process and asked one text at a time, as
    each load-test request asks the server: what every HTTP answer is checked against. `cost`, if
    given, gets `model_cpu_ms_per_call`: this process's CPU per call (tokenize + runtime + answer)."""
    model = mlflow.pyfunc.load_model(model_uri)
    start = cpu_seconds(os.getpid())
    answers = [model.predict([text]).iloc[0].to_dict() for text in texts]
    if cost is not None:
        cost["model_cpu_ms_per_call"] = 1000 * (cpu_seconds(os.getpid()) - start) / len(texts)
    return answers


class Tally:
    """What the sending threads record: counts, good requests' latencies, the first errors; and the
    answer check, where `expected` holds each text's in-process answer (see `difference`)."""

    def __init__(self, expected: list[dict] | None = None, tolerance: float = 0.0, **extra_counts):
        self.lock = threading.Lock()
        self.expected, self.tolerance = expected, tolerance
        self.counts = dict.fromkeys(("requests", "good_sent", "ok", "wrong", "errors", "malformed_sent",
                                     "malformed_rejected_4xx"), 0) | extra_counts
        self.latencies_ms: list[float] = []
        self.error_samples: list[str] = []
        self.wrong_samples: list[str] = []  # kept apart: errors must not crowd out the first wrong answers

    def count(self, error: str | None = None, **increments) -> None:
        with self.lock:
            for key, n in increments.items():
                self.counts[key] += n
            if error is not None:
                self.counts["errors"] += 1
                if len(self.error_samples) < ERROR_SAMPLES:
                    self.error_samples.append(error)

    def wrong_answer(self, index: int | None, answer: str) -> str | None:
        """Why a 200 answer to text `index` is not a good one (None: it is): NOT_ONE_PREDICTION, or
        how it differs from this text's prediction."""
        row = _prediction(answer)
        if row is None:
            return NOT_ONE_PREDICTION
        if self.expected is None or index is None:
            return None
        return difference(row, self.expected[index], self.tolerance)

    def answered(self, what: str, malformed: bool, status: int | None, answer: str, latency_ms: float,
                 index: int | None = None) -> None:
        """Record one request that got an answer (or a connection error); `index`: its text's."""
        if malformed:
            rejected = status is not None and 400 <= status < 500
            self.count(None if rejected else f"{what}: expected a 4xx, got {status} {answer[:200]!r}",
                       requests=1, malformed_sent=1, malformed_rejected_4xx=int(rejected))
            return
        problem = self.wrong_answer(index, answer) if status == 200 else "not answered 200"
        if problem is None:
            with self.lock:
                self.latencies_ms.append(latency_ms)
            self.count(requests=1, good_sent=1, ok=1)
        elif status == 200 and problem != NOT_ONE_PREDICTION:  # an answer, but another text's
            with self.lock:
                if len(self.wrong_samples) < ERROR_SAMPLES:
                    self.wrong_samples.append(f"{what}: wrong answer for text {index}: {problem}")
            self.count(requests=1, good_sent=1, wrong=1)
        else:
            self.count(f"{what}: {status} {answer[:200]!r}", requests=1, good_sent=1)

    def summary(self, duration: float, **extra) -> dict:
        with self.lock:
            result = {**extra, **self.counts, "checked": int(self.expected is not None),
                      "latency_samples": len(self.latencies_ms)}
            for q in timing.PERCENTILES:
                value = timing.percentile(self.latencies_ms, q)
                result[f"p{q}_ms"] = None if math.isnan(value) else value
            result.update(throughput_per_s=self.counts["ok"] / duration if duration > 0 else 0.0,
                          duration_s=duration, error_samples=list(self.error_samples),
                          wrong_samples=list(self.wrong_samples))
        return result


def body_of(texts: list[str], n: int, malformed_every: int, stream: int = 0,
            offset: int = 0) -> tuple[bytes, bool, int | None]:
    """(body, malformed, index of its text) of request `n` (counted from 0) of a stream: every
    `malformed_every`-th is malformed, the kinds rotating (each stream starting at another kind), the
    others text offset + n."""
    if malformed_every > 0 and (n + 1) % malformed_every == 0:
        return MALFORMED_BODIES[(stream + (n + 1) // malformed_every - 1) % len(MALFORMED_BODIES)], True, None
    index = (offset + n) % len(texts)
    return json.dumps({"inputs": [texts[index]]}).encode(), False, index


def check_arguments(url: str, texts: list[str], malformed_every: int, timeout_s: float, warmup_requests: int,
                    expected: list[dict] | None, **counts: int) -> str:
    """The /invocations URL, or a UserError naming the bad argument."""
    target = invocations_url(url)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UserError("texts: need at least one text, and every item must be a string.")
    if expected is not None and len(expected) != len(texts):
        raise UserError(f"expected: one answer per text; got {len(expected)} for {len(texts)} texts.")
    for name, value in counts.items():
        if value < 1:
            raise UserError(f"{name}={value}: must be at least 1.")
    if malformed_every < 0 or warmup_requests < 0:
        raise UserError(f"malformed_every={malformed_every}, warmup_requests={warmup_requests}: "
                        "must be 0 (none) or positive.")
    if not timeout_s > 0:
        raise UserError(f"timeout_s={timeout_s}: must be positive.")
    return target


def warm_up(target: str, texts: list[str], n: int, timeout_s: float, tally: Tally) -> None:
    for k in range(n):
        index = k % len(texts)
        status, answer = _post(target, json.dumps({"inputs": [texts[index]]}).encode(), timeout=timeout_s)
        problem = tally.wrong_answer(index, answer) if status == 200 else f"{status} {answer[:200]!r}"
        if problem is not None:
            tally.count(f"warm-up request {k}: {problem}")


def run_load_test(url: str, texts: list[str], clients: int = 4, requests_per_client: int = 50,
                  malformed_every: int = 10, timeout_s: float = 60, warmup_requests: int = 0,
                  expected: list[dict] | None = None, tolerance: float = 0.0) -> dict:
    """Closed loop: `clients` concurrent clients, each sending its next request when the last is
    answered; see the module docstring."""
    # Nine parameters: the load's own knobs, as LoadTestArgs declares them, and the answers to check.
    target = check_arguments(url, texts, malformed_every, timeout_s, warmup_requests, expected, clients=clients,
                             requests_per_client=requests_per_client)
    tally = Tally(expected, tolerance, cut_off=0)
    warm_up(target, texts, warmup_requests, timeout_s, tally)
    start = time.monotonic()
    deadline = start + timeout_s
    stopped = threading.Event()

    def client(index: int) -> None:
        for j in range(requests_per_client):
            left = deadline - time.monotonic()
            if left <= 0:
                stopped.set()
                return
            body, malformed, text = body_of(texts, j, malformed_every, index, offset=index * requests_per_client)
            sent = time.monotonic()
            status, answer = _post(target, body, timeout=left)
            if status is None and time.monotonic() >= deadline:
                stopped.set()  # cut off by the hard stop: counted as such, not as an error (the server may be slow)
                tally.count(cut_off=1)
                return
            tally.answered(f"client {index} request {j}", malformed, status, answer, 1000 * (time.monotonic() - sent),
                           text)

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"load-client-{i}")
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:  # requests end by the deadline (their timeout is the time left); a little grace
        thread.join(timeout=max(0.0, deadline + 5 - time.monotonic()))
    stopped_at_timeout = int(stopped.is_set() or any(t.is_alive() for t in threads))
    return tally.summary(time.monotonic() - start, mode="closed", clients=clients,
                         stopped_at_timeout=stopped_at_timeout)


def poisson_schedule(rate: float, requests: int, seed: int) -> np.ndarray:
    """Send times (s from the start) of `requests` Poisson arrivals at `rate` per second."""
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, requests))


def run_open_loop(url: str, texts: list[str], rate: float, requests: int = 500, malformed_every: int = 10,
                  timeout_s: float = 120, warmup_requests: int = 0, request_timeout_s: float = 10,
                  seed: int = 42, expected: list[dict] | None = None, tolerance: float = 0.0) -> dict:
    """Open loop: `requests` requests at Poisson times, `rate` per second on average, each sent at
    its time however the others fare; see the module docstring."""
    # Eleven parameters: the load's own knobs (rate, size, bounds, seed), as LoadTestArgs declares
    # them, and the answers to check.
    target = check_arguments(url, texts, malformed_every, timeout_s, warmup_requests, expected, requests=requests)
    if not rate > 0 or not request_timeout_s > 0:
        raise UserError(f"rate={rate}, request_timeout_s={request_timeout_s}: both must be positive.")
    tally = Tally(expected, tolerance, scheduled=requests, unsent=0, timeouts=0, started_late=0)
    warm_up(target, texts, warmup_requests, request_timeout_s, tally)
    schedule = poisson_schedule(rate, requests, seed)
    start = time.monotonic()
    deadline = start + timeout_s

    def send(n: int) -> None:
        due = start + schedule[n]
        if time.monotonic() >= deadline:
            tally.count(unsent=1)
            return
        if time.monotonic() - due > LATE_S:
            tally.count(started_late=1)
        body, malformed, text = body_of(texts, n, malformed_every)
        status, answer = _post(target, body, timeout=max(0.001, min(request_timeout_s, deadline - time.monotonic())))
        latency_ms = 1000 * (time.monotonic() - due)  # from the scheduled time: waiting on the client counts
        if status is None and "timed out" in answer:
            tally.count(timeouts=1, requests=1, good_sent=int(not malformed), malformed_sent=int(malformed))
            if not malformed:
                with tally.lock:
                    tally.latencies_ms.append(max(latency_ms, 1000 * request_timeout_s))
            return
        tally.answered(f"request {n}", malformed, status, answer, latency_ms, text)

    with ThreadPoolExecutor(max_workers=OPEN_LOOP_THREADS, thread_name_prefix="open-loop") as pool:
        for n in range(requests):
            wait = start + schedule[n] - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                tally.count(unsent=requests - n)
                break
            pool.submit(send, n)
    duration = time.monotonic() - start
    return tally.summary(duration, mode="open", rate=rate, stopped_at_timeout=int(time.monotonic() >= deadline))


# ----------------------------------------------------------------------------- the `loadtest` step

@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    pid: int  # of `mlflow models serve`, whose process tree serves


@contextmanager
def served(model_uri: str, startup_s: float = 180, workers: int = 1):
    """`mlflow models serve -m model_uri --workers N` on a free loopback port for the duration of the
    block; yields its Server. The server and its workers are always stopped afterwards (killed if
    they do not stop), and its log removed. The workers size their threads from the flag (served_model.py)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                                   "local", "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)],
                                  stdout=server_log, stderr=subprocess.STDOUT,
                                  # The server execs uvicorn by name: put this environment's bin first on PATH.
                                  env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                                  start_new_session=True)  # its own group: the workers it forks stop with it
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    server_log.seek(0)
                    raise RuntimeError(f"mlflow models serve did not come up:\n{server_log.read()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            yield Server(f"http://127.0.0.1:{port}", server.pid)
        finally:
            processes.stop(server, group=True)


def with_cpu(server: Server, load: Callable[[], dict], warmup_requests: int) -> dict:
    """`load()`'s result, with the CPU each side spent per request sent (warm-up included): the
    server's process tree, and this process (the client)."""
    client, serving = cpu_seconds(os.getpid()), cpu_seconds(server.pid)
    result = load()
    sent = max(1, result["requests"] + warmup_requests)
    result["client_cpu_ms_per_request"] = 1000 * (cpu_seconds(os.getpid()) - client) / sent
    result["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(server.pid) - serving) / sent
    return result


def one_load(args: LoadTestArgs, server: Server, texts: list[str], expected: list[dict]) -> dict:
    """The open- or closed-loop test `args` asks for, with its CPU per request."""
    if args.rate > 0:
        return with_cpu(server, lambda: run_open_loop(
            server.url, texts, args.rate, args.requests, args.malformed_every, args.timeout_s, args.warmup_requests,
            args.request_timeout_s, args.seed, expected, args.tolerance), args.warmup_requests)
    return with_cpu(server, lambda: run_load_test(
        server.url, texts, args.clients, args.requests_per_client, args.malformed_every, args.timeout_s,
        args.warmup_requests, expected, args.tolerance), args.warmup_requests)


def knee_failure(result: dict, p99_bound_ms: float) -> str | None:
    """Why a trial's rate is not held (None: it is)."""
    late = result["started_late"] > 0.01 * result["scheduled"]
    for count, why in ((result["wrong"], "wrong answers"), (result["errors"], "errors"),
                       (result["timeouts"], "timeouts"), (result["unsent"], "requests left unsent"),
                       (result["started_late"] if late else 0, "requests the client sent late")):
        if count:
            return f"{count} {why}"
    if result["p99_ms"] is None:
        return "too few answers for a p99"
    return None if result["p99_ms"] <= p99_bound_ms else f"p99 {result['p99_ms']:.1f} ms > {p99_bound_ms:g} ms"


def find_knee(args: LoadTestArgs, server: Server, texts: list[str], expected: list[dict]) -> dict:
    """The highest open-loop rate held (see `knee_failure`), by doubling from `args.rate` (or 50) until
    a rate fails, then halving the gap to the last one held `args.knee_steps` times; every trial listed.
    The first trial sends the warm-up requests (a failed one fails that trial, as in `one_load`)."""
    needed = math.ceil(timing.percentile_floor(99) / (1 - 1 / args.malformed_every if args.malformed_every else 1))
    trials = []

    def held(rate: float) -> bool:
        requests, warmup = max(needed, math.ceil(rate * args.knee_trial_s)), 0 if trials else args.warmup_requests
        result = with_cpu(server, lambda: run_open_loop(
            server.url, texts, rate, requests, args.malformed_every, args.knee_trial_s * 3 + args.request_timeout_s,
            warmup, args.request_timeout_s, args.seed + len(trials), expected, args.tolerance), warmup)
        why = knee_failure(result, args.knee_p99_ms)
        numbers = {k: v for k, v in result.items() if v is None or isinstance(v, (int, float))}
        trials.append({"rate": rate, "held": why is None, "why": why or "", **numbers})
        log.info("knee trial %.0f requests/s: %s (%s)", rate, "held" if why is None else "not held",
                 why or summary_line(result))
        return why is None

    rate, low, high = args.rate or 50.0, 0.0, None
    while high is None and rate <= args.knee_max_rate:
        low, high, rate = (rate, None, 2 * rate) if held(rate) else (low, rate, rate)
    for _ in range(args.knee_steps if high is not None and low > 0 else 0):
        middle = round((low + high) / 2)
        low, high = (middle, high) if held(middle) else (low, middle)
    return {"knee_rate_per_s": low, "knee_first_failed_rate_per_s": high, "knee_trials": trials}


def run(args: LoadTestArgs) -> dict:
    """Serve `args.model`, load it with real test texts (or find its knee), check every answer against
    the model's in-process answer for its text, log the result and write a CSV row. A test with a wrong
    answer, or in which no request succeeded, is logged, then ends the step with a UserError (FAILED)."""
    from kd_sentiment.core import tracking
    from kd_sentiment.core.data import load_splits

    args.validate()
    tracking.configure()
    version = tracking.resolve_version(args.model, needed_by="Quantize and promote a model first.")
    splits = load_splits(args.dataset, args.data_dir, max_eval_samples=1000)
    tracking.use_experiment(splits.name)
    mode = "knee" if args.find_knee else "open" if args.rate > 0 else "closed"
    sent = {"knee": 1000, "open": args.requests, "closed": args.clients * args.requests_per_client}[mode]
    texts = splits.test["text"].tolist()[:max(sent, args.warmup_requests)]  # the texts the requests carry
    with tracking.step_run("loadtest", f"loadtest-{mode}-{version.name}-v{version.version}"):
        tracking.log_params({**asdict(args), "model_version": version.version, "mode": mode})
        tracking.log_environment()
        tracking.log_texts(pd.DataFrame({"text": texts}), f"{splits.name}-test-{len(texts)}", splits.source, "test")
        cost = {}
        expected = reference_answers(args.model, texts, cost)
        with served(args.model, workers=args.workers) as server:
            load = find_knee if mode == "knee" else one_load
            result = {**cost, **load(args, server, texts, expected)}
        return log_knee(args, result, version) if mode == "knee" else log_load(args, result, version, splits.name)


def log_knee(args: LoadTestArgs, result: dict, version) -> dict:
    """Log the knee and every trial (`knee_trials.json`, and per-trial metrics stepped by trial)."""
    trials = result.pop("knee_trials")
    for step, trial in enumerate(trials):
        mlflow.log_metrics({f"knee_trial_{k}": float(v) for k, v in trial.items()
                            if k in ("rate", "held", "p99_ms", "server_cpu_ms_per_request") and v is not None}, step=step)
    mlflow.log_table(pd.DataFrame(trials), "knee_trials.json")
    knee = next((t for t in trials if t["held"] and t["rate"] == result["knee_rate_per_s"]), None)
    mlflow.log_metrics({"knee_rate_per_s": result["knee_rate_per_s"], "knee_trials": len(trials),
                        "model_cpu_ms_per_call": result["model_cpu_ms_per_call"],
                        **({"knee_p99_ms": knee["p99_ms"], "knee_server_cpu_ms_per_request":
                            knee["server_cpu_ms_per_request"]} if knee else {})})
    log.info("%s v%s: knee %s requests/s (p99 <= %g ms, no wrong answer, error or timeout); first rate not held: %s",
             version.name, version.version, f"{result['knee_rate_per_s']:g}", args.knee_p99_ms,
             result["knee_first_failed_rate_per_s"] or f"none up to {args.knee_max_rate:g}")
    return {**result, "knee_trials": trials}


def log_load(args: LoadTestArgs, result: dict, version, dataset: str) -> dict:
    """Log one load test and write its CSV row; a wrong answer, or no success at all, is a UserError."""
    samples, wrong = result.pop("error_samples"), result.pop("wrong_samples")
    mlflow.log_metrics({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    mlflow.log_dict({"error_samples": samples, "wrong_samples": wrong}, "loadtest_errors.json")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"serving-{dataset}-{stamp}.csv"
    pd.DataFrame([{"model": version.name, "version": version.version, "workers": args.workers, **result}]
                 ).to_csv(path, index=False)
    mlflow.log_artifact(str(path), "loadtest")
    if result["wrong"]:
        raise UserError(f"{result['wrong']} of {result['good_sent']} answers were not their own text's "
                        f"prediction (the in-process answer, within {args.tolerance:g}), {result['errors']} "
                        f"errors: {wrong[0]}")
    if result["ok"] == 0:
        raise UserError(f"no request succeeded ({result['requests']} answered or failed, "
                        f"{result.get('timeouts', 0)} timed out): {samples[0] if samples else 'no answer'}")
    log.info(summary_line(result) + f"; server CPU {result['server_cpu_ms_per_request']:.2f} ms, client CPU "
             f"{result['client_cpu_ms_per_request']:.2f} ms per request (the model's own call "
             f"{result['model_cpu_ms_per_call']:.2f} ms); wrote {path}")
    return result


def summary_line(result: dict) -> str:
    """One line: counts, then the percentiles with the number of samples they rest on."""
    def shown(q):
        value = result[f"p{q}_ms"]
        return f"p{q} {value:.1f} ms" if value is not None else f"p{q} n/a"
    extra = (f", {result['timeouts']} timed out, {result['unsent']} unsent, {result['started_late']} sent late"
             if result["mode"] == "open" else f", {result['cut_off']} cut off")
    return (f"{result['ok']} ok, {result['wrong']} wrong, {result['errors']} errors{extra}, {result['malformed_rejected_4xx']}/"
            f"{result['malformed_sent']} malformed rejected; {shown(50)}, {shown(95)}, {shown(99)} over "
            f"{result['latency_samples']} requests; {result['throughput_per_s']:.1f} ok/s")
