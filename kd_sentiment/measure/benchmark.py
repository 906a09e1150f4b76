"""The `benchmark` step: every model, in every backend it has, measured the same way on this machine.

Models: by default every registered version behind an alias whose `dataset` tag is the dataset
(teacher, students, INT8 models), or an explicit list of `models:/` URIs. Backends: PyTorch fp32
on the CPU for transformers models, and on a machine with a CUDA GPU also PyTorch fp32 and bf16 on
the GPU; ONNX Runtime INT8 for quantized models, plus ONNX fp32 from the fused fp32 graph their
quantize run kept; and, for each quantized student, the peer baseline `optimum_int8`: what a user
gets off the shelf from optimum (export, then `ORTQuantizer` with this CPU's dynamic preset, no
fusion, no tuning), built here from the same fp32 parent.

How (kd_sentiment/core/timing.py has the statistics): each (model, backend) gets a long-lived process of
its own (kd_sentiment/measure/bench_worker.py) that imports only its runtime: ONNX rows never import torch.
Every setting (batch size x {real text lengths, fixed length}) is measured in `rounds` rounds, the
models interleaved within each round and setting (teacher, student A, student B, ..., then again),
so drift over minutes hits every model alike. In each round a setting runs warm-up batches that are
discarded, then timed batches until its share of `samples` or `time_budget` is spent. Per row: the
pooled samples' p50/p95/p99 (a percentile resting on too few samples is left empty; `samples`
says how many), throughput, and the speedup vs the fp32 teacher as the median of the per-round
ratios with a distribution-free 95% interval; INT8 rows also against the peer baseline. The spread
of each row's per-round medians is the run's measured noise. Memory: the process's resident memory
with only the runtime imported (`runtime_rss_mb`) and what loading and running the model added on
top (`model_rss_mb`), read before the accuracy pass, which runs last in the same process on the
same evaluation texts for every model. Results: a CSV under results/benchmarks/, an MLflow table,
figures (accuracy vs latency, speedup, reliability diagrams) and a Markdown summary.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from kd_sentiment.core import metrics, processes, timing, tracking
from kd_sentiment.measure.bench_worker import TORCH_BACKENDS
from kd_sentiment.core.data import load_splits
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.machine import cpu_features
from kd_sentiment.core.parameters import BenchmarkArgs

log = logging.getLogger(__name__)

WARMUP_BATCHES = 2  # per setting and round: the caches and clocks another process's turn left cold
PEER = "optimum_int8"


# ----------------------------------------------------------------------------- what to measure

@dataclass
class Target:
    """One model in one backend."""

    name: str
    version: str
    role: str          # teacher | distill | quantize | peer
    backend: str       # a TORCH_BACKENDS name | onnx_fp32 | onnx_int8 | optimum_int8
    uri: str           # models:/NAME/VERSION, runs:/ID/onnx_fp32 for ONNX fp32, the fp32 parent for the peer
    max_length: int

    @property
    def label(self) -> str:
        return f"{self.name.removeprefix(f'{tracking.MODEL_PREFIX}-')} v{self.version} [{self.backend}]"


def run_max_length(run_id: str | None) -> int:
    params = mlflow.get_run(run_id).data.params if run_id else {}
    return int(float(params.get("max_length", 128)))


def torch_backends() -> list[str]:
    """The PyTorch backends this machine measures: the CPU always, fp32 and bf16 on a CUDA GPU."""
    import torch

    return [name for name, (device, _) in TORCH_BACKENDS.items() if device == "cpu" or torch.cuda.is_available()]


def served_backend(version) -> str:
    """The backend name of a quantized version as it is served: onnx_int8 (ONNX Runtime), or
    openvino_<precision> where quantize's search chose OpenVINO (tags `runtime`, `precision`)."""
    if version.tags.get("runtime") == "openvino":
        return f"openvino_{version.tags.get('precision', 'f32')}"
    return "onnx_int8"


