"""Does a better-calibrated teacher make a better student? A controlled test on one dataset.

The original study compared an over-confident IMDb teacher with a better calibrated TweetEval
teacher, changing the dataset at the same time. Here the dataset, student, data and budget stay
fixed and only the teacher's calibration changes, across a fixed grid of KD temperatures:
  raw             the registered teacher as is
  calibrated      its logits divided by T_cal, the temperature fitted on validation (teacher run's `temperature`)
  sharpened       its logits multiplied by 2: the same ranking, more confident (over-confident for a
                  calibrated teacher, closer to calibrated for an under-confident one)
  label-smoothed  a teacher trained exactly like it but with label smoothing (less confident by training)
  trained-longer  a teacher trained exactly like it for --longer_epochs epochs (the late checkpoint
                  to the registered teacher's early one; its best epoch by validation is kept)
The first three share one teacher's ranking of the classes; the trained ones differ in accuracy too,
which the report shows next to their ECE. Each (teacher, T_kd) is distilled once per training seed
(--seeds; same texts, other initialisation and order), so a variant's difference from the raw
teacher is measured against the spread between seeds, not one lucky run.
Note: scaling the teacher's logits by 1/T_cal and distilling at T_kd gives the same soft targets as
distilling the raw teacher at T_cal * T_kd; only the student's side (its logits divided by T_kd,
the T_kd^2 weight) differs. So "calibrating the teacher" is largely a change of KD temperature,
which is why the grid over T_kd is needed to separate the two.

Every teacher and student is a child run of one parent tagged `kd_sentiment.study=calibration`, run
through the pipeline's StepRunner: re-running the study reuses finished runs and resumes an
interrupted one. Soft targets come from the MLflow cache, so each teacher is run once.
`kd-sentiment report` turns the runs into a section of results/RESULTS.md.

  kd-sentiment study calibration --dataset tweeteval --student tinybert \
      --catalog experiments/catalog-offline.yaml --max_train_samples 1500 --max_eval_samples 1000 \
      --seeds 42,43,44   # the cpu pipeline's tweeteval sizes
"""
from __future__ import annotations

import logging
from dataclasses import replace
from itertools import product

import mlflow

from kd_sentiment.training import distill, teacher
from kd_sentiment.core import tracking
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.parameters import TRAINED_VARIANTS, DistillArgs, StudyArgs, TeacherArgs, TrainConfig
from kd_sentiment.pipeline import StepRunner, registered_uri

log = logging.getLogger(__name__)


def run(args: StudyArgs) -> dict:
    """Run (or reuse) every teacher variant and distillation of the study; returns its step runs."""
    variants, temperatures, seeds = args.validate()
    tracking.configure()
    tracking.use_experiment(args.dataset)
    teacher_uri = args.teacher or f"models:/{teacher.registered_name(args.dataset)}@champion"
    version = tracking.resolve_version(teacher_uri, needed_by="Register a teacher with the teacher step first.")
    teacher_run = mlflow.get_run(version.run_id)
    t_cal = teacher_run.data.metrics["temperature"]
    for key in ("max_train_samples", "max_eval_samples"):  # a trained variant should differ in its recipe only
        if str(getattr(args, key)) != teacher_run.data.params.get(key, "None"):
            log.warning("study: --%s %s, the registered teacher had %s: the trained teacher variants see other texts "
                        "than it; pass the teacher's sizes to compare recipes alone.", key, getattr(args, key),
                        teacher_run.data.params.get(key))
    recipe = TrainConfig.from_params(teacher_run.data.params)
    if "trained-longer" in variants and args.longer_epochs <= recipe.epochs:
        raise UserError(f"longer_epochs={args.longer_epochs}: the registered teacher already trained {recipe.epochs} "
                        f"epochs, so its trained-longer variant would be the same recipe; pass more, or leave "
                        f"trained-longer out of --variants.")
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "catalog": args.catalog,
            "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples}
    study = {tracking.STUDY_TAG: args.kind}
    runner = StepRunner(args.dataset, args.data_dir, args.catalog)
    with tracking.step_run("study", f"calibration-study-{args.student}"):
        mlflow.set_tags(study)
        tracking.log_params({**vars(args), "teacher_uri": teacher_uri, "teacher_temperature": t_cal})
        # (teacher URI, logit scale) per variant; the trained variants copy the registered teacher's recipe
        registered = f"models:/{version.name}/{version.version}"
        teachers = {"raw": (registered, 1.0), "calibrated": (registered, 1.0 / t_cal), "sharpened": (registered, 2.0)}
        changes = {"label-smoothed": {"label_smoothing": args.label_smoothing}, "trained-longer": {"epochs": args.longer_epochs}}
        for variant in (v for v in TRAINED_VARIANTS if v in variants):
            run = runner.step(f"teacher-{variant}", teacher.run, TeacherArgs(
                model=teacher_run.data.params["model"], name=tracking.registered_name("calibration-teacher", args.dataset),
                alias="", train=replace(recipe, **changes[variant]), **data),
                upstream=registered, tags={**study, tracking.VARIANT_TAG: variant})
            teachers[variant] = (registered_uri(run), 1.0)
        for seed, temperature, variant in product(seeds, temperatures, variants):
            uri, scale = teachers[variant]
            train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
                                max_length=args.max_length, alpha=args.alpha, temperature=temperature,
                                checkpoint_every=0)
            runner.step(f"distill-{variant}-T{temperature:g}-s{seed}", distill.run, DistillArgs(
                student=args.student, teacher=uri, teacher_logit_scale=scale, alias="",
                name=tracking.registered_name("calibration-study", args.dataset), train=train, **data),
                upstream=uri, tags={**study, tracking.VARIANT_TAG: variant})
        mlflow.set_tag("reused_steps", ",".join(runner.reused) or "none")
        mlflow.log_dict(runner.step_runs, "study_steps.json")
    return runner.step_runs
