"""The `distill` step: a small student learns from the registered teacher's soft targets.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)   (losses.py)

The teacher comes from the model registry (`models:/kd-sentiment-teacher-<dataset>@champion` by
default); its logits are cached in MLflow (soft_targets.py), so a second student or another
temperature does not run the teacher again. Teacher and student may use different tokenizers: each
tokenizes the raw text itself, and only output distributions are matched. `alpha=0` trains the same
student on the same data and budget with labels only: the baseline every KD result is compared to
(the teacher is then used only for the comparison metrics on test). A KD student and its baseline
start from the identical initialisation (same source, same seeded head), logged as `student_init`;
a student cut from the teacher starts from the teacher's pre-trained source, never from the
fine-tuned teacher unless `finetuned-teacher-layers:` says so (and never for the baseline).

With a transfer set (`transfer_set`, kd_sentiment/training/transfer_sets.py) the teacher also labels unlabelled
texts, and the student trains on them beside the labelled ones with the KD loss alone (losses.py);
their soft targets go through the same cache. The alpha=0 baseline refuses a transfer set.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
from accelerate.utils import set_seed
from scipy.special import log_softmax

from kd_sentiment.training import soft_targets
from kd_sentiment.core import tracking
from kd_sentiment.core.metrics import classification_metrics
from kd_sentiment.core.data import load_splits
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.models import (EVERY_OTHER, FINETUNED_TEACHER, TEACHER_SOURCE, encoder_layers, keep_layers,
                                 layer_indices, load_catalog, load_classifier, resolve, split_layers, with_layers)
from kd_sentiment.core.parameters import DistillArgs
from kd_sentiment.training.steps import StepContext, fit_and_evaluate, log_step_params, publish, resume_point, set_up, slug
from kd_sentiment.training.teacher import registered_name as teacher_registered_name
from kd_sentiment.training.transfer_sets import TransferSet, load_transfer

log = logging.getLogger(__name__)


def teacher_uri(args: DistillArgs, dataset: str) -> str:
    return args.teacher or f"models:/{teacher_registered_name(dataset)}@champion"


def student_name(student: str) -> str:
    """Registry-friendly name: `minilm` -> minilm, `teacher-layers:0,2,4` -> cut-l0-2-4."""
    return slug(student.replace("teacher-layers:", "cut#layers=").replace("teacher#", "cut#"))


def comparison_metrics(student_test: np.ndarray, teacher_test: np.ndarray, labels: np.ndarray,
                       label_names: list[str], metrics: dict, teacher_logit_scale: float = 1.0) -> dict:
    """Student vs teacher on the same test texts: agreement, KL(teacher || student), retention, and
    the teacher's ECE as used for training (its logits times teacher_logit_scale)."""
    teacher = classification_metrics(teacher_test, labels, label_names)
    as_trained = classification_metrics(teacher_test * teacher_logit_scale, labels, label_names)
    log_p_t, log_p_s = log_softmax(teacher_test.astype(np.float64), 1), log_softmax(student_test.astype(np.float64), 1)
    return {
        "test_agreement_with_teacher": float((student_test.argmax(1) == teacher_test.argmax(1)).mean()),
        "test_kl_teacher_student": float((np.exp(log_p_t) * (log_p_t - log_p_s)).sum(1).mean()),
        "teacher_test_accuracy": teacher["accuracy"],
        "teacher_test_macro_recall": teacher["macro_recall"],
        "teacher_test_ece": teacher["ece"],
        "teacher_scaled_test_ece": as_trained["ece"],
        "retention_accuracy": metrics["test_accuracy"] / teacher["accuracy"],
        "retention_macro_recall": metrics["test_macro_recall"] / teacher["macro_recall"],
    }


def check_labels(version, label_names: list[str]) -> None:
    """The teacher must predict the dataset's classes, in the same order."""
    teacher_labels = version.tags.get("label_names")
    if teacher_labels and teacher_labels != ",".join(label_names):
        raise UserError(f"Teacher models:/{version.name}/{version.version} predicts [{teacher_labels}] but the "
                        f"dataset has labels {label_names}; distil from a teacher trained on this dataset.")


def build_student(student: str, ctx: StepContext, version, model_uri: str):
    """(model, tokenizer, init) for a student spec; `init` says exactly where its first weights come from.

    `teacher-layers:...` cuts the teacher's pre-trained source (its version's `init_source` tag) and
    adds a new, seeded head, as DistilBERT was cut from pre-trained BERT; `finetuned-teacher-layers:...`
    cuts the registered, fine-tuned teacher, head included; anything else is loaded as it is.
    """
    source, layers = resolve(student, ctx.catalog)
    if source not in (TEACHER_SOURCE, FINETUNED_TEACHER):
        model, tokenizer = load_classifier(source, ctx.splits.label_names, layers)
        return model, tokenizer, with_layers(source, layers)
    if not layers:
        raise UserError(f"student={student!r}: a student cut from the teacher needs layers, "
                        f"e.g. teacher-layers:0,2,4 or teacher-layers:{EVERY_OTHER}.")
    if source == FINETUNED_TEACHER:
        model, tokenizer = tracking.load_registered_classifier(model_uri)
        origin = f"fine-tuned teacher {model_uri} (models:/{version.name}/{version.version})"
    else:
        pretrained = version.tags.get("init_source") or version.tags.get("model_source")
        if not pretrained:
            raise UserError(f"student={student!r}: teacher models:/{version.name}/{version.version} has no recorded "
                            "pre-trained source (tag init_source); register the teacher with the teacher step, or "
                            "cut the fine-tuned teacher explicitly with finetuned-teacher-layers:...")
        base, base_layers = split_layers(pretrained)
        model, tokenizer = load_classifier(base, ctx.splits.label_names, base_layers)
        origin = f"pre-trained {pretrained} (the teacher's source before fine-tuning)"
    kept = layer_indices(layers, len(encoder_layers(model)))
    return keep_layers(model, kept), tokenizer, f"{origin}, layers {','.join(map(str, kept))}"


