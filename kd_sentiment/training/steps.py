"""What the training steps (teacher, distill) share: arguments, set-up, train+evaluate, publish.

A training step is: open the step's MLflow run -> log params, environment and data -> train with
the shared loop -> evaluate on validation/test (with calibration) -> log the model and register it
under an alias. Only the main process talks to MLflow; every process trains and evaluates.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed

from kd_sentiment.core import descriptions, tracking
from kd_sentiment.core.metrics import majority_floor
from kd_sentiment.core.data import Splits, load_splits
from kd_sentiment.core.errors import UserError
from kd_sentiment.training.evaluation import evaluate, log_evaluation
from kd_sentiment.training.losses import UNLABELLED
from kd_sentiment.core.machine import native_mixed_precision, peak_gpu_memory_mb, reset_peak_gpu_memory
from kd_sentiment.core.models import EVERY_OTHER, count_parameters, flops_per_example
from kd_sentiment.core.parameters import StepArgs
from kd_sentiment.training.loop import Checkpoints, TrainData, TrainResult, read_checkpoint_state, train

log = logging.getLogger(__name__)


def slug(text: str) -> str:
    """A name safe for folders and registry names: `../models/all-MiniLM-L6-v2#layers=0,2` -> `all-minilm-l6-v2-l0-2`."""
    base, _, layers = text.rstrip("/").partition("#layers=")
    name = Path(base).name if ("/" in base and Path(base).expanduser().exists()) else base.replace("/", "-")
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not layers:
        return name
    return f"{name}-{EVERY_OTHER}" if layers.strip() == EVERY_OTHER else f"{name}-l{re.sub('[^0-9]+', '-', layers)}"


@dataclass
class StepContext:
    """What a step has once set up: data, catalog, accelerator and where its files go."""

    splits: Splits
    catalog: dict
    accelerator: Accelerator
    output_dir: Path
    run_id: str | None  # the MLflow run to continue when resuming, else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def step_accelerator(cpu: bool, mixed_precision: str) -> Accelerator:
    """This step's Accelerator. The pipeline runs its steps in one process, and accelerate keeps one
    state per process that refuses another mixed precision or `cpu` (an fp32 teacher, then a bf16
    student); one process starts afresh, where a launch of several must keep them for every step."""
    try:
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        if PartialState().num_processes > 1:  # its process group (and FSDP or DeepSpeed set-up) must stay
            raise UserError(f"mixed_precision={mixed_precision!r}, cpu={cpu}: under a launch of several processes "
                            "every step of the pipeline needs the same mixed_precision and cpu; set them alike in "
                            "the config's teacher and distill sections.") from None
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def set_up(step: str, args: StepArgs, model_name: str, catalog: dict) -> StepContext:
    """Validate arguments, load the data, create the accelerator, find a checkpoint to resume."""
    args.validate()
    tracking.configure()
    splits = load_splits(args.dataset, args.data_dir, args.validation_size, args.max_train_samples,
                         args.max_eval_samples, args.data_seed)
    if args.train.mixed_precision == "auto":  # resolved here, so the run logs what it trained in
        args.train.mixed_precision = native_mixed_precision(on_gpu=torch.cuda.is_available() and not args.cpu)
        log.info("mixed_precision auto: %s on this machine", args.train.mixed_precision)
    accelerator = step_accelerator(args.cpu, args.train.mixed_precision)
    reset_peak_gpu_memory(accelerator.device)  # this step's peak, not an earlier step's of the same process
    set_seed(args.train.seed)  # before any model is built: a new classifier head is randomly initialised
    if accelerator.is_main_process:
        tracking.use_experiment(splits.name)
    output_dir, run_id = resume_point(step, args, splits.name, model_name)
    return StepContext(splits, catalog, accelerator, output_dir, run_id)


def resume_point(step: str, args: StepArgs, dataset: str, model_name: str) -> tuple[Path, str | None]:
    """(checkpoint folder, the MLflow run to continue or None); a resume of a finished run, or with
    other settings than the checkpoint's, is a UserError."""
    output_dir, state = checkpoint_location(step, args, dataset, model_name)
    run_id = state.get("mlflow_run_id") if state else None
    refuse_finished(run_id, output_dir)
    if state:
        refuse_other_settings(state, args, output_dir)
    return output_dir, run_id


