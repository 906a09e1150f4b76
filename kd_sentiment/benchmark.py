"""The `benchmark` step: every model, in every backend it has, measured the same way on this machine.

Models: by default every registered version behind an alias whose `dataset` tag is the dataset
(teacher, students, INT8 models), or an explicit list of `models:/` URIs. Backends: PyTorch fp32
on the CPU for transformers models, and on a machine with a CUDA GPU also PyTorch fp32 and bf16 on
the GPU (same texts; the copy of the logits to the host waits for the GPU, so timings are
synchronised); ONNX Runtime INT8 for quantized models, plus ONNX fp32 from the fused fp32 graph
their quantize run kept. Each (model, backend) is measured in a fresh subprocess, one after
another with the same thread count, so peak memory is the model's own and no heap is shared.

Per setting (batch size x {real text lengths, fixed length}): warm-up batches are discarded, then
batches are timed until the median is stable or the time budget is spent; tokenization and model
time are timed separately. Accuracy, macro-recall and ECE come from the same process, on the same
evaluation texts for every model. Results: a CSV under results/benchmarks/, an MLflow table,
figures (accuracy vs latency, speedup, reliability diagrams) and a Markdown summary.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from kd_sentiment import calibration, tracking
from kd_sentiment.data import load_splits
from kd_sentiment.errors import UserError
from kd_sentiment.schema import BenchmarkArgs
from kd_sentiment.machine import cpu_features, peak_gpu_memory_mb

log = logging.getLogger(__name__)

WARMUP_BATCHES = 3
# PyTorch backends: name -> (device, dtype). The GPU ones are measured only where CUDA is available.
TORCH_BACKENDS = {"torch_fp32": ("cpu", "float32"), "torch_cuda_fp32": ("cuda", "float32"),
                  "torch_cuda_bf16": ("cuda", "bfloat16")}


# ----------------------------------------------------------------------------- what to measure

@dataclass
class Target:
    """One model in one backend."""

    name: str
    version: str
    role: str          # teacher | distill | quantize
    backend: str       # a TORCH_BACKENDS name | onnx_fp32 | onnx_int8
    uri: str           # what the worker loads: models:/NAME/VERSION, or runs:/ID/onnx_fp32 for ONNX fp32
    max_length: int
    tokenizer_uri: str = ""  # ONNX backends: the fp32 export folder, which holds the full tokenizer

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


def targets_for(version, backends: list[str]) -> list[Target]:
    """The targets of one registered version: each PyTorch backend of `backends`, or the ONNX ones."""
    role = version.tags.get("step", "distill")
    uri = f"models:/{version.name}/{version.version}"
    max_length = run_max_length(version.tags.get("run_id") or version.run_id)
    if role != "quantize":
        return [Target(version.name, version.version, role, backend, uri, max_length) for backend in backends]
    fp32 = f"runs:/{version.tags['run_id']}/onnx_fp32"
    return [Target(version.name, version.version, role, "onnx_fp32", fp32, max_length, fp32),
            Target(version.name, version.version, role, "onnx_int8", uri, max_length, fp32)]


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
                        "quantize steps first, or pass models=models:/NAME@ALIAS,...")
    order = {"teacher": 0, "distill": 1, "quantize": 2}
    versions.sort(key=lambda v: (order.get(v.tags.get("step"), 1), v.name, int(v.version)))
    backends = torch_backends()
    return [t for v in versions for t in targets_for(v, backends)]


# ----------------------------------------------------------------------------- the worker (own process)

def load_backend(target: dict, threads: int, workdir: Path):
    """(predict(encoded) -> logits ndarray, tokenizer, size_mb, parameters) for one target."""
    if target["backend"] in TORCH_BACKENDS:
        import torch

        device, dtype = TORCH_BACKENDS[target["backend"]]
        torch.set_num_threads(threads)
        model, tokenizer = tracking.load_registered_classifier(target["uri"])
        model.to(device=device, dtype=getattr(torch, dtype))
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

        def predict(encoded):
            with torch.inference_mode():
                logits = model(**{k: torch.from_numpy(v).to(device) for k, v in encoded.items()}).logits
                return logits.float().cpu().numpy()  # the copy to the host waits for the GPU's kernels
        return predict, tokenizer, size, sum(p.numel() for p in model.parameters())

    import onnx

    from kd_sentiment.runtime import OnnxClassifier

    local = Path(mlflow.artifacts.download_artifacts(target["uri"], dst_path=str(workdir / "model")))
    onnx_path = next(local.rglob("model.onnx"))
    tokenizer_dir = mlflow.artifacts.download_artifacts(target["tokenizer_uri"], dst_path=str(workdir / "tokenizer"))
    runner = OnnxClassifier(onnx_path, Path(tokenizer_dir), intra_op_num_threads=threads)
    parameters = int(sum(np.prod(t.dims) for t in onnx.load(str(onnx_path)).graph.initializer))
    return runner.run, runner.tokenizer, onnx_path.stat().st_size / 2**20, parameters


def time_setting(predict, tokenizer, texts: list[str], batch_size: int, padding, max_length: int,
                 budget: float, min_batches: int, max_batches: int) -> dict:
    """Latency of batches of consecutive real texts; tokenization and model timed separately."""
    def batch(i):
        start = (i * batch_size) % len(texts)
        return (texts + texts)[start:start + batch_size]

    tok_ms, model_ms = [], []
    deadline = None
    for i in range(WARMUP_BATCHES + max_batches):
        t0 = time.perf_counter()
        encoded = dict(tokenizer(batch(i), padding=padding, truncation=True, max_length=max_length, return_tensors="np"))
        t1 = time.perf_counter()
        predict(encoded)
        t2 = time.perf_counter()
        if i < WARMUP_BATCHES:
            continue
        deadline = deadline or t0 + budget
        tok_ms.append(1000 * (t1 - t0))
        model_ms.append(1000 * (t2 - t1))
        n = len(model_ms)
        if n >= min_batches:
            # Stable: the median of all batches is within 2% of the median of the first half.
            stable = abs(np.median(model_ms) - np.median(model_ms[: n // 2])) <= 0.02 * np.median(model_ms)
            if stable or t2 > deadline:
                break
    total = np.array(tok_ms) + np.array(model_ms)
    return {"batches": len(model_ms), "model_p50_ms": float(np.percentile(model_ms, 50)),
            "model_p95_ms": float(np.percentile(model_ms, 95)), "model_p99_ms": float(np.percentile(model_ms, 99)),
            "tokenize_p50_ms": float(np.percentile(tok_ms, 50)), "total_p50_ms": float(np.percentile(total, 50)),
            "total_p99_ms": float(np.percentile(total, 99)),
            "throughput_per_s": float(batch_size * len(total) / (total.sum() / 1000))}


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB.

    On Linux, VmHWM from /proc/self/status: it starts afresh at exec. getrusage's ru_maxrss does
    not: a subprocess starts with its parent's peak, so a benchmark launched by the pipeline after
    training read the pipeline's 5.4 GB for every model. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)


def worker(spec_path: str) -> None:
    """Entry point of the measuring subprocess: reads a JSON spec, writes a JSON result beside it."""
    spec = json.loads(Path(spec_path).read_text())
    rss_before = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        predict, tokenizer, size_mb, parameters = load_backend(spec["target"], spec["threads"], Path(tmp))
        max_length = spec["target"]["max_length"]
        eval_logits = []
        for start in range(0, len(spec["eval_texts"]), 64):
            chunk = spec["eval_texts"][start:start + 64]
            eval_logits.append(predict(dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                                                      return_tensors="np"))))
        settings = []
        for batch_size in spec["batch_sizes"]:
            for setting, padding, length in (("real", True, max_length),
                                             (f"fixed{spec['fixed_length']}", "max_length", spec["fixed_length"])):
                timing = time_setting(predict, tokenizer, spec["bench_texts"], batch_size, padding, length,
                                      spec["time_budget"], spec["min_batches"], spec["max_batches"])
                settings.append({"setting": setting, "batch_size": batch_size, **timing})
    peak = peak_rss_mb()
    device = TORCH_BACKENDS.get(spec["target"]["backend"], ("cpu", None))[0]
    Path(spec["result_path"]).write_text(json.dumps({
        "eval_logits": np.concatenate(eval_logits).tolist(), "settings": settings, "size_mb": size_mb,
        "parameters": parameters, "peak_rss_mb": peak, "rss_before_load_mb": rss_before,
        "peak_gpu_mb": peak_gpu_memory_mb(device) if device == "cuda" else None}))


def measure(target: Target, args: BenchmarkArgs, batch_sizes, threads, eval_texts, bench_texts, tmp: Path) -> dict:
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(json.dumps({
        "target": asdict(target), "threads": threads, "batch_sizes": batch_sizes, "fixed_length": args.fixed_length,
        "eval_texts": eval_texts, "bench_texts": bench_texts, "time_budget": args.time_budget,
        "min_batches": args.min_batches, "max_batches": args.max_batches, "result_path": str(result_path)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    code = "import sys; from kd_sentiment.benchmark import worker; worker(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, str(spec_path)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker for {target.label} failed:\n{out.stderr[-3000:]}")
    return json.loads(result_path.read_text())


# ----------------------------------------------------------------------------- report

def summary_table(frame: pd.DataFrame, dataset: str) -> str:
    """Markdown: one row per model version and backend, smallest and largest batch at the fixed length."""
    metric = "macro_recall" if dataset == "tweeteval" else "accuracy"
    small, large = frame["batch_size"].min(), frame["batch_size"].max()
    rows = [f"| model | backend | params (M) | size (MB) | {metric} | ECE | p50 ms (b={small}) | "
            f"speedup b={small} | speedup b={large} |", "|---|---|---|---|---|---|---|---|---|"]
    fixed = frame[frame["setting"].str.startswith("fixed")]
    for (model, version, backend), group in fixed.groupby(["model", "version", "backend"], sort=False):
        b1 = group[group["batch_size"] == small]
        b32 = group[group["batch_size"] == large]
        first = group.iloc[0]
        rows.append(f"| {model} v{version} | {backend} | {first['parameters'] / 1e6:.1f} | {first['size_mb']:.0f} | "
                    f"{first[metric]:.4f} | {first['ece']:.4f} | {b1['model_p50_ms'].iloc[0]:.1f} | "
                    f"{b1['speedup_vs_teacher'].iloc[0]:.1f}x | {b32['speedup_vs_teacher'].iloc[0]:.1f}x |")
    return "\n".join(rows)


def figures(frame: pd.DataFrame, probs: dict, labels: np.ndarray, dataset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "macro_recall" if dataset == "tweeteval" else "accuracy"
    b1 = frame[(frame["batch_size"] == 1) & frame["setting"].str.startswith("fixed")]
    fig, ax = plt.subplots(figsize=(7, 5))
    for _, row in b1.iterrows():
        ax.scatter(row["model_p50_ms"], row[metric])
        ax.annotate(row["label"], (row["model_p50_ms"], row[metric]), fontsize=7)
    ax.set(xscale="log", xlabel="p50 latency, batch 1, fixed length (ms, log)", ylabel=metric,
           title=f"{dataset}: accuracy vs latency")
    tracking.log_figure(fig, "figures/pareto_accuracy_vs_latency.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, size in ((-0.2, frame["batch_size"].min()), (0.2, frame["batch_size"].max())):
        rows = frame[(frame["batch_size"] == size) & frame["setting"].str.startswith("fixed")]
        ax.bar(np.arange(len(rows)) + offset, rows["speedup_vs_teacher"], width=0.4, label=f"batch {size}")
        ax.set_xticks(np.arange(len(rows)), rows["label"], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="speedup vs fp32 teacher", title=f"{dataset}: speedup (fixed length)")
    ax.legend()
    fig.tight_layout()
    tracking.log_figure(fig, "figures/speedup.png")
    tracking.log_figure(calibration.reliability_figure({k: (p, labels) for k, p in probs.items()}, dataset),
                        "figures/reliability_diagrams.png")


def run(args: BenchmarkArgs) -> pd.DataFrame:
    """Measure every target, write results/benchmarks/<dataset>-<time>.csv and log everything."""
    batch_sizes = args.validate()
    threads = args.threads or os.cpu_count()
    tracking.configure()
    splits = load_splits(args.dataset, args.data_dir, max_eval_samples=args.max_eval_samples, seed=args.seed)
    tracking.use_experiment(splits.name)
    targets = discover(args, splits.name)
    eval_texts, labels = splits.test["text"].tolist(), splits.test["label"].to_numpy()
    bench_texts = splits.test["text"].sample(frac=1.0, random_state=args.seed).tolist()[:512]

    with tracking.step_run("benchmark", f"benchmark-{splits.name}"), tempfile.TemporaryDirectory() as tmp:
        cpu_name = cpu_features()["model_name"]
        tracking.log_params({**asdict(args), "n_eval": len(eval_texts), "models_measured": len(targets)})
        tracking.log_environment(threads)
        rows, probs = [], {}
        for target in targets:
            log.info("measuring %s ...", target.label)
            result = measure(target, args, batch_sizes, threads, eval_texts, bench_texts, Path(tmp))
            logits = np.asarray(result["eval_logits"])
            quality = calibration.classification_metrics(logits, labels, splits.label_names)
            probs[target.label] = calibration.probabilities(logits)
            for setting in result["settings"]:
                rows.append({"model": target.name, "version": target.version, "role": target.role,
                             "backend": target.backend, "label": target.label, **setting,
                             "accuracy": quality["accuracy"], "macro_recall": quality["macro_recall"],
                             "ece": quality["ece"], "size_mb": result["size_mb"], "parameters": result["parameters"],
                             "peak_rss_mb": result["peak_rss_mb"],
                             "model_rss_mb": result["peak_rss_mb"] - result["rss_before_load_mb"],
                             "peak_gpu_mb": result["peak_gpu_mb"], "threads": threads, "cpu": cpu_name})
        frame = pd.DataFrame(rows)
        # Each row against the fp32 teacher on the same device: GPU rows against the teacher's GPU
        # row of the same backend, CPU rows (PyTorch and ONNX) against the teacher's CPU fp32 row.
        teacher = frame[frame["role"] == "teacher"].drop_duplicates(["backend", "setting", "batch_size"])
        base = teacher.set_index(["backend", "setting", "batch_size"])["model_p50_ms"]
        reference = [b if b.startswith("torch_cuda") else "torch_fp32" for b in frame["backend"]]
        frame["speedup_vs_teacher"] = [base.get((r, s, b), np.nan) / p for r, s, b, p in
                                       zip(reference, frame["setting"], frame["batch_size"], frame["model_p50_ms"])]

        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        csv_path = out_dir / f"{splits.name}-{stamp}.csv"
        frame.to_csv(csv_path, index=False)
        markdown = summary_table(frame, splits.name)
        (out_dir / f"{splits.name}-{stamp}.md").write_text(
            f"Machine: {cpu_name}, {os.cpu_count()} cores, {threads} threads; "
            f"{len(eval_texts)} test texts.\n\n{markdown}\n")
        mlflow.log_artifact(str(csv_path), "benchmark")
        mlflow.log_text(markdown, "benchmark/summary.md")
        mlflow.log_table(frame, "benchmark/results.json")
        figures(frame, probs, labels, splits.name)
        for _, row in frame[frame["setting"].str.startswith("fixed")].iterrows():
            key = f"{row['model'].removeprefix(f'{tracking.MODEL_PREFIX}-')}.v{row['version']}.{row['backend']}.b{row['batch_size']}"
            mlflow.log_metrics({f"{key}.p50_ms": row["model_p50_ms"], f"{key}.speedup": row["speedup_vs_teacher"]})
        log.info("%s\nwrote %s", markdown, csv_path)
    return frame