def load_transfer_set(args: DistillArgs, splits) -> TransferSet | None:
    """The run's transfer set (texts checked for leakage against the whole dataset), or None."""
    if not args.transfer_set:
        return None
    full = load_splits(args.dataset, args.data_dir, args.validation_size, seed=args.data_seed)
    transfer = load_transfer(args.transfer_set, args.transfer_size, splits, full, args.data_seed)
    log.info("transfer set %s: %d texts (%s)", transfer.source, len(transfer.texts), transfer.counts)
    return transfer


def distill_one(student: str, args: DistillArgs, ctx: StepContext, nested: bool) -> dict:
    """One student: its own MLflow run (nested under a parent for student=all)."""
    splits = ctx.splits
    uri = teacher_uri(args, splits.name)
    hint = (f"Register one with the teacher step on dataset={args.dataset} first, or set teacher to "
            "another registered model (models:/NAME@ALIAS).")
    version = tracking.resolve_version(uri, needed_by=hint)
    check_labels(version, splits.label_names)
    if args.train.alpha == 0 and resolve(student, ctx.catalog)[0] == FINETUNED_TEACHER:
        raise UserError(f"student={student!r} with alpha=0: the alpha=0 baseline never sees the teacher, but this "
                        "student starts from the fine-tuned teacher; use teacher-layers:... (its pre-trained source).")
    name = args.name or tracking.registered_name(student_name(student), splits.name)
    run_name = f"distill-{student_name(student)}-a{args.train.alpha:g}-T{args.train.temperature:g}"
    if nested:  # each student of student=all has its own checkpoints and resumable run
        own = replace(args, output_dir=str(Path(args.output_dir) / student_name(student)) if args.output_dir else None)
        output_dir, run_id = resume_point("distill", own, splits.name, student)
        ctx = replace(ctx, output_dir=output_dir, run_id=run_id)
    with tracking.step_run("distill", run_name, run_id=ctx.run_id, nested=nested, active=ctx.is_main) as run:
        experiment_id = run.info.experiment_id if run else ""
        texts = {split: splits.split(split)["text"] for split in ("train", "test")}
        if args.train.alpha == 0:
            texts.pop("train")  # the baseline never sees the teacher
        transfer = load_transfer_set(args, splits)
        if transfer is not None:
            texts["transfer"] = transfer.texts
        logits, hit, cache_run = soft_targets.teacher_logits(version, uri, texts, args.train.max_length,
                                                             args.train.batch_size * 2, ctx.accelerator, experiment_id)
        set_seed(args.train.seed)  # the KD student and its alpha=0 twin get the identical new head
        model, tokenizer, init = build_student(student, ctx, version, uri)
        if model.config.num_labels != splits.num_labels:
            raise UserError(f"student {student} has {model.config.num_labels} outputs, the dataset "
                            f"{splits.num_labels} classes.")
        if ctx.is_main:
            log_step_params(ctx, args, student=student, student_init=init, encoder_layers=len(encoder_layers(model)),
                            registered_name=name,
                            teacher_name=version.name, teacher_version=version.version,
                            teacher_run_id=version.run_id)
            mlflow.set_tags({"teacher": f"{version.name}/{version.version}", "soft_targets_run_id": cache_run})
            mlflow.log_metric("soft_targets_cache_hit", int(hit))
            if transfer is not None:
                tracking.log_transfer(transfer, splits.name, len(splits.train))
        scale = args.teacher_logit_scale
        soft_targets_train = logits["train"] * scale if "train" in logits else None
        result, metrics, test_logits = fit_and_evaluate(
            ctx, args, model, tokenizer, soft_targets_train,
            (transfer.texts, logits["transfer"] * scale) if transfer is not None else None)
        metrics.update(comparison_metrics(test_logits, logits["test"], splits.test["label"].to_numpy(),
                                          splits.label_names, metrics, args.teacher_logit_scale))
        if ctx.is_main:
            mlflow.log_metrics(metrics)
            publish(result.model, tokenizer, splits, name, args.alias,
                    {"step": "distill", "teacher": f"{version.name}/{version.version}", "student": student,
                     "alpha": str(args.train.alpha), "temperature": str(args.train.temperature)},
                    args.train.max_length, metrics)
        ctx.accelerator.wait_for_everyone()
    return metrics


def run(args: DistillArgs) -> dict[str, dict]:
    """Distil one student, or every catalog student with student=all; returns metrics per student."""
    if args.teacher_logit_scale <= 0:
        raise UserError(f"teacher_logit_scale={args.teacher_logit_scale}: must be positive (1 = the teacher as is).")
    catalog = load_catalog(args.catalog)
    students = catalog["students"] if args.student == "all" else [args.student]
    if args.student == "all" and args.name:
        raise UserError("name= applies to a single student; leave it empty with student=all.")
    ctx = set_up("distill", args, args.student, catalog)
    if len(students) == 1:
        return {students[0]: distill_one(students[0], args, ctx, nested=False)}
    results = {}
    with tracking.step_run("distill", f"distill-all-a{args.train.alpha:g}", active=ctx.is_main):
        for student in students:
            results[student] = distill_one(student, args, ctx, nested=True)
    return results
