"""A team tracking server: `mlflow server` on PostgreSQL, artifacts proxied, two users at once.

A throw-away PostgreSQL cluster (initdb in a temporary folder, loopback only) backs a real
`mlflow server` that serves artifacts itself. The CLI steps talk to it only through
MLFLOW_TRACKING_URI=http://127.0.0.1:PORT: the teacher step, then two distill steps started at
the same moment. The outcome is checked through the server's REST API, as another team member's
tools would see it. Skipped when PostgreSQL's binaries or psycopg 3 (SQLAlchemy 2.1's driver for
postgresql:// URIs, in the dev extra) are missing; nothing is installed here.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli, wait_until_ok

pytestmark = pytest.mark.slow

TEACHER = "kd-sentiment-teacher-imdb"
CUT = "kd-sentiment-cut-l0-imdb"       # registered name derived from --student teacher-layers:0
TINY = "kd-sentiment-tiny-imdb"        # given with --name for the tiny model folder
DATA = ["--dataset", "imdb", "--validation_size", "100", "--max_eval_samples", "100"]
TRAIN = ["--epochs", "1", "--batch_size", "32", "--lr", "2e-3", "--max_length", "64", "--checkpoint_every", "0",
         "--seed", "0"]


# ----------------------------------------------------------------------------- PostgreSQL

def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (and postgres beside them), or None."""
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postgres:
    """One cluster in a temporary folder, listening on 127.0.0.1:port, trust auth for user `kd`.

    PostgreSQL refuses to run as root; as root, the cluster is created and run as the `postgres`
    system user (via runuser), in a folder of its own under the system temp dir (pytest's tmp
    dirs are private to root).
    """

    def __init__(self, bin_dir: Path, tmp_path: Path):
        self.bin = bin_dir
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no `postgres` system user to run PostgreSQL as")
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.skip("running as root and `runuser` is missing: cannot run PostgreSQL as another user")
            self.home = Path(tempfile.mkdtemp(prefix="kd-pg-"))
            os.chown(self.home, user.pw_uid, user.pw_gid)
            self.as_user = [runuser, "-u", "postgres", "--"]
            self.own_home = True
        else:
            self.home = tmp_path / "pg"
            self.home.mkdir()
            self.own_home = False
        self.data, self.log = self.home / "data", self.home / "postgres.log"
        self.started = False

    def _run(self, *cmd: str, timeout: int = 120) -> None:
        out = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n{log}")

    def start(self) -> str:
        """initdb, start, create database `mlflow`; returns its SQLAlchemy URI."""
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "kd", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")
        self.started = True
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="kd", dbname="postgres", connect_timeout=10,
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        return f"postgresql://kd@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        try:
            if self.started:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            if self.own_home:
                shutil.rmtree(self.home, ignore_errors=True)


# ----------------------------------------------------------------------------- mlflow server and REST

