"""Every step's parameters, each declared once: type, default, help, choices and how a text value reads.

From these dataclasses come the `kd-sentiment` CLI (cli.py, through transformers' HfArgumentParser),
the sections of a pipeline config (`build`: unknown keys refused, values read like the flags) and the
MLproject entry points (tests/test_cli.py checks them against the flags, field by field). Each class
is what its step's `run()` takes. No torch and no MLflow here: `--help` and a bad argument answer
at once, before any heavy import.
"""
from __future__ import annotations

import argparse
import copy
import math
import re
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, Callable

from kd_sentiment.core.errors import UserError


# ----------------------------------------------------------------------------- how text values read

def boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def optional_boolean(text: str) -> bool | None:
    """true / false, or '' / 'auto' for "decide on this machine"."""
    return None if str(text).strip().lower() in ("", "auto", "none") else boolean(text)


def comma_separated(args, name: str, read: Callable[[str], Any], kind: str, example: str) -> list:
    """The comma-separated values of the text parameter `args.<name>`, each read by `read`, or a
    UserError naming the parameter, what its values must be (`kind`) and an `example`."""
    text = getattr(args, name)
    try:
        return [read(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise UserError(f"{name}={text!r}: comma-separated {kind}, e.g. {example}.") from None


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
    """'' (how MLproject passes "not given") -> None."""
    return None if text is None or str(text) in ("", "None") else str(text)


READERS: dict[Any, Callable[[str], Any]] = {int: whole_number, float: float, str: str, bool: boolean}


def param(default: Any = MISSING, help: str = "", *, read: Callable[[str], Any] | None = None,
          choices: tuple | None = None, positional: bool = False) -> Field:
    """A step parameter. `read` turns the text of a flag or a config value into the value (default:
    by the field's type); `positional` makes it `kd-sentiment STEP VALUE` instead of `--name VALUE`."""
    return field(default=default, metadata={"help": help, "read": read, "choices": choices, "positional": positional})


def nested(factory: Callable[[], Any], exclude: tuple[str, ...] = ()) -> Field:
    """A dataclass of parameters inside a step's arguments (TrainConfig): its fields become flags of
    the step, except `exclude`, with the defaults of the instance `factory` makes."""
    return field(default_factory=factory, metadata={"nested": True, "exclude": exclude})


def reader(f: Field) -> Callable[[str], Any]:
    """How the text of `f`'s flag or config value reads: its own reader, else by its default's type
    (a required parameter is text)."""
    return f.metadata.get("read") or (str if f.default is MISSING else READERS[type(f.default)])


def flat_fields(cls) -> dict[str, Field]:
    """name -> field of every parameter of `cls`, a nested dataclass's fields in place of it (with
    the step's default), in declaration order."""
    flat = {}
    for f in fields(cls):
        if f.metadata.get("nested"):
            defaults = f.default_factory()
            for inner in fields(defaults):
                if inner.name not in f.metadata["exclude"]:
                    copied = copy.copy(inner)  # with the step's default
                    copied.default = getattr(defaults, inner.name)
                    flat[inner.name] = copied
        else:
            flat[f.name] = f
    return flat


def read_values(cls, values: dict, where: str) -> dict:
    """`values` (a config section) read like the flags of `cls` would read their text: a config
    file's `2e-4`, `all` or `true` mean what they mean on the command line. A key `cls` does not
    take, a value that does not read, or a choice not offered is a UserError naming `where` and the key."""
    flat = flat_fields(cls)
    unknown = sorted(set(values) - set(flat))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(flat)}.")
    parsed = {}
    for name, value in values.items():
        try:
            parsed[name] = reader(flat[name])(str(value)) if value is not None else None
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UserError(f"{where}: {name}: {err}") from None
        choices = flat[name].metadata.get("choices")
        if choices and parsed[name] not in choices:
            raise UserError(f"{where}: {name}={value}: choose one of {', '.join(map(str, choices))}.")
    return parsed


def build(cls, values: dict):
    """`cls` from flat, already read `values` (a nested dataclass's fields by their own names; what
    is not given keeps the step's default)."""
    values = dict(values)
    top = {f.name: values.pop(f.name) for f in fields(cls) if f.name in values}
    for f in fields(cls):
        if f.metadata.get("nested"):
            defaults = f.default_factory()
            inner = {x.name: values.pop(x.name) for x in fields(defaults) if x.name in values}
            top[f.name] = replace(defaults, **inner)
    if values:
        raise UserError(f"{cls.__name__} takes no {sorted(values)}.")
    return cls(**top)


# ----------------------------------------------------------------------------- training

MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")  # auto: resolved per machine (machine.native_mixed_precision)


@dataclass
class TrainConfig:
    """Hyperparameters of one training run. Every field is a flag of the training steps and an MLflow param."""

    epochs: int = param(3, "passes over the training data")
    batch_size: int = param(32, "examples per batch per process")
    lr: float = param(5e-5, "peak AdamW learning rate (linear warm-up, then linear decay to 0)")
    weight_decay: float = param(0.01, "AdamW weight decay (not applied to biases and LayerNorm)")
    warmup_ratio: float = param(0.1, "fraction of optimizer steps spent warming up the learning rate")
    max_length: int = param(128, "tokens per text; longer texts are truncated")
    gradient_accumulation_steps: int = param(1, "batches per optimizer step")
    mixed_precision: str = param("no", "no, fp16 (GPU), bf16 (GPU or recent CPU) or auto: bf16 where the device "
                                       "computes it natively (a GPU with bf16, a CPU with AVX512_BF16 or AMX), fp16 "
                                       "on an older GPU, else no; runs log what they trained in",
                                 choices=MIXED_PRECISIONS)
    seed: int = param(42, "training seed: new head's initialisation, shuffling, dropout (data subsets: data_seed)")
    checkpoint_every: int = param(100, "optimizer steps between checkpoints for resume (0: at epoch ends only)")
    temperature: float = param(2.0, "distillation temperature T (softens both distributions)")
    alpha: float = param(0.0, "weight of the soft-target loss; 0 = plain fine-tuning without a teacher")
    label_smoothing: float = param(0.0, "label smoothing of the hard-label cross-entropy (0: none; 0.1 trains a "
                                        "less confident model)")

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TrainConfig":
        """The config a run was trained with, from its MLflow params (strings); fields the run
        predates keep their defaults."""
        return cls(**{f.name: type(f.default)(params[f.name]) for f in fields(cls) if f.name in params})

    def optimizer_steps(self, n_texts: int, processes: int = 1) -> int:
        """Optimizer steps over `n_texts` in all epochs: each process takes its share of the batches,
        and gradient_accumulation_steps batches make one step."""
        batches = math.ceil(math.ceil(n_texts / self.batch_size) / processes)
        return math.ceil(batches / self.gradient_accumulation_steps) * self.epochs

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "lr", "max_length", "gradient_accumulation_steps", "temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)}: must be greater than 0.")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha={self.alpha}: must lie in [0, 1].")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing={self.label_smoothing}: must lie in [0, 1).")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio={self.warmup_ratio}: must lie in [0, 1).")
        if self.weight_decay < 0 or self.checkpoint_every < 0:
            raise UserError("weight_decay and checkpoint_every must not be negative.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise UserError(f"mixed_precision={self.mixed_precision!r}: use one of {', '.join(MIXED_PRECISIONS)}.")


# ----------------------------------------------------------------------------- steps

DATASET_HELP = "imdb, tweeteval, or a folder with train/validation/test files (text,label)"
DATA_DIR_HELP = "local data in the layout of ../shared/data (empty: $KD_SENTIMENT_DATA_DIR, else the Hugging Face Hub)"
CATALOG_HELP = "YAML mapping model names to sources (empty: $KD_SENTIMENT_CATALOG, else built-in)"
DATA_KEYS = ("max_train_samples", "max_eval_samples", "validation_size", "data_seed")  # a config's data.<dataset>


def check_alias(alias: str) -> None:
    if alias and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", alias):
        raise UserError(f"alias={alias!r}: use letters, digits, '_' and '-' (not starting with a digit); "
                        "empty skips aliasing.")


@dataclass
class StepArgs:
    """What every training step takes."""

    dataset: str = param("tweeteval", DATASET_HELP)
    data_dir: str | None = param(None, DATA_DIR_HELP, read=optional_text)
    catalog: str | None = param(None, CATALOG_HELP, read=optional_text)
    validation_size: float | int = param(0.1, "fraction or count of train held out for validation when the dataset "
                                              "has none", read=fraction_or_count)
    max_train_samples: int | None = param(None, "stratified, seeded subset of train ('all' for everything)",
                                          read=optional_count)
    max_eval_samples: int | None = param(None, "stratified, seeded subset of validation and of test ('all' for "
                                               "everything)", read=optional_count)
    # Apart from the training seed: runs with other training seeds are then trained, selected and
    # tested on the very same texts (paired comparisons).
    data_seed: int = param(42, "seed of the data subsets and the validation carve, apart from seed, so runs with "
                               "other training seeds see the same texts")
    output_dir: str | None = param(None, "checkpoints and best weights (empty: outputs/STEP-DATASET-MODEL-sSEED)",
                                   read=optional_text)
    resume: bool = param(False, "continue from OUTPUT_DIR/checkpoint, in the same MLflow run")
    alias: str = param("champion", "registry alias for the new version ('' skips)")
    cpu: bool = param(False, "train on CPU even if a GPU is present")

    def validate(self) -> None:
        self.train.validate()
        check_alias(self.alias)


@dataclass
class TeacherArgs(StepArgs):
    """Fine-tune a large model on the dataset, log it to MLflow and register it as kd-sentiment-teacher-DATASET."""

    model: str = param("", "catalog name, Hub id or local folder (empty: the catalog's teacher)")
    name: str = param("", "registered model name (empty: kd-sentiment-teacher-DATASET)")
    train: TrainConfig = nested(TrainConfig, exclude=("temperature", "alpha"))


@dataclass
class DistillArgs(StepArgs):
    """Train a student on the registered teacher's soft targets (cached in MLflow) and register it as
    kd-sentiment-STUDENT-DATASET."""

    student: str = param("distilbert", "catalog name (distilbert, minilm, tinybert), Hub id, folder, "
                         "SOURCE#layers=0,2,4, teacher-layers:0,2,4 or teacher-layers:every-other (layers of the "
                         "teacher's pre-trained source), finetuned-teacher-layers:... (of the fine-tuned teacher), "
                         "or 'all' (every catalog student, one nested run each)")
    teacher: str = param("", "registry URI of the teacher (empty: models:/kd-sentiment-teacher-DATASET@champion)")
    name: str = param("", "registered model name (empty: kd-sentiment-STUDENT-DATASET)")
    # 1/T_cal distils from the temperature-scaled (calibrated) teacher, > 1 from a sharper one.
    teacher_logit_scale: float = param(1.0, "multiply the teacher's logits before softening (1/T_cal: the "
                                            "temperature-scaled teacher)")
    transfer_set: str = param("", "unlabelled texts the teacher labels and the student learns from by the KD loss "
                                  "alone, beside the labelled ones: train-unlabelled (the dataset's training texts "
                                  "outside the labelled subset), or a .txt/.csv/.jsonl/.parquet file or folder of "
                                  "them (a text column); empty: none")
    transfer_size: int | None = param(None, "seeded sample of the transfer set ('all' for everything)",
                                      read=optional_count)
    train: TrainConfig = nested(lambda: TrainConfig(alpha=0.5, temperature=2.0))

    def validate(self) -> None:
        super().validate()
        if self.transfer_set and self.train.alpha == 0:
            raise UserError(f"transfer_set={self.transfer_set!r} with alpha=0: the transfer set has no labels, only "
                            "the teacher's, which alpha=0 never uses; leave transfer_set empty for the baseline.")


QUANTIZATION_MODES = ("dynamic", "static")  # the fixed ONNX Runtime recipes; quantize also takes "auto"


@dataclass
class QuantizeArgs:
    """Export a registered fp32 model to ONNX, choose the fastest deployable graph on this CPU (INT8
    recipes, QAD, NNCF, float runtimes) on held-out texts, judge it against the fp32 parent on
    others and register it as NAME-int8 (alias 'candidate')."""

    model: str = param(MISSING, "registry URI of the fp32 model (models:/NAME@ALIAS or models:/NAME/VERSION)")
    dataset: str = param("tweeteval", "imdb, tweeteval or a data folder (evaluation data)")
    data_dir: str | None = param(None, DATA_DIR_HELP, read=optional_text)
    max_eval_samples: int | None = param(2000, "stratified subset of test for the fp32 vs INT8 check (reported, "
                                               "never decides; 'all' for everything)", read=optional_count)
    judge_texts: str = param("", "labelled file (text,label; CSV, JSON Lines or Parquet) of held-out texts that judge "
                                 "the chosen model; empty: the parent's validation split and the training texts its "
                                 "run did not use. Texts the parent trained on are refused")
    judge_samples: int | None = param(5000, "stratified, seeded sample of the held-out texts that judge the chosen "
                                            "model (the gate; 'all' for every one left after the choice)",
                                      read=optional_count)
    choice_samples: int = param(2000, "held-out texts (never judged) auto chooses on and the served temperature is "
                                      "fitted on")
    mode: str = param("auto", "auto: the fastest candidate (ONNX Runtime INT8 recipes, QAD, NNCF, OpenVINO "
                              "fp32/bf16/INT8) within max_accuracy_drop, max_ece_increase and min_agreement on the "
                              "choice texts, measured on this CPU; "
                              "dynamic / static: the fixed ONNX Runtime recipe (activations quantized on the fly / "
                              "ranges calibrated on train)", choices=("auto", *QUANTIZATION_MODES))
    max_accuracy_drop: float = param(0.5, "largest accuracy (and macro-recall) drop vs the fp32 parent, in points: "
                                          "auto's choice reads the drop seen on its texts, the gate the paired "
                                          "one-sided 95%% bound on the judged texts (negative: a gain required)")
    max_ece_increase: float = param(0.01, "largest increase of the served (temperature-scaled) probabilities' ECE "
                                          "vs the fp32 parent's, each scaled by its own temperature")
    min_agreement: float = param(0.97, "smallest share of predictions equal to the fp32 parent's, read as the "
                                       "one-sided 95%% lower confidence bound of the share seen on auto's choice "
                                       "texts and on the judged ones (a guard against a broken graph: INT8's "
                                       "flips are near-ties that cost no accuracy; README, Step 3)")
    candidates: str = param("", "auto: only these candidates, comma-separated (e.g. openvino-f32,ort-static; the "
                                "names of quantize_candidates.json); empty: every candidate this CPU can run")
    fixed_length: int = param(128, "auto: tokens per text when timing candidates (the benchmark's fixed length)")
    threads: int = param(0, "auto: threads when timing candidates (0: all cores)")
    per_channel: bool = param(True, "one weight scale per output channel")
    reduce_range: bool | None = param(None, "7-bit weights; 'auto' turns it on for x86 CPUs without VNNI, where "
                                            "full-range INT8 products can saturate", read=optional_boolean)
    optimize_level: int = param(2, "ORTOptimizer graph fusion level before dynamic INT8 (0: none)",
                                choices=(0, 1, 2, 99))
    float_ffn_output: bool = param(False, "dynamic mode: keep the feed-forward output projections (after GELU) in "
                                          "float; their outlier activations cost INT8 the most accuracy (static "
                                          "mode always does)")
    calibration_samples: int = param(300, "seeded sample of the texts neither chosen nor judged on (the parent's "
                                          "training texts and the held-out ones left over): calibration of static "
                                          "INT8, NNCF and QAD, and auto's sensitivity_texts")
    sensitivity_texts: int = param(200, "auto: calibration texts each node's INT8 sensitivity is measured on, for "
                                        "the candidate that keeps the most sensitive nodes float (one quantization "
                                        "and pass per node: most of auto's time on a 6-layer model); 0 skips it")
    qad_steps: int = param(300, "auto: batches of quantization-aware distillation for the qad-* candidates (the "
                                "fp32 model fine-tuned under simulated INT8 against its own logits; 0 skips them)")
    qad_learning_rate: float = param(3e-6, "auto: peak learning rate of quantization-aware distillation")
    seed: int = param(42, "seed for the held-out, calibration and QAD samples (the test subset follows the parent "
                          "run's seed)")
    name: str = param("", "registered name (empty: PARENT-int8)")
    alias: str = param("candidate", "alias for the new version ('' skips); promote moves champion")

    def validate(self) -> None:
        if not self.model:
            raise UserError("model is required: the registry URI of a fp32 model, e.g. "
                            "models:/kd-sentiment-minilm-tweeteval@champion.")
        if self.calibration_samples <= 0:
            raise UserError(f"calibration_samples={self.calibration_samples}: must be positive.")
        if self.sensitivity_texts < 0 or (self.mode == "auto" and self.sensitivity_texts > self.calibration_samples):
            raise UserError(f"sensitivity_texts={self.sensitivity_texts}: between 0 (no sensitivity search) and "
                            f"calibration_samples={self.calibration_samples} (it measures on those texts).")
        if self.choice_samples <= 0 or self.qad_steps < 0 or self.qad_learning_rate <= 0:
            raise UserError(f"choice_samples={self.choice_samples}, qad_steps={self.qad_steps}, qad_learning_rate="
                            f"{self.qad_learning_rate}: choice_samples and the learning rate must be positive, "
                            "qad_steps 0 (no QAD) or more.")
        if self.max_ece_increase < 0:
            raise UserError(f"max_ece_increase={self.max_ece_increase}: an increase of 0 or more.")
        if not 0 <= self.min_agreement < 1:
            raise UserError(f"min_agreement={self.min_agreement}: a share in [0, 1); it is read as a lower "
                            "confidence bound, which no number of texts lifts to 1.")
        if self.candidates.strip() and self.mode != "auto":
            raise UserError(f"candidates={self.candidates!r}: chooses among auto's candidates; mode={self.mode} "
                            "applies one fixed recipe. Use mode auto, or leave candidates empty.")
        check_alias(self.alias)


@dataclass
class PromoteArgs:
    """Point ALIAS of NAME at VERSION if its accuracy (and macro-recall) is at most MARGIN points below
    its parent's on the same validation data. Every decision is an MLflow run; history lists the
    alias's past holders, rollback moves it back to the one before (gated)."""

    name: str = param(MISSING, "registered model name, e.g. kd-sentiment-minilm-tweeteval-int8", positional=True)
    version: str = param("", "version number to promote (not with history or rollback)")
    alias: str = param("champion", "alias to move")
    margin: float = param(1.0, "largest allowed drop vs the parent, in points (percentage points)")
    force: bool = param(False, "promote even if the gate fails (recorded in a tag)")
    history: bool = param(False, "list the alias's past holders from the promote runs; moves nothing")
    rollback: bool = param(False, "move the alias back to its holder before the current one, through the same gate")

    def validate(self) -> None:
        check_alias(self.alias)


@dataclass
class BenchmarkArgs:
    """Measure every aliased model of the dataset (or the given models) in each backend it has, plus plain
    optimum INT8 of each quantized student (the peer baseline): every model in a long-lived process of
    its own, in interleaved rounds; write results/benchmarks/*.csv."""

    dataset: str = param("tweeteval", DATASET_HELP)
    data_dir: str | None = param(None, DATA_DIR_HELP, read=optional_text)
    models: str = param("", "comma-separated models:/ URIs (empty: every aliased version whose dataset tag matches)")
    batch_sizes: str = param("1,8,32", "comma-separated batch sizes")
    fixed_length: int = param(128, "tokens per text in the fixed-length setting (comparable across datasets)")
    threads: int = param(0, "intra-op threads for every model (0: all cores)")
    max_eval_samples: int | None = param(1000, "stratified test subset for accuracy and ECE ('all' for everything)",
                                         read=optional_count)
    # Six rounds: the smallest number whose lowest and highest per-round ratio bound the median
    # speedup with at least 95% confidence (1 - 2/2^6 = 96.9%; five rounds give 93.75%).
    rounds: int = param(6, "rounds of measurement; every model is measured once per round, in the same order, so "
                           "drift hits all alike (speedup intervals need at least 6)")
    samples: int = param(100, "timed batches per setting over all rounds, at most (p99 needs 100, p95 20)")
    time_budget: float = param(2.0, "seconds of timed batches per setting and round, at most")
    min_batches: int = param(2, "timed batches per setting and round, at least (even past time_budget)")
    peer: bool = param(True, "also measure plain optimum INT8 (export + ORTQuantizer with this CPU's dynamic "
                             "preset, no fusion) of every quantized student's fp32 parent, the same way")
    seed: int = param(42, "seed for the evaluation subset and text order")
    output_dir: str = param("results/benchmarks", "where the CSV and Markdown go")

    def validate(self) -> list[int]:
        """The batch sizes, or a UserError naming the parameter."""
        sizes = comma_separated(self, "batch_sizes", int, "integers", "1,8,32")
        if not sizes or min(sizes) < 1:
            raise UserError(f"batch_sizes={self.batch_sizes!r}: every batch size must be at least 1.")
        for name in ("fixed_length", "rounds", "samples", "min_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be at least 1.")
        if self.time_budget <= 0 or self.threads < 0:
            raise UserError("time_budget must be positive and threads not negative.")
        return sizes


@dataclass
class PipelineArgs:
    """Run every step for one dataset as child runs of one parent run; steps that already finished
    with the same parameters and code are reused."""

    config: str = param("experiments/smoke.yaml", "experiments/smoke.yaml, cpu.yaml or paper.yaml")
    dataset: str = param("tweeteval", DATASET_HELP)
    data_dir: str | None = param(None, DATA_DIR_HELP, read=optional_text)


SCALED_VARIANTS = ("raw", "calibrated", "sharpened")     # the registered teacher, its logits rescaled
TRAINED_VARIANTS = ("label-smoothed", "trained-longer")  # teachers trained for the study
STUDY_VARIANTS = SCALED_VARIANTS + TRAINED_VARIANTS


@dataclass
class StudyArgs:
    """Distil one student, on one dataset and budget, from the registered teacher as is, rescaled
    (calibrated, sharpened) and retrained (label-smoothed, trained longer), over a fixed grid of KD
    temperatures; finished runs are reused."""

    kind: str = param("calibration", "which study", choices=("calibration",), positional=True)
    dataset: str = param("tweeteval", DATASET_HELP)
    data_dir: str | None = param(None, DATA_DIR_HELP, read=optional_text)
    catalog: str | None = param(None, CATALOG_HELP, read=optional_text)
    teacher: str = param("", "registry URI (empty: models:/kd-sentiment-teacher-DATASET@champion)")
    variants: str = param(",".join(STUDY_VARIANTS), "teacher variants to run, comma-separated")
    label_smoothing: float = param(0.1, "of the label-smoothed teacher")
    longer_epochs: int = param(6, "epochs of the trained-longer teacher; more than the registered teacher's (cpu: 3)")
    student: str = param("tinybert", "the student every variant distils (as distill's student)")
    temperatures: str = param("1,4", "the fixed KD temperature grid, comma-separated")
    seeds: str = param("42,43,44", "training seeds, comma-separated: each teacher variant and T_kd is distilled once "
                                   "per seed, and the report compares variants over the seeds")
    alpha: float = param(0.5, "weight of the soft-target loss")
    epochs: int = param(2, "student epochs")
    lr: float = param(8e-5, "student learning rate")
    batch_size: int = param(16, "student batch size")
    max_length: int = param(128, "tokens per text")
    max_train_samples: int | None = param(1500, "stratified subset of train ('all')", read=optional_count)
    max_eval_samples: int | None = param(1000, "stratified subsets of validation and test ('all')",
                                         read=optional_count)

    def validate(self) -> tuple[list[str], list[float], list[int]]:
        """(variants, KD temperatures, seeds), or a UserError naming the parameter."""
        variants = [v.strip() for v in self.variants.split(",") if v.strip()]
        unknown = sorted(set(variants) - set(STUDY_VARIANTS))
        if unknown or not variants:
            raise UserError(f"variants={self.variants!r}: unknown {unknown}; choose from {', '.join(STUDY_VARIANTS)}.")
        temperatures = comma_separated(self, "temperatures", float, "numbers", "1,4")
        if not temperatures or min(temperatures) <= 0:
            raise UserError(f"temperatures={self.temperatures!r}: at least one, each greater than 0.")
        seeds = comma_separated(self, "seeds", int, "whole numbers", "42,43,44")
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"seeds={self.seeds!r}: at least one, each once.")
        return variants, temperatures, seeds


