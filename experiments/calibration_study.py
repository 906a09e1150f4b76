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
which the report shows next to their ECE.
Note: scaling the teacher's logits by 1/T_cal and distilling at T_kd gives the same soft targets as
distilling the raw teacher at T_cal * T_kd; only the student's side (its logits divided by T_kd,
the T_kd^2 weight) differs. So "calibrating the teacher" is largely a change of KD temperature,
which is why the grid over T_kd is needed to separate the two.

Every teacher and student is a child run of one parent tagged `kd_sentiment.study=calibration`, run
through the pipeline's StepRunner: re-running the study reuses finished runs and resumes an
interrupted one. Soft targets come from the MLflow cache, so each teacher is run once.
`kd-sentiment report` turns the runs into a section of results/RESULTS.md.

  python experiments/calibration_study.py --dataset tweeteval --student tinybert \
      --catalog experiments/catalog-offline.yaml --max_train_samples 1500 --max_eval_samples 1000
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import mlflow

from kd_sentiment import distill, teacher, tracking
from kd_sentiment.cli import optional_count
from kd_sentiment.pipeline import StepRunner, registered_uri
from kd_sentiment.train import TrainConfig

SCALED = ("raw", "calibrated", "sharpened")    # the registered teacher, its logits rescaled
TRAINED = ("label-smoothed", "trained-longer")  # teachers trained for the study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="tweeteval")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--teacher", default="", help="registry URI (default: the dataset's teacher @champion)")
    parser.add_argument("--variants", default=",".join(SCALED + TRAINED), help="teacher variants to run")
    parser.add_argument("--label_smoothing", type=float, default=0.1, help="of the label-smoothed teacher")
    parser.add_argument("--longer_epochs", type=int, default=3, help="epochs of the trained-longer teacher")
    parser.add_argument("--student", default="tinybert")
    parser.add_argument("--temperatures", default="1,4", help="the fixed KD temperature grid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=8e-5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--max_train_samples", type=optional_count, default=1500)
    parser.add_argument("--max_eval_samples", type=optional_count, default=1000)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(SCALED + TRAINED)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(SCALED + TRAINED)}")

    tracking.configure()
    tracking.use_experiment(args.dataset)
    teacher_uri = args.teacher or f"models:/kd-sentiment-teacher-{args.dataset}@champion"
    version = tracking.resolve_version(teacher_uri)
    teacher_run = mlflow.get_run(version.run_id)
    t_cal = teacher_run.data.metrics["temperature"]
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "catalog": args.catalog,
            "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples}
    study = {"kd_sentiment.study": "calibration"}
    runner = StepRunner()
    with tracking.step_run("study", f"calibration-study-{args.student}"):
        mlflow.set_tags(study)
        mlflow.log_params({**vars(args), "teacher_uri": teacher_uri, "teacher_temperature": t_cal})
        # (teacher URI, logit scale) per variant; the trained variants copy the registered teacher's recipe
        registered = f"models:/{version.name}/{version.version}"
        teachers = {"raw": (registered, 1.0), "calibrated": (registered, 1.0 / t_cal), "sharpened": (registered, 2.0)}
        recipe = TrainConfig.from_params(teacher_run.data.params)
        changes = {"label-smoothed": {"label_smoothing": args.label_smoothing}, "trained-longer": {"epochs": args.longer_epochs}}
        for variant in (v for v in TRAINED if v in variants):
            run = runner.step(f"teacher-{variant}", teacher.run, teacher.TeacherArgs(
                model=teacher_run.data.params["model"], name=f"kd-sentiment-calibration-teacher-{args.dataset}",
                alias="", train=replace(recipe, **changes[variant]), **data),
                upstream=registered, tags={**study, "teacher_variant": variant})
            teachers[variant] = (registered_uri(run), 1.0)
        for temperature in (float(t) for t in args.temperatures.split(",")):
            for variant in variants:
                uri, scale = teachers[variant]
                train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                    max_length=args.max_length, alpha=args.alpha, temperature=temperature,
                                    checkpoint_every=0)
                runner.step(f"distill-{variant}-T{temperature:g}", distill.run, distill.DistillArgs(
                    student=args.student, teacher=uri, teacher_logit_scale=scale, alias="",
                    name=f"kd-sentiment-calibration-study-{args.dataset}", train=train, **data),
                    upstream=uri, tags={**study, "teacher_variant": variant})
        mlflow.set_tag("reused_steps", ",".join(runner.reused) or "none")
        mlflow.log_dict(runner.step_runs, "study_steps.json")


if __name__ == "__main__":
    main()