def start_mlflow_server(backend: str, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        # Own session: the server forks workers; the whole group is stopped at the end.
        return subprocess.Popen([str(bin_dir / "mlflow"), "server", "--backend-store-uri", backend,
                                 "--artifacts-destination", str(artifacts), "--serve-artifacts",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                                cwd=artifacts.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def api(base: str, endpoint: str, params: dict | None = None, body: dict | None = None) -> dict:
    """GET (params) or POST (body) /api/2.0/mlflow/ENDPOINT; the decoded JSON answer."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read().decode() or "{}")
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{endpoint} {params or body}: HTTP {err.code}: {err.read().decode()[:500]}") from None


def tags_of(entity: dict) -> dict:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


# ----------------------------------------------------------------------------- the test

def test_team_server_on_postgres_takes_teacher_and_two_concurrent_distills(tiny_model, tmp_path):
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3 (no longer psycopg2).
    pytest.importorskip("psycopg", reason="psycopg 3 (psycopg[binary]), SQLAlchemy's driver for postgresql://, "
                                          "is not installed")

    pg = Postgres(bin_dir, tmp_path)
    server = None
    artifacts, log = tmp_path / "artifacts", tmp_path / "mlflow-server.log"
    artifacts.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    try:
        backend = pg.start()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_mlflow_server(backend, artifacts, port, log)
        wait_until_ok(f"{base}/health", server, log, seconds=180)  # the first start migrates the database
        env = {"MLFLOW_TRACKING_URI": base}

        # 1,500 reviews, 2 epochs: what the tiny random encoder needs to beat the majority class (else no alias).
        out = run_cli("teacher", "--model", str(tiny_model), *DATA, "--max_train_samples", "1500", *TRAIN,
                      "--epochs", "2", cwd=work, env=env)
        assert out.returncode == 0, out.stderr[-3000:]

        # Two team members distil at the same moment, against the same teacher version.
        full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env
        commands = {
            CUT: ["--student", "teacher-layers:0"],
            TINY: ["--student", str(tiny_model), "--name", TINY],
        }
        processes, logs = {}, {name: tmp_path / f"distill-{name}.log" for name in commands}
        try:
            for name, student in commands.items():
                with open(logs[name], "w") as out:  # files, not pipes: progress bars would fill a pipe
                    processes[name] = subprocess.Popen(
                        [sys.executable, "-m", "kd_sentiment.cli", "distill", *student, *DATA,
                         "--max_train_samples", "1500", *TRAIN, "--epochs", "2", "--output_dir", str(work / name)],
                        cwd=work, env=full_env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 600
            for name, process in processes.items():
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for name, process in processes.items():
            assert process.returncode == 0, f"distill {name} failed:\n{logs[name].read_text()[-3000:]}"

        # Nothing was written beside the steps: every run, model and artifact went to the server.
        assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
        assert any(p.is_file() for p in artifacts.rglob("*")), "no artifact reached --artifacts-destination"

        # ---- runs, through the REST API
        experiment = api(base, "experiments/get-by-name", {"experiment_name": "kd-sentiment/imdb"})["experiment"]
        assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment
        runs = api(base, "runs/search", body={"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
        runs = runs.get("runs", [])
        by_step: dict[str, list[dict]] = {}
        for run in runs:
            assert run["info"]["status"] == "FINISHED", (run["info"]["run_name"], run["info"]["status"])
            by_step.setdefault(tags_of(run["data"]).get("kd_sentiment.step"), []).append(run)
        assert len(by_step.get("teacher", [])) == 1 and len(by_step.get("distill", [])) == 2, \
            {step: len(r) for step, r in by_step.items()}
        assert by_step.get("soft-targets"), "no soft-targets cache run"  # one per student that missed the cache
        distill_runs = {tags_of(r["data"])["registered_model"]: r for r in by_step["distill"]}
        assert set(distill_runs) == {CUT, TINY}

        # ---- registry: models, versions, aliases
        teacher_run = by_step["teacher"][0]
        sources = {}
        for name, run_dict in [(TEACHER, teacher_run), (CUT, distill_runs[CUT]), (TINY, distill_runs[TINY])]:
            model = api(base, "registered-models/get", {"name": name})["registered_model"]
            assert model["name"] == name
            versions = api(base, "model-versions/search", {"filter": f"name='{name}'"})["model_versions"]
            assert [v["version"] for v in versions] == ["1"], versions
            version = versions[0]
            assert version["run_id"] == run_dict["info"]["run_id"]
            assert version["status"] == "READY"
            alias = api(base, "registered-models/alias", {"name": name, "alias": "champion"})["model_version"]
            assert alias["version"] == "1" and alias["run_id"] == run_dict["info"]["run_id"]
            assert {"alias": "champion", "version": "1"} in model.get("aliases", [])
            assert tags_of(run_dict["data"])["registered_version"] == "1"
            sources[name] = version["source"]
            if name != TEACHER:
                assert tags_of(version)["teacher"] == f"{TEACHER}/1"
                assert tags_of(run_dict["data"])["teacher"] == f"{TEACHER}/1"
        assert len(set(sources.values())) == 3, sources  # three distinct logged models
        teacher_version = api(base, "model-versions/get", {"name": TEACHER, "version": "1"})["model_version"]
        soft_target_runs = {r["info"]["run_id"] for r in by_step["soft-targets"]}
        assert tags_of(teacher_version)["soft_targets_run_id"] in soft_target_runs
    finally:
        try:
            if server is not None:
                stop_process_group(server)
        finally:
            pg.stop()