@dataclass
class LoadTestArgs:
    """Start `mlflow models serve` for MODEL on a free 127.0.0.1 port and load it with single-text
    requests (some malformed): open loop at RATE requests per second (Poisson arrivals), or closed
    loop from concurrent clients; log p50/p95/p99 latency with their sample count, throughput,
    errors, timeouts and requests the bound cut off."""

    model: str = param(MISSING, "registry URI, e.g. models:/kd-sentiment-minilm-tweeteval-int8@champion")
    dataset: str = param("tweeteval", "where the request texts come from (its test split)")
    data_dir: str | None = param(None, DATA_DIR_HELP, read=optional_text)
    rate: float = param(0.0, "open loop: requests per second on average, Poisson arrivals (0: closed loop)")
    requests: int = param(500, "open loop: requests in all")
    request_timeout_s: float = param(10.0, "open loop: a request unanswered this long counts as timed out")
    clients: int = param(4, "closed loop: concurrent clients")
    requests_per_client: int = param(50, "closed loop: requests each client sends")
    malformed_every: int = param(10, "every Nth request is malformed (0: none)")
    warmup_requests: int = param(5, "requests sent first, one at a time, and not timed (a fresh server's one-off costs)")
    # One server process runs several requests at once (MLflow's scoring server calls predict from a
    # thread pool), but its Python holds the GIL between the runtime's calls: more processes use more cores.
    workers: int = param(1, "server worker processes (mlflow models serve --workers); each gets cores/workers "
                            "runtime threads")
    tolerance: float = param(1e-4, "largest difference of a served probability from the model's in-process answer "
                                   "for the same text (asked one text at a time, like each request) before the "
                                   "answer counts as wrong")
    timeout_s: float = param(120.0, "hard stop for the whole test")
    find_knee: bool = param(False, "instead of one load: the highest open-loop rate whose p99 stays within "
                                   "knee_p99_ms with no wrong answer, error or timeout (doubling from --rate, or 50, "
                                   "then halving the gap knee_steps times), each trial knee_trial_s seconds")
    knee_p99_ms: float = param(30.0, "find_knee: the p99 latency bound a rate must hold")
    knee_trial_s: float = param(10.0, "find_knee: seconds of arrivals per trial rate")
    knee_max_rate: float = param(1600.0, "find_knee: the highest rate tried (requests per second)")
    knee_steps: int = param(3, "find_knee: halvings of the gap between the last rate held and the first not held")
    seed: int = param(42, "open loop: seed of the arrival times")
    output_dir: str = param("results/benchmarks", "where the serving CSV goes")

    def validate(self) -> None:
        if self.rate < 0:
            raise UserError(f"rate={self.rate}: requests per second, or 0 for the closed loop.")
        if self.workers < 1:
            raise UserError(f"workers={self.workers}: at least 1.")
        if not 0 <= self.tolerance < 1:
            raise UserError(f"tolerance={self.tolerance}: a probability difference in [0, 1).")
        if self.find_knee and not (self.knee_p99_ms > 0 and self.knee_trial_s > 0 and self.knee_max_rate > 0):
            raise UserError(f"knee_p99_ms={self.knee_p99_ms}, knee_trial_s={self.knee_trial_s}, "
                            f"knee_max_rate={self.knee_max_rate}: all must be positive.")


