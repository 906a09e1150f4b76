"""`kd-sentiment`: one sub-command per pipeline step; MLproject entry points call the same commands.

Every flag is documented (`kd-sentiment STEP --help`) and checked before any work starts. A
mistake the user can fix (bad data, unknown model, bad parameter) prints one line and exits with
status 2; the step's MLflow run, if it had started, is marked FAILED.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import fields

from kd_sentiment.errors import UserError
from kd_sentiment.train_config import TrainConfig

TRAIN_HELP = {
    "epochs": "passes over the training data",
    "batch_size": "examples per batch per process",
    "lr": "peak AdamW learning rate (linear warm-up, then linear decay to 0)",
    "weight_decay": "AdamW weight decay (not applied to biases and LayerNorm)",
    "warmup_ratio": "fraction of optimizer steps spent warming up the learning rate",
    "max_length": "tokens per text; longer texts are truncated",
    "gradient_accumulation_steps": "batches per optimizer step",
    "mixed_precision": "no, fp16 (GPU) or bf16 (GPU or recent CPU)",
    "seed": "training seed: new head's initialisation, shuffling, dropout (data subsets: --data_seed)",
    "checkpoint_every": "optimizer steps between checkpoints for resume (0: at epoch ends only)",
    "temperature": "distillation temperature T (softens both distributions)",
    "alpha": "weight of the soft-target loss; 0 = plain fine-tuning without a teacher",
    "label_smoothing": "label smoothing of the hard-label cross-entropy (0: none; 0.1 trains a less confident model)",
}


# ----------------------------------------------------------------------------- value parsers

def boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def whole_number(text: str) -> int:
    """An integer; '3.0' is accepted too (a value a tool wrote as a float)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def optional_count(text: str) -> int | None:
    """A positive count, or '' / 'all' / 'none' for no limit."""
    if str(text).strip().lower() in ("", "all", "none"):
        return None
    value = whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of examples or 'all', got {value}")
    return value


def fraction_or_count(text: str) -> float | int:
    """0.1 -> a fraction; 2000 -> a count."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a count, got {text!r}") from None
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a whole count >= 1, got {text!r}")
    return value if value < 1 else int(value)


def optional_text(text: str) -> str | None:
    return text or None


# ----------------------------------------------------------------------------- shared flag groups

def add_dataset_flags(parser, dataset_help: str = "imdb, tweeteval, or a folder with train/validation/test "
                                                  "files (text,label)") -> None:
    """--dataset and --data_dir, the same for every command that reads data (a parser or a group)."""
    parser.add_argument("--dataset", default="tweeteval", help=dataset_help)
    parser.add_argument("--data_dir", type=optional_text, default=None,
                        help="local data in the layout of ../shared/data (default: $KD_SENTIMENT_DATA_DIR, "
                             "else the Hugging Face Hub)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    add_dataset_flags(group)
    group.add_argument("--validation_size", type=fraction_or_count, default=0.1,
                       help="fraction or count of train held out for validation when the dataset has none")
    group.add_argument("--max_train_samples", type=optional_count, default=None,
                       help="stratified, seeded subset of train ('all' for everything)")
    group.add_argument("--max_eval_samples", type=optional_count, default=None,
                       help="stratified, seeded subset of validation and of test ('all' for everything)")
    group.add_argument("--data_seed", type=whole_number, default=42,
                       help="seed of the data subsets and the validation carve, apart from --seed, so runs with "
                            "other training seeds see the same texts")


def add_training_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), **defaults) -> None:
    """Training flags from TrainConfig's fields; `defaults` overrides a field's default for this step."""
    group = parser.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        kind = {int: whole_number, float: float, str: str}[type(f.default)]
        default = defaults.get(f.name, f.default)
        group.add_argument(f"--{f.name}", type=kind, default=default, help=f"{TRAIN_HELP[f.name]} (default: {default})")
    group.add_argument("--cpu", type=boolean, default=False, help="train on CPU even if a GPU is present")
    group.add_argument("--output_dir", type=optional_text, default=None,
                       help="checkpoints and best weights (default: outputs/STEP-DATASET-MODEL-sSEED)")
    group.add_argument("--resume", type=boolean, default=False,
                       help="continue from OUTPUT_DIR/checkpoint, in the same MLflow run")
    parser.add_argument("--catalog", type=optional_text, default=None,
                        help="YAML mapping model names to sources (default: $KD_SENTIMENT_CATALOG, else built-in)")
    parser.add_argument("--alias", default="champion", help="registry alias for the new version ('' skips)")


def train_config(ns: argparse.Namespace) -> TrainConfig:
    """The step's TrainConfig, checked here, before any heavy import or data loading."""
    config = TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)})
    config.validate()
    return config