def targets_for(version, backends: list[str], peer: bool) -> list[Target]:
    """The targets of one registered version: each PyTorch backend of `backends`, or the ONNX ones
    (and the peer baseline built from the same fp32 parent)."""
    role = version.tags.get("step", "distill")
    uri = f"models:/{version.name}/{version.version}"
    max_length = run_max_length(version.tags.get("run_id") or version.run_id)
    if role != "quantize":
        return [Target(version.name, version.version, role, backend, uri, max_length) for backend in backends]
    targets = [Target(version.name, version.version, role, "onnx_fp32", f"runs:/{version.tags['run_id']}/onnx_fp32",
                      max_length),
               Target(version.name, version.version, role, served_backend(version), uri, max_length)]
    if peer and version.tags.get("parent"):
        targets.append(Target(version.name, version.version, "peer", PEER, f"models:/{version.tags['parent']}",
                              max_length))
    return targets


def discover(args: BenchmarkArgs, dataset: str) -> list[Target]:
    """Explicit URIs, or every version behind an alias whose `dataset` tag matches, teacher first."""
    if args.models:
        versions = [tracking.resolve_version(uri.strip()) for uri in args.models.split(",") if uri.strip()]
    else:
        client, seen, versions = MlflowClient(), set(), []
        for model in client.search_registered_models(filter_string=f"name LIKE '{tracking.MODEL_PREFIX}-%'"):
            for alias, number in sorted(model.aliases.items()):
                version = client.get_model_version(model.name, number)
                if version.tags.get("dataset") == dataset and (model.name, number) not in seen:
                    seen.add((model.name, number))
                    versions.append(version)
    if not versions:
        raise UserError(f"No registered model with an alias for dataset '{dataset}'. Run the teacher/distill/"
                        "quantize steps first, or set models to models:/NAME@ALIAS,...")
    order = {"teacher": 0, "distill": 1, "quantize": 2}
    versions.sort(key=lambda v: (order.get(v.tags.get("step"), 1), v.name, int(v.version)))
    backends = torch_backends()
    return [t for v in versions for t in targets_for(v, backends, args.peer)]


# ----------------------------------------------------------------------------- model files for the workers

def hf_folder(uri: str, dst: Path) -> Path:
    """A registered transformers model as one plain folder (config, weights, tokenizer files) that
    `from_pretrained` reads without MLflow."""
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst / "download")))
    folder = dst / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    weights = next(p for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    tokenizer = next(p.parent for p in local.rglob("tokenizer_config.json"))
    for source in (weights.parent, tokenizer):
        for path in source.iterdir():
            if path.is_file():
                shutil.copy(path, folder / path.name)
    return folder


def onnx_files(model: Path, folder: Path) -> dict:
    """The worker's "load" request for an ONNX graph: the graph, the fast tokenizer's tokenizer.json and
    its padding token (from the served model's serving_config.json, else from the tokenizer files)."""
    config = next(folder.rglob("serving_config.json"), None)
    served = {}
    if config is not None:
        served = json.loads(config.read_text())
        pad_token, pad_id = served["pad_token"], served["pad_id"]
    else:
        from kd_sentiment.core.models import load_tokenizer

        tokenizer = load_tokenizer(str(model.parent))
        pad_token, pad_id = tokenizer.pad_token, tokenizer.pad_token_id
    return {"model": str(model), "tokenizer": str(next(folder.rglob("tokenizer.json"))), "pad_token": pad_token,
            "pad_id": pad_id, "runtime": served.get("runtime", "onnxruntime"), "precision": served.get("precision", "f32")}


def load_request(target: Target, dst: Path) -> tuple[dict, int]:
    """(the worker's "load" request, the model's parameter count, or 0 where the worker counts them
    itself) for `target`, its files under `dst`."""
    dst.mkdir(parents=True)
    if target.backend in TORCH_BACKENDS:
        folder = hf_folder(target.uri, dst)
        request, parameters = {"model": str(folder), "tokenizer": str(folder)}, 0
    else:
        import onnx

        if target.backend == PEER:
            from kd_sentiment.deploy import int8_recipes

            graph = int8_recipes.optimum_dynamic_int8(hf_folder(target.uri, dst), dst)
            folder = graph.parent
        else:
            folder = Path(mlflow.artifacts.download_artifacts(target.uri, dst_path=str(dst)))
            graph = next(folder.rglob("*.onnx"))
        request = onnx_files(graph, folder)
        parameters = int(sum(np.prod(t.dims) for t in onnx.load(str(graph), load_external_data=False).graph.initializer))
    return {**request, "max_length": target.max_length}, parameters


# ----------------------------------------------------------------------------- the measuring processes

class Worker:
    """A long-lived measuring process for one target (kd_sentiment/measure/bench_worker.py)."""

    def __init__(self, target: Target, threads: int, log_path: Path, runtime: str = "onnxruntime"):
        self.target = target
        self.stderr = open(log_path, "w+")  # the process's own output, shown if it fails
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, "-m", "kd_sentiment.measure.bench_worker", target.backend, str(threads),
                                         runtime],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                        env=env)
        try:
            self.hello = self.read()
        except BaseException:  # never leave a process that failed to start running
            self.close()
            raise

    def read(self) -> dict:
        line = self.process.stdout.readline()
        answer = json.loads(line) if line else {"error": "the process ended"}
        if "error" in answer:
            self.stderr.seek(0)
            raise RuntimeError(f"benchmark worker for {self.target.label}: {answer['error']}\n"
                               f"{self.stderr.read()[-3000:]}")
        return answer

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        """Ask the process to exit, then stop it (terminated, killed if it must be) and reap it."""
        try:
            if self.process.poll() is None:
                self.process.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=processes.GRACE_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            processes.stop(self.process)
            self.process.stdout.close()
            self.stderr.close()