RESUME_FREE = ("resume", "output_dir")  # may differ between attempts: whether and where to continue


def settings_of(args: StepArgs) -> dict[str, str]:
    """What a training run is made with, as text: every argument but RESUME_FREE. Each checkpoint
    records them, so a resume can be held to them."""
    flat = {**{k: v for k, v in asdict(args).items() if k != "train"}, **asdict(args.train)}
    return {k: str(v) for k, v in flat.items() if k not in RESUME_FREE}


def refuse_other_settings(state: dict, args: StepArgs, output_dir: Path) -> None:
    """A UserError naming each setting in which this resume differs from the checkpoint's: resuming
    would continue its optimizer state over another run's batches and keep the first attempt's
    parameters on the run."""
    recorded = state.get("settings")
    if recorded is None:
        log.warning("resume: the checkpoint in %s predates recorded settings; they cannot be checked.", output_dir)
        return
    now = settings_of(args)
    differing = [f"{key} {recorded.get(key)!r} there, {now.get(key)!r} now" for key in sorted(set(recorded) | set(now))
                 if recorded.get(key) != now.get(key)]
    if differing:
        raise UserError(f"resume=true: the checkpoint in output_dir={output_dir} was made with other settings "
                        f"({'; '.join(differing)}). Resume with its settings, or train anew with resume=false or "
                        "another output_dir.")


def refuse_finished(run_id: str | None, output_dir: Path) -> None:
    """Resuming continues an interrupted run; a run that already finished is not trained again
    (nor registered again): one line says so and names what it registered."""
    if not run_id:
        return
    run = mlflow.get_run(run_id)
    if run.info.status == "FINISHED":
        tags = run.data.tags
        registered = (f" and registered {tags['registered_model']} version {tags['registered_version']}"
                      if "registered_model" in tags else "")
        raise UserError(f"resume=true: the run in output_dir={output_dir} ({run_id}) already finished{registered}; "
                        "nothing to resume. Train again with resume=false or another output_dir.")


def checkpoint_location(step: str, args: StepArgs, dataset: str, model_name: str) -> tuple[Path, dict | None]:
    """Where a model's checkpoints go, and when resuming the last checkpoint's state there (its MLflow
    run, its settings), if any."""
    default = f"outputs/{step}-{dataset}-{slug(model_name)}"
    if args.train.alpha:
        default += f"-a{args.train.alpha:g}-T{args.train.temperature:g}"
    if args.data_seed != StepArgs.data_seed:  # other texts: never resume one from the other's checkpoint
        default += f"-d{args.data_seed}"
    output_dir = Path(args.output_dir or f"{default}-s{args.train.seed}")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir={output_dir}: exists and is not a folder; checkpoints need a folder.")
    return output_dir, read_checkpoint_state(output_dir) if args.resume else None


def log_step_params(ctx: StepContext, args: StepArgs, **params) -> None:
    tracking.log_params({**{k: v for k, v in asdict(args).items() if k != "train"}, **asdict(args.train),
                         "num_processes": ctx.accelerator.num_processes, **params})
    tracking.log_environment(threads=torch.get_num_threads(), device=str(ctx.accelerator.device))
    tracking.log_splits(ctx.splits)