def plain_args(cls, ns: argparse.Namespace):
    """A step's argument dataclass from the parsed flags of the same names."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def step_args(cls, ns: argparse.Namespace, train: TrainConfig):
    names = {f.name for f in fields(cls)} - {"train"}
    return cls(**{k: getattr(ns, k) for k in names if hasattr(ns, k)}, train=train)


# ----------------------------------------------------------------------------- commands

def cmd_teacher(ns: argparse.Namespace) -> None:
    train = train_config(ns)  # reject bad values before importing torch
    from kd_sentiment import teacher

    teacher.run(step_args(teacher.TeacherArgs, ns, train))


def cmd_distill(ns: argparse.Namespace) -> None:
    train = train_config(ns)  # reject bad values before importing torch
    from kd_sentiment import distill

    distill.run(step_args(distill.DistillArgs, ns, train))


def plain_step(module: str, args_class: str):
    """The command of a step whose flags map one to one onto its arguments dataclass; the step's
    module (and with it torch, MLflow...) is imported only when the command runs."""
    def command(ns: argparse.Namespace) -> None:
        step = importlib.import_module(f"kd_sentiment.{module}")
        step.run(plain_args(getattr(step, args_class), ns))
    return command


def optional_boolean(text: str) -> bool | None:
    return None if str(text).strip().lower() in ("", "auto") else boolean(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-sentiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="also print details (tracking store, step keys, cache look-ups), before the command")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("teacher", help="fine-tune and register the teacher",
                            description="Fine-tune a large model on the dataset, log it to MLflow and "
                                        "register it as kd-sentiment-teacher-DATASET.")
    p.add_argument("--model", default="", help="catalog name, Hub id or local folder (default: the catalog's teacher)")
    p.add_argument("--name", type=optional_text, default="",
                   help="registered model name (default: kd-sentiment-teacher-DATASET)")
    add_data_flags(p)
    add_training_flags(p, exclude=("temperature", "alpha"))
    p.set_defaults(func=cmd_teacher)

    p = commands.add_parser("distill", help="distil students from the registered teacher",
                            description="Train a student on the registered teacher's soft targets (cached in "
                                        "MLflow) and register it as kd-sentiment-STUDENT-DATASET.")
    p.add_argument("--student", default="distilbert",
                   help="catalog name (distilbert, minilm, tinybert), Hub id, folder, SOURCE#layers=0,2,4, "
                        "teacher-layers:0,2,4 or teacher-layers:every-other (layers of the teacher's pre-trained "
                        "source), finetuned-teacher-layers:... (of the fine-tuned teacher), or 'all' (every catalog student, "
                        "one nested run each)")
    p.add_argument("--teacher", type=optional_text, default="",
                   help="registry URI of the teacher (default: models:/kd-sentiment-teacher-DATASET@champion)")
    p.add_argument("--name", type=optional_text, default="",
                   help="registered model name (default: kd-sentiment-STUDENT-DATASET)")
    p.add_argument("--teacher_logit_scale", type=float, default=1.0,
                   help="multiply the teacher's logits before softening (1/T_cal: the temperature-scaled teacher)")
    add_data_flags(p)
    add_training_flags(p, alpha=0.5, temperature=2.0)
    p.set_defaults(func=cmd_distill)

    p = commands.add_parser("quantize", help="export a registered model to ONNX and INT8, check, register",
                            description="Export a registered fp32 model to ONNX, fuse the graph, quantize it to "
                                        "INT8 with ONNX Runtime, compare it with the fp32 parent on the evaluation "
                                        "data and register it as NAME-int8 (alias 'candidate').")
    p.add_argument("--model", required=True, help="registry URI of the fp32 model (models:/NAME@ALIAS or /VERSION)")
    add_dataset_flags(p, "imdb, tweeteval or a data folder (evaluation data)")
    p.add_argument("--max_eval_samples", type=optional_count, default=2000,
                   help="stratified subsets of the parent's validation split (decides the gate) and of test "
                        "(reported) for the fp32 vs INT8 check ('all' for everything)")
    p.add_argument("--mode", choices=("dynamic", "static"), default="dynamic",
                   help="dynamic: activations quantized on the fly (default); static: ranges calibrated on train")
    p.add_argument("--per_channel", type=boolean, default=True, help="one weight scale per output channel")
    p.add_argument("--reduce_range", type=optional_boolean, default=None,
                   help="7-bit weights; 'auto' (default) turns it on for x86 CPUs without VNNI, where full-range "
                        "INT8 products can saturate")
    p.add_argument("--optimize_level", type=whole_number, default=2,
                   help="ORTOptimizer graph fusion level before dynamic INT8 (0: none)")
    p.add_argument("--float_ffn_output", type=boolean, default=False,
                   help="dynamic mode: keep the feed-forward output projections (after GELU) in float; their "
                        "outlier activations cost INT8 the most accuracy (static mode always does)")
    p.add_argument("--calibration_samples", type=whole_number, default=300,
                   help="static mode: seeded sample of train texts used for calibration")
    p.add_argument("--seed", type=whole_number, default=42,
                   help="seed for the calibration sample (the evaluation subsets follow the parent run's seed)")
    p.add_argument("--name", type=optional_text, default="", help="registered name (default: PARENT-int8)")
    p.add_argument("--alias", default="candidate", help="alias for the new version ('' skips); promote moves champion")
    p.set_defaults(func=plain_step("quantize", "QuantizeArgs"))

    p = commands.add_parser("promote", help="move an alias to a version that passes its accuracy gate",
                            description="Point ALIAS of NAME at VERSION if its accuracy (and macro-recall) is at most "
                                        "MARGIN points below its parent's on the same validation data. Every decision "
                                        "is an MLflow run; --history lists the alias's past holders, --rollback "
                                        "moves it back to the one before (gated).")
    p.add_argument("name", help="registered model name, e.g. kd-sentiment-minilm-tweeteval-int8")
    p.add_argument("--version", default="", help="version number to promote (not with --history or --rollback)")
    p.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    p.add_argument("--margin", type=float, default=1.0, help="largest allowed drop vs the parent, in points")
    p.add_argument("--force", type=boolean, nargs="?", const=True, default=False,
                   help="promote even if the gate fails (recorded in a tag)")
    p.add_argument("--history", type=boolean, nargs="?", const=True, default=False,
                   help="list the alias's past holders from the promote runs; moves nothing")
    p.add_argument("--rollback", type=boolean, nargs="?", const=True, default=False,
                   help="move the alias back to its holder before the current one, through the same gate")
    p.set_defaults(func=plain_step("promote", "PromoteArgs"))

    p = commands.add_parser("benchmark", help="latency, throughput, memory, accuracy and ECE of every model",
                            description="Measure every aliased model of the dataset (or --models) in each backend it "
                                        "has, one fresh process per model, and write results/benchmarks/*.csv.")
    add_dataset_flags(p)
    p.add_argument("--models", default="", help="comma-separated models:/ URIs (default: every aliased version "
                                                "whose dataset tag matches)")
    p.add_argument("--batch_sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--fixed_length", type=whole_number, default=128, help="tokens per text in the fixed-length setting")
    p.add_argument("--threads", type=whole_number, default=0, help="intra-op threads for every model (0: all cores)")
    p.add_argument("--max_eval_samples", type=optional_count, default=1000,
                   help="stratified test subset for accuracy and ECE ('all' for everything)")
    p.add_argument("--time_budget", type=float, default=5.0, help="seconds of timed batches per setting, at most")
    p.add_argument("--min_batches", type=whole_number, default=10, help="timed batches per setting, at least")
    p.add_argument("--max_batches", type=whole_number, default=300, help="timed batches per setting, at most")
    p.add_argument("--seed", type=whole_number, default=42, help="seed for the evaluation subset and text order")
    p.add_argument("--output_dir", default="results/benchmarks", help="where the CSV and Markdown go")
    p.set_defaults(func=plain_step("benchmark", "BenchmarkArgs"))

    p = commands.add_parser("pipeline", help="teacher -> distill -> quantize -> promote -> benchmark, from a config",
                            description="Run every step for one dataset as child runs of one parent run; steps that "
                                        "already finished with the same parameters and code are reused.")
    p.add_argument("--config", default="experiments/smoke.yaml", help="experiments/smoke.yaml, cpu.yaml or paper.yaml")
    add_dataset_flags(p)
    p.set_defaults(func=plain_step("pipeline", "PipelineArgs"))

    p = commands.add_parser("study", help="the calibration study: one student from teachers of different calibration",
                            description="Distil one student, on one dataset and budget, from the registered teacher "
                                        "as is, rescaled (calibrated, sharpened) and retrained (label-smoothed, "
                                        "trained longer), over a fixed grid of KD temperatures; finished runs are reused.")
    p.add_argument("kind", nargs="?", choices=("calibration",), default="calibration", help="which study (calibration)")
    add_dataset_flags(p)
    p.add_argument("--catalog", type=optional_text, default=None,
                   help="YAML mapping model names to sources (default: $KD_SENTIMENT_CATALOG, else built-in)")
    p.add_argument("--teacher", default="", help="registry URI (default: models:/kd-sentiment-teacher-DATASET@champion)")
    p.add_argument("--variants", default="raw,calibrated,sharpened,label-smoothed,trained-longer",
                   help="teacher variants to run, comma-separated")
    p.add_argument("--label_smoothing", type=float, default=0.1, help="of the label-smoothed teacher")
    p.add_argument("--longer_epochs", type=whole_number, default=3, help="epochs of the trained-longer teacher")
    p.add_argument("--student", default="tinybert", help="the student every variant distils (as distill --student)")
    p.add_argument("--temperatures", default="1,4", help="the fixed KD temperature grid, comma-separated")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target loss")
    p.add_argument("--epochs", type=whole_number, default=2, help="student epochs")
    p.add_argument("--lr", type=float, default=8e-5, help="student learning rate")
    p.add_argument("--batch_size", type=whole_number, default=16, help="student batch size")
    p.add_argument("--max_length", type=whole_number, default=128, help="tokens per text")
    p.add_argument("--max_train_samples", type=optional_count, default=1500, help="stratified subset of train ('all')")
    p.add_argument("--max_eval_samples", type=optional_count, default=1000,
                   help="stratified subsets of validation and test ('all')")
    p.set_defaults(func=plain_step("study", "StudyArgs"))

    p = commands.add_parser("loadtest", help="serve a model and load it with concurrent clients (loopback only)",
                            description="Start `mlflow models serve` for MODEL on a free 127.0.0.1 port, send a fixed "
                                        "number of single-text requests from concurrent clients (some malformed), "
                                        "and log p50/p95/p99 latency, throughput and errors.")
    p.add_argument("--model", required=True, help="registry URI, e.g. models:/kd-sentiment-minilm-tweeteval-int8@champion")
    add_dataset_flags(p, "where the request texts come from (its test split)")
    p.add_argument("--clients", type=whole_number, default=4, help="concurrent clients")
    p.add_argument("--requests_per_client", type=whole_number, default=50, help="requests each client sends")
    p.add_argument("--malformed_every", type=whole_number, default=10, help="every Nth request is malformed (0: none)")
    p.add_argument("--warmup_requests", type=whole_number, default=5,
                   help="requests sent first, one at a time, and not timed (a fresh server's one-off costs)")
    p.add_argument("--workers", type=whole_number, default=1,
                   help="server worker processes (mlflow models serve --workers); concurrent clients need more than 1")
    p.add_argument("--timeout_s", type=float, default=120.0, help="hard stop for the whole test")
    p.add_argument("--output_dir", default="results/benchmarks", help="where the serving CSV goes")
    p.set_defaults(func=plain_step("loadtest", "LoadTestArgs"))

    p = commands.add_parser("report", help="write results/RESULTS.md from the MLflow runs",
                            description="Generate the results page from the latest finished pipeline run of a "
                                        "configuration for each dataset, plus the calibration study's runs.")
    p.add_argument("--config", default="cpu", help="configuration name whose pipeline runs to report (default: cpu)")
    p.add_argument("--datasets", default="imdb,tweeteval", help="comma-separated datasets")
    p.add_argument("--out", default="results/RESULTS.md", help="where to write the Markdown")
    p.add_argument("--readme", default="README.md", help="README whose results block (between markers) is refreshed")
    p.set_defaults(func=plain_step("report", "ReportArgs"))
    return parser


def configure_logging(verbose: bool) -> None:
    """The package's messages on stdout: progress and results at INFO, details (store, step keys,
    cache look-ups) at DEBUG with --verbose. Progress bars are tqdm's, on stderr, either way."""
    logger = logging.getLogger("kd_sentiment")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = next((h for h in logger.handlers if getattr(h, "kd_sentiment_cli", False)), None)
    if handler is None:  # main() may run more than once in a process (tests)
        handler = logging.StreamHandler(sys.stdout)
        handler.kd_sentiment_cli = True
        logger.addHandler(handler)
        logger.propagate = False  # a library that configures the root logger would print each line twice
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser().parse_args(argv)
    configure_logging(ns.verbose)
    try:
        ns.func(ns)
    except UserError as err:
        print(f"kd-sentiment {ns.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