def settings_of(batch_sizes: list[int], fixed_length: int) -> list[tuple[str, int, int | None]]:
    """(setting, batch size, padded length or None for the batch's longest text)."""
    return [(name, size, length) for size in batch_sizes
            for name, length in (("real", None), (f"fixed{fixed_length}", fixed_length))]


def measure_all(targets: list[Target], args: BenchmarkArgs, settings, threads: int, eval_texts: list[str],
                bench_texts: list[str], tmp: Path) -> dict:
    """Every target's timings per setting and round, memory, evaluation logits and load facts."""
    workers, facts = {}, {}
    try:
        for target in targets:
            log.info("preparing %s ...", target.label)
            request, parameters = load_request(target, tmp / f"model-{len(workers)}")
            workers[target.label] = Worker(target, threads, tmp / f"worker-{len(workers)}.log",
                                           request.get("runtime", "onnxruntime"))
            loaded = workers[target.label].ask(cmd="load", **request)
            facts[target.label] = {**workers[target.label].hello, **loaded,
                                   "parameters": loaded["parameters"] or parameters}
        times = {label: {s[0:2]: {} for s in settings} for label in workers}
        per_round = math.ceil(args.samples / args.rounds)
        for r, (name, size, length), label in timing.interleaved(list(workers), args.rounds, settings):
            if not times[label][(name, size)] and label == next(iter(workers)) and r == 0:
                log.info("measuring %s, batch %d: %d rounds", name, size, args.rounds)
            times[label][(name, size)][r] = workers[label].ask(
                cmd="time", texts=bench_texts, batch_size=size, length=length, warmup=WARMUP_BATCHES,
                samples=per_round, budget_s=args.time_budget, min_samples=args.min_batches)
        for label, worker in workers.items():  # memory first: the accuracy pass must not count
            facts[label].update(worker.ask(cmd="memory"))
            facts[label]["logits"] = np.asarray(worker.ask(cmd="evaluate", texts=eval_texts)["logits"])
    finally:
        for worker in workers.values():
            worker.close()
    return {"times": times, "facts": facts}


# ----------------------------------------------------------------------------- statistics per row