def fit_and_evaluate(ctx: StepContext, args: StepArgs, model, tokenizer, teacher_logits=None,
                     transfer: tuple[list[str], np.ndarray] | None = None):
    """Train with the shared loop, then evaluate; logs per-epoch history and final metrics.

    teacher_logits: soft targets of the labelled training texts. transfer: (texts, the teacher's
    logits) of a transfer set, trained on beside the labelled texts with the KD loss alone: one pool,
    so each length-grouped batch mixes the two in proportion to their numbers.
    Returns (TrainResult, metrics, test_logits); metrics carry `val_*`, `test_*`, calibration.
    """
    splits, acc = ctx.splits, ctx.accelerator
    run_id = mlflow.active_run().info.run_id if ctx.is_main else None
    texts, labels = splits.train["text"].tolist(), splits.train["label"].to_numpy()
    if transfer is not None:
        texts = texts + list(transfer[0])
        labels = np.concatenate([labels, np.full(len(transfer[0]), UNLABELLED, dtype=labels.dtype)])
        teacher_logits = np.concatenate([teacher_logits, transfer[1]])
    if ctx.is_main:
        mlflow.log_metrics(token_lengths(tokenizer, texts, args.train.max_length))
    data = TrainData(texts, labels, splits.validation["text"].tolist(), splits.validation["label"].to_numpy(),
                     splits.label_names, splits.selection_metric, teacher_logits)
    result: TrainResult = train(model, tokenizer, data, args.train, acc,
                                Checkpoints(ctx.output_dir, args.resume, {"mlflow_run_id": run_id,
                                                                          "settings": settings_of(args)}),
                                log_metrics=mlflow.log_metrics if ctx.is_main else (lambda m, s: None))
    metrics, test_logits = evaluate(result.model, tokenizer, splits, args.train.max_length,
                                       args.train.batch_size * 2, acc)
    metrics.update(best_epoch=result.best_epoch, parameters=count_parameters(result.model),
                   flops_per_example=flops_per_example(result.model.config, args.train.max_length))
    peak = peak_gpu_memory_mb(acc.device)
    if peak is not None:
        metrics["peak_gpu_memory_mb"] = peak
    if ctx.is_main:
        log.info(f"{mlflow.active_run().info.run_name}: ran on {acc.device}"
                 + (f", peak GPU memory {peak:.0f} MiB" if peak is not None else ""))
        if result.resumed_from_step:
            mlflow.set_tag("resumed_from_step", str(result.resumed_from_step))
        log_evaluation(metrics, test_logits, splits, mlflow.active_run().info.run_name)
    return result, metrics, test_logits


def token_lengths(tokenizer, texts: list[str], max_length: int) -> dict[str, float]:
    """The training texts' length in tokens (p50/p90/p99/max) and the share `max_length` truncates:
    what the next sizing of max_length (and of the time it costs) is read from."""
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
    return {**{f"train_tokens_p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)},
            "train_tokens_max": float(lengths.max()), "train_truncated_share": float((lengths > max_length).mean())}


def publish(model, tokenizer, splits: Splits, registered_name: str, alias: str, tags: dict, max_length: int,
            metrics: dict) -> None:
    """Log the model as an MLflow transformers pipeline and register it under `alias` (main process).

    A model no better than the majority class on validation (`majority_floor`) is registered
    without the alias, and the step says so in one line. The model is moved to the CPU first: the
    logged pipeline is device-independent and runs where it is loaded."""
    model.to("cpu")
    example = splits.test["text"].iloc[:2].tolist()
    model_uri = tracking.log_classifier(model, tokenizer, example, max_length)
    tags = {**tags, "dataset": splits.name, "label_names": ",".join(splits.label_names),
            "run_id": mlflow.active_run().info.run_id}
    below_floor = majority_floor(metrics, splits.selection_metric)
    if below_floor:
        tags["alias_withheld"] = below_floor
        log.warning("%s: %s; registered without an alias.", registered_name, below_floor)
        alias = ""
    params = mlflow.get_run(tags["run_id"]).data.params
    description = descriptions.trained_version(tags["step"], params, metrics, splits.name, splits.selection_metric)
    version = tracking.register(model_uri, registered_name, alias or None, tags, description,
                                descriptions.registered_model(registered_name, tags["step"], splits.name))
    mlflow.set_tags({"registered_model": registered_name, "registered_version": version.version})
    tracking.describe_run(description)
    log.info(f"Registered {registered_name} version {version.version}"
          + (f" with alias '{alias}': models:/{registered_name}@{alias}" if alias else ""))