BAD_ROWS = ("reject", "flag")  # score: refuse an input with a bad row, or write it with an `error` column


@dataclass
class ScoreArgs:
    """Label every text of INPUT with a registered model through Spark (`mlflow.pyfunc.spark_udf`: the
    pyfunc `mlflow models serve` answers with) and write OUTPUT as Parquet: the input's columns plus
    `label`, `score` and `prob_<label>`, one row per input row, in the input's order."""

    input: str = param(MISSING, "a CSV (with a header), JSONL or Parquet file, or a folder of such files of one "
                                "kind (read in name order)")
    output: str = param(MISSING, "where the Parquet output goes (a folder, as Spark writes it); must not exist")
    model: str | None = param(None, "registry URI (empty: the one INT8 model of --dataset with alias champion)",
                              read=optional_text)
    dataset: str = param("tweeteval", "the experiment the run goes to, and whose INT8 champion is the default model")
    text_column: str = param("text", "the input column that holds the texts")
    bad_rows: str = param("reject", "a row whose text is missing, null or not text: 'reject' stops before scoring "
                                    "with one line naming the file, row and column; 'flag' writes it with an "
                                    "`error` column and no prediction", choices=BAD_ROWS)
    spark_master: str = param("local[*]", "Spark master URL (local[N], spark://..., yarn, k8s://...)")
    batch_rows: int = param(1024, "texts per Arrow batch handed to the model (it sorts each batch by length "
                                  "and runs it 32 at a time: a larger batch pads less, and holds more in memory)")
    partitions_per_slot: int = param(2, "input partitions per Spark task slot (more: better balance, and one more "
                                        "model load per partition)")
    compare_in_process: bool = param(False, "also time in-process batched predict on the same texts (collected on "
                                            "the driver: for a measurement, not a corpus) before and after Spark, "
                                            "and log the ratio")

    def validate(self) -> None:
        for name in ("batch_rows", "partitions_per_slot"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: at least 1.")
        if not self.text_column:
            raise UserError("text_column is empty: name the input column that holds the texts.")


RESULTS_PAGE = "results/RESULTS.md"  # the committed results page, whose numbers the README repeats


@dataclass
class ReportArgs:
    """Generate the results page from the latest finished pipeline run of a configuration for each
    dataset, plus the calibration study's runs."""

    config: str = param("cpu", "configuration name whose pipeline runs to report")
    datasets: str = param("imdb,tweeteval", "comma-separated datasets")
    out: str = param(RESULTS_PAGE, "where to write the Markdown")
    readme: str = param("auto", "README whose results block (between markers) is refreshed: auto (README.md when "
                                "out is the default results page, none otherwise), none, or a path")

    def readme_path(self) -> str | None:
        """The README to refresh, or None: a results page written elsewhere (a smoke run, a draft)
        must not replace the committed README block unless a README is named."""
        if self.readme == "auto":
            return "README.md" if self.out == RESULTS_PAGE else None
        return None if self.readme in ("", "none") else self.readme