def speed_columns(times: dict, reference: dict | None, prefix: str) -> dict:
    """`prefix` (a speedup vs `reference`, the median of per-round ratios) and its 95% interval."""
    if reference is None:
        return {prefix: math.nan, f"{prefix}_low": math.nan, f"{prefix}_high": math.nan}
    ratios = timing.per_round_ratios({r: t["model_ms"] for r, t in reference.items()},
                                     {r: t["model_ms"] for r, t in times.items()})
    median, low, high = timing.median_interval(ratios)
    return {prefix: median, f"{prefix}_low": low, f"{prefix}_high": high}


def timing_columns(times: dict, batch_size: int) -> dict:
    """Pooled percentiles (withheld below their sample floor), throughput and the round-to-round spread."""
    model = [ms for t in times.values() for ms in t["model_ms"]]
    tokenize = [ms for t in times.values() for ms in t["tokenize_ms"]]
    total = np.array(model) + np.array(tokenize)
    columns = {"samples": len(model), "rounds": len(times)}
    for q in timing.PERCENTILES:
        columns[f"model_p{q}_ms"] = timing.percentile(model, q)
    columns.update(tokenize_p50_ms=timing.percentile(tokenize, 50), total_p50_ms=timing.percentile(total, 50),
                   total_p99_ms=timing.percentile(total, 99),
                   throughput_per_s=float(batch_size * len(total) / (total.sum() / 1000)),
                   round_spread_pct=timing.round_spread_pct({r: t["model_ms"] for r, t in times.items()}))
    return columns


def reference_label(target: Target, targets: list[Target], role: str) -> str | None:
    """The row a target's speedup is against: the fp32 teacher on the same device family (GPU rows
    against the teacher's row of the same GPU backend, CPU rows against its CPU fp32 row), or, for
    `role` peer, the peer baseline of the same quantized model."""
    if role == "peer":
        peer = [t for t in targets if t.backend == PEER and (t.name, t.version) == (target.name, target.version)]
        return peer[0].label if peer else None
    backend = target.backend if target.backend.startswith("torch_cuda") else "torch_fp32"
    teacher = [t for t in targets if t.role == "teacher" and t.backend == backend]
    return teacher[0].label if teacher else None


def rows_of(targets: list[Target], measured: dict, settings, labels: np.ndarray, label_names: list[str],
            threads: int) -> tuple[pd.DataFrame, dict]:
    """One row per (target, setting): quality, timing statistics, speedups, memory; and the probabilities."""
    rows, probs, cpu_name = [], {}, cpu_features()["model_name"]
    for target in targets:
        facts = measured["facts"][target.label]
        quality = metrics.classification_metrics(facts["logits"], labels, label_names)
        probs[target.label] = metrics.probabilities(facts["logits"])
        teacher = reference_label(target, targets, "teacher")
        served = target.role == "quantize" and target.backend != "onnx_fp32"
        peer = reference_label(target, targets, "peer") if served else None
        for name, size, _ in settings:
            times = measured["times"][target.label][(name, size)]
            row = {"model": target.name, "version": target.version, "role": target.role, "backend": target.backend,
                   "served_int8": served, "label": target.label, "setting": name, "batch_size": size, **timing_columns(times, size),
                   **speed_columns(times, measured["times"][teacher][(name, size)] if teacher else None,
                                   "speedup_vs_teacher"),
                   **speed_columns(times, measured["times"][peer][(name, size)] if peer else None, "speedup_vs_peer"),
                   "accuracy": quality["accuracy"], "macro_recall": quality["macro_recall"], "ece": quality["ece"],
                   "size_mb": facts["size_mb"], "parameters": facts["parameters"],
                   "runtime_rss_mb": facts["runtime_rss_mb"], "model_rss_mb": facts["peak_rss_mb"] - facts["runtime_rss_mb"],
                   "peak_rss_mb": facts["peak_rss_mb"], "imports_torch": facts["imports_torch"],
                   "peak_gpu_mb": facts["peak_gpu_mb"], "threads": threads, "cpu": cpu_name}
            rows.append(row)
    frame = pd.DataFrame(rows)
    for metric in ("accuracy", "macro_recall"):  # INT8 vs the peer baseline, in points, on the same texts
        peer_quality = frame[frame["backend"] == PEER].set_index(["model", "version", "setting", "batch_size"])[metric]
        frame[f"{metric}_vs_peer_points"] = [
            100 * (row[metric] - peer_quality.get((row["model"], row["version"], row["setting"], row["batch_size"]),
                                                  math.nan)) if row["served_int8"] else math.nan
            for _, row in frame.iterrows()]
    return frame, probs


