"""Does a better-calibrated teacher make a better student? A controlled test on one dataset.

The original study compared an over-confident IMDb teacher with a better calibrated TweetEval
teacher, changing the dataset at the same time. Here the dataset, student, data and budget stay
fixed and only the teacher's calibration changes, across a fixed grid of KD temperatures:
  raw         the registered teacher as is
  calibrated  its logits divided by T_cal, the temperature fitted on validation (teacher run's `temperature`)
  sharpened   its logits multiplied by 2: the same ranking, more confident (over-confident for a
              calibrated teacher, closer to calibrated for an under-confident one)
Note: scaling the teacher's logits by 1/T_cal and distilling at T_kd gives the same soft targets as
distilling the raw teacher at T_cal * T_kd; only the student's side (its logits divided by T_kd,
the T_kd^2 weight) differs. So "calibrating the teacher" is largely a change of KD temperature,
which is why the grid over T_kd is needed to separate the two.

Every run is a distill run (soft targets come from the MLflow cache, so the teacher is run once)
under a parent run tagged `kd_sentiment.study=calibration`; `kd-sentiment report` turns them into
the section of results/RESULTS.md.

  python experiments/calibration_study.py --dataset tweeteval --student tinybert \
      --catalog experiments/catalog-offline.yaml --max_train_samples 2000 --max_eval_samples 1000
"""
from __future__ import annotations

import argparse

import mlflow

from kd_sentiment import distill, tracking
from kd_sentiment.cli import optional_count
from kd_sentiment.train import TrainConfig

VARIANTS = ("raw", "calibrated", "sharpened")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="tweeteval")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--teacher", default="", help="registry URI (default: the dataset's teacher @champion)")
    parser.add_argument("--student", default="tinybert")
    parser.add_argument("--temperatures", default="1,4", help="the fixed KD temperature grid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=8e-5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--max_train_samples", type=optional_count, default=2000)
    parser.add_argument("--max_eval_samples", type=optional_count, default=1000)
    args = parser.parse_args()

    tracking.configure()
    tracking.use_experiment(args.dataset)
    teacher_uri = args.teacher or f"models:/kd-sentiment-teacher-{args.dataset}@champion"
    version = tracking.resolve_version(teacher_uri)
    t_cal = mlflow.get_run(version.run_id).data.metrics["temperature"]
    scales = {"raw": 1.0, "calibrated": 1.0 / t_cal, "sharpened": 2.0}
    with tracking.step_run("study", f"calibration-study-{args.student}"):
        mlflow.set_tag("kd_sentiment.study", "calibration")
        mlflow.log_params({**vars(args), "teacher_uri": teacher_uri, "teacher_temperature": t_cal})
        for temperature in (float(t) for t in args.temperatures.split(",")):
            for variant in VARIANTS:
                train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                    max_length=args.max_length, alpha=args.alpha, temperature=temperature,
                                    checkpoint_every=0)
                tracking.STEP_RUN_TAGS.update({"kd_sentiment.study": "calibration", "teacher_variant": variant})
                distill.run(distill.DistillArgs(
                    student=args.student, teacher=f"models:/{version.name}/{version.version}", dataset=args.dataset,
                    data_dir=args.data_dir, catalog=args.catalog, max_train_samples=args.max_train_samples,
                    max_eval_samples=args.max_eval_samples, teacher_logit_scale=scales[variant],
                    name=f"kd-sentiment-calibration-study-{args.dataset}", alias="",
                    output_dir=f"outputs/calibration-study/{variant}-T{temperature:g}", train=train))
        tracking.STEP_RUN_TAGS.clear()


if __name__ == "__main__":
    main()
