"""A bounded load test of a model server's `/invocations` endpoint (`mlflow models serve`).

`run_load_test` starts `clients` threads; each sends `requests_per_client` POSTs one after the
other, each a single text as `{"inputs": [text]}` (texts taken round-robin). Every
`malformed_every`-th request of a client is malformed instead, rotating through invalid JSON,
`{"inputs": [123]}` (not a string) and `{}` (no input): a healthy server rejects each with a 4xx.
Latency is measured per request, from sending to the last byte of the answer; one connection per
request (urllib), so it includes connecting, as a fresh client would see it. `warmup_requests`
good requests go first, one at a time, before the clock starts: a fresh server pays one-off costs
on its first requests (ONNX Runtime's first runs, lazy imports) that are not its steady latency.
They are not counted, except that one not answered 200 with one prediction is an error.

Bounded on every side: a fixed number of requests, and a hard stop at `timeout_s` (no request is
started after it; requests in flight are given only the time left, and one cut off that way is
not counted at all, neither as sent nor as an error). Only loopback servers
(127.0.0.0/8, localhost, ::1) are accepted: this is a tool for a server you started yourself, not
for someone else's.

Result, a dict of numbers (percentiles are None when no good request succeeded):
  clients, requests (answered or failed), good_sent, ok (good requests answered 200 with one
  prediction), errors (5xx, 2xx with a wrong payload, a good request answered 4xx, a malformed
  request not answered 4xx, connection errors), malformed_sent, malformed_rejected_4xx,
  p50_ms / p95_ms / p99_ms (latency of the ok requests), throughput_per_s (ok requests per second
  of wall time), duration_s, stopped_at_timeout (1 if the hard stop cut the test short, else 0);
  plus error_samples, the first few error descriptions (strings), for diagnosis.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd

from kd_sentiment.errors import UserError
from kd_sentiment.schema import LoadTestArgs

log = logging.getLogger(__name__)

MALFORMED_BODIES = (
    b'{"inputs": ["unterminated',      # not JSON
    json.dumps({"inputs": [123]}).encode(),  # JSON, but the item is not a text
    b"{}",                              # JSON, but no input at all
)
ERROR_SAMPLES = 5


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


def _post(url: str, body: bytes, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, body text), or (None, reason) when no answer came."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (OSError, ValueError) as err:  # refused, reset, timed out (URLError and socket errors are OSErrors)
        return None, f"{type(err).__name__}: {err}"


def _one_prediction(text: str) -> bool:
    """An MLflow scoring answer holding exactly one prediction."""
    try:
        answer = json.loads(text)
    except ValueError:
        return False
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    return isinstance(predictions, list) and len(predictions) == 1


def run_load_test(url: str, texts: list[str], clients: int = 4, requests_per_client: int = 50,
                  malformed_every: int = 10, timeout_s: float = 60, warmup_requests: int = 0) -> dict:
    """Load `url`'s /invocations with `clients` concurrent clients; see the module docstring."""
    target = invocations_url(url)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UserError("texts: need at least one text, and every item must be a string.")
    if clients < 1 or requests_per_client < 1:
        raise UserError(f"clients={clients}, requests_per_client={requests_per_client}: both must be at least 1.")
    if malformed_every < 0 or warmup_requests < 0:
        raise UserError(f"malformed_every={malformed_every}, warmup_requests={warmup_requests}: "
                        "must be 0 (none) or positive.")
    if not timeout_s > 0:
        raise UserError(f"timeout_s={timeout_s}: must be positive.")

    lock = threading.Lock()
    counts = dict.fromkeys(("requests", "good_sent", "ok", "errors", "malformed_sent", "malformed_rejected_4xx"), 0)
    latencies_ms: list[float] = []
    error_samples: list[str] = []

    def record(error: str | None = None, **increments) -> None:
        with lock:
            for key, n in increments.items():
                counts[key] += n
            if error is not None:
                counts["errors"] += 1
                if len(error_samples) < ERROR_SAMPLES:
                    error_samples.append(error)

    for k in range(warmup_requests):
        status, answer = _post(target, json.dumps({"inputs": [texts[k % len(texts)]]}).encode(), timeout=timeout_s)
        if not (status == 200 and _one_prediction(answer)):
            record(f"warm-up request {k}: {status} {answer[:200]!r}")
    start = time.monotonic()
    deadline = start + timeout_s
    stopped = threading.Event()

    def client(index: int) -> None:
        for j in range(requests_per_client):
            left = deadline - time.monotonic()
            if left <= 0:
                stopped.set()
                return
            malformed = malformed_every > 0 and (j + 1) % malformed_every == 0
            if malformed:
                body = MALFORMED_BODIES[(index + (j + 1) // malformed_every - 1) % len(MALFORMED_BODIES)]
            else:
                text = texts[(index * requests_per_client + j) % len(texts)]
                body = json.dumps({"inputs": [text]}).encode()
            sent = time.monotonic()
            status, answer = _post(target, body, timeout=left)
            latency_ms = 1000 * (time.monotonic() - sent)
            what = f"client {index} request {j}: " + ("malformed" if malformed else "good")
            if status is None and time.monotonic() >= deadline:
                stopped.set()  # cut off by the hard stop: not counted, the server may be just slow
                return
            if malformed:
                rejected = status is not None and 400 <= status < 500
                record(None if rejected else f"{what}: expected a 4xx, got {status} {answer[:200]!r}",
                       requests=1, malformed_sent=1, malformed_rejected_4xx=int(rejected))
            elif status == 200 and _one_prediction(answer):
                with lock:
                    latencies_ms.append(latency_ms)
                record(requests=1, good_sent=1, ok=1)
            else:
                record(f"{what}: {status} {answer[:200]!r}", requests=1, good_sent=1)

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"load-client-{i}")
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:  # requests end by the deadline (their timeout is the time left); a little grace
        thread.join(timeout=max(0.0, deadline + 5 - time.monotonic()))
    duration = time.monotonic() - start

    with lock:
        result = {"clients": clients, **counts}
        latencies = np.array(latencies_ms)
        for q in (50, 95, 99):
            result[f"p{q}_ms"] = float(np.percentile(latencies, q)) if len(latencies) else None
        result.update(throughput_per_s=counts["ok"] / duration if duration > 0 else 0.0, duration_s=duration,
                      stopped_at_timeout=int(stopped.is_set() or any(t.is_alive() for t in threads)),
                      error_samples=list(error_samples))
    return result


# ----------------------------------------------------------------------------- the `loadtest` step

@contextmanager
def served(model_uri: str, startup_s: float = 180, workers: int = 1):
    """`mlflow models serve -m model_uri` with `workers` uvicorn processes on a free loopback port
    for the duration of the block; yields its base URL. The server is always stopped afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)], stdout=log, stderr=subprocess.STDOUT,
                              # The server execs uvicorn by name: put this environment's bin first on PATH.
                              env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                              start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"mlflow models serve did not come up:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the scoring server runs workers of its own
            server.wait(timeout=30)
        log.close()
        os.unlink(log.name)


def run(args: LoadTestArgs) -> dict:
    """Serve `args.model`, load it with real test texts, log the result and write a CSV row."""
    from kd_sentiment import tracking
    from kd_sentiment.data import load_splits

    tracking.configure()
    version = tracking.resolve_version(args.model, needed_by="Quantize and promote a model first.")
    splits = load_splits(args.dataset, args.data_dir, max_eval_samples=1000)
    tracking.use_experiment(splits.name)
    with tracking.step_run("loadtest", f"loadtest-{version.name}-v{version.version}"), \
            served(args.model, workers=args.workers) as url:
        tracking.log_params({**asdict(args), "model_version": version.version})
        tracking.log_environment()
        result = run_load_test(url, splits.test["text"].tolist(), args.clients, args.requests_per_client,
                               args.malformed_every, args.timeout_s, args.warmup_requests)
        samples = result.pop("error_samples")
        mlflow.log_metrics({k: float(v) for k, v in result.items() if v is not None})
        mlflow.log_dict({"error_samples": samples}, "loadtest_errors.json")
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = out / f"serving-{splits.name}-{stamp}.csv"
        pd.DataFrame([{"model": version.name, "version": version.version, **result}]).to_csv(path, index=False)
        mlflow.log_artifact(str(path), "loadtest")
    log.info(f"{result['ok']} ok, {result['errors']} errors, {result['malformed_rejected_4xx']}/{result['malformed_sent']} "
          f"malformed rejected; p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; wrote {path}")
    return result