# ----------------------------------------------------------------------------- report

def shown_speedup(row, prefix: str = "speedup_vs_teacher") -> str:
    """`3.1x [2.9, 3.3]`, `3.1x` without an interval, `n/a` without a reference."""
    if pd.isna(row[prefix]):
        return "n/a"
    interval = "" if pd.isna(row[f"{prefix}_low"]) else f" [{row[f'{prefix}_low']:.1f}, {row[f'{prefix}_high']:.1f}]"
    return f"{row[prefix]:.1f}x{interval}"


def summary_table(frame: pd.DataFrame, dataset: str) -> str:
    """Markdown: one row per model version and backend, smallest and largest batch at the fixed length."""
    metric = "macro_recall" if dataset == "tweeteval" else "accuracy"
    small, large = frame["batch_size"].min(), frame["batch_size"].max()
    rows = [f"| model | backend | params (M) | size (MB) | {metric} | ECE | p50 ms (b={small}) | p99 ms (b={small}) | "
            f"samples (b={small}) | speedup b={small} | speedup b={large} | vs optimum INT8 b={small} | "
            f"runtime MB | model MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fixed = frame[frame["setting"].str.startswith("fixed")]
    for (model, version, backend), group in fixed.groupby(["model", "version", "backend"], sort=False):
        one, many = group[group["batch_size"] == small].iloc[0], group[group["batch_size"] == large].iloc[0]
        p99 = "n/a" if pd.isna(one["model_p99_ms"]) else f"{one['model_p99_ms']:.1f}"
        rows.append(f"| {model} v{version} | {backend} | {one['parameters'] / 1e6:.1f} | {one['size_mb']:.0f} | "
                    f"{one[metric]:.4f} | {one['ece']:.4f} | {one['model_p50_ms']:.1f} | {p99} | {one['samples']} | "
                    f"{shown_speedup(one)} | {shown_speedup(many)} | {shown_speedup(one, 'speedup_vs_peer')} | "
                    f"{one['runtime_rss_mb']:.0f} | {one['model_rss_mb']:.0f} |")
    return "\n".join(rows)


def figures(frame: pd.DataFrame, probs: dict, labels: np.ndarray, dataset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "macro_recall" if dataset == "tweeteval" else "accuracy"
    b1 = frame[(frame["batch_size"] == 1) & frame["setting"].str.startswith("fixed")].dropna(subset=["model_p50_ms"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for _, row in b1.iterrows():
        ax.scatter(row["model_p50_ms"], row[metric])
        ax.annotate(row["label"], (row["model_p50_ms"], row[metric]), fontsize=7)
    ax.set(xscale="log" if len(b1) else "linear", xlabel="p50 latency, batch 1, fixed length (ms, log)", ylabel=metric,
           title=f"{dataset}: accuracy vs latency")
    tracking.log_figure(fig, "figures/pareto_accuracy_vs_latency.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, size in ((-0.2, frame["batch_size"].min()), (0.2, frame["batch_size"].max())):
        rows = frame[(frame["batch_size"] == size) & frame["setting"].str.startswith("fixed")]
        errors = [(rows["speedup_vs_teacher"] - rows["speedup_vs_teacher_low"]).fillna(0).clip(lower=0),
                  (rows["speedup_vs_teacher_high"] - rows["speedup_vs_teacher"]).fillna(0).clip(lower=0)]
        ax.bar(np.arange(len(rows)) + offset, rows["speedup_vs_teacher"], width=0.4, yerr=errors, capsize=2,
               label=f"batch {size}")
        ax.set_xticks(np.arange(len(rows)), rows["label"], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="speedup vs fp32 teacher", title=f"{dataset}: speedup (fixed length), 95% intervals over rounds")
    ax.legend()
    fig.tight_layout()
    tracking.log_figure(fig, "figures/speedup.png")
    tracking.log_figure(metrics.reliability_figure({k: (p, labels) for k, p in probs.items()}, dataset),
                        "figures/reliability_diagrams.png")


def run(args: BenchmarkArgs) -> pd.DataFrame:
    """Measure every target, write results/benchmarks/<dataset>-<time>.csv and log everything."""
    batch_sizes = args.validate()
    if math.isnan(timing.median_interval(range(args.rounds))[1]):  # the test the intervals themselves apply
        log.warning("rounds=%d: too few for a 95%% speedup interval (it needs at least 6); every interval "
                    "will be empty (n/a in the report).", args.rounds)
    threads = args.threads or os.cpu_count()
    tracking.configure()
    splits = load_splits(args.dataset, args.data_dir, max_eval_samples=args.max_eval_samples, seed=args.seed)
    tracking.use_experiment(splits.name)
    targets = discover(args, splits.name)
    eval_texts, labels = splits.test["text"].tolist(), splits.test["label"].to_numpy()
    bench_texts = splits.test["text"].sample(frac=1.0, random_state=args.seed).tolist()[:512]
    settings = settings_of(batch_sizes, args.fixed_length)

    with tracking.step_run("benchmark", f"benchmark-{splits.name}"), tempfile.TemporaryDirectory() as tmp:
        cpu_name = cpu_features()["model_name"]
        tracking.log_params({**asdict(args), "n_eval": len(eval_texts), "models_measured": len(targets),
                             "warmup_batches": WARMUP_BATCHES})
        tracking.log_environment(threads)
        tracking.log_texts(splits.test[["text", "label"]], f"{splits.name}-test-{len(splits.test)}", splits.source, "test")
        measured = measure_all(targets, args, settings, threads, eval_texts, bench_texts, Path(tmp))
        frame, probs = rows_of(targets, measured, settings, labels, splits.label_names, threads)
        noise = float(np.nanmedian(frame["round_spread_pct"])) if frame["round_spread_pct"].notna().any() else math.nan

        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        csv_path = out_dir / f"{splits.name}-{stamp}.csv"
        frame.to_csv(csv_path, index=False)
        markdown = summary_table(frame, splits.name)
        (out_dir / f"{splits.name}-{stamp}.md").write_text(
            f"Machine: {cpu_name}, {os.cpu_count()} cores, {threads} threads; {len(eval_texts)} test texts; "
            f"{args.rounds} interleaved rounds; measured noise (median round-to-round spread of a row's p50): "
            f"{noise:.1f}%.\n\n{markdown}\n")
        mlflow.log_artifact(str(csv_path), "benchmark")
        mlflow.log_text(markdown, "benchmark/summary.md")
        mlflow.log_table(frame, "benchmark/results.json")
        mlflow.log_metric("noise_round_spread_pct", noise)
        figures(frame, probs, labels, splits.name)
        for _, row in frame[frame["setting"].str.startswith("fixed")].iterrows():
            key = f"{row['model'].removeprefix(f'{tracking.MODEL_PREFIX}-')}.v{row['version']}.{row['backend']}.b{row['batch_size']}"
            mlflow.log_metrics({f"{key}.{column}": row[column] for column in (
                "model_p50_ms", "speedup_vs_teacher", "speedup_vs_teacher_low", "speedup_vs_teacher_high")
                if not pd.isna(row[column])})
        log.info("%s\nmeasured noise %.1f%%; wrote %s", markdown, noise, csv_path)
    return frame
