"""`kd-sentiment`: one sub-command per pipeline step; MLproject entry points call the same commands.

Each command's flags come from its step's arguments dataclass in kd_sentiment/core/parameters.py (one
declaration per parameter: type, default, help, choices), through transformers' HfArgumentParser
(`kd-sentiment STEP --help` documents them). Values are checked before any data or model is
loaded. A mistake the user can fix (bad data, unknown model, bad parameter) prints one line and
exits with status 2; the step's MLflow run, if it had started, is marked FAILED.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
from dataclasses import MISSING

from kd_sentiment.core import parameters
from kd_sentiment.core.errors import UserError

# command -> (step module whose run() takes the arguments, arguments dataclass, one-line help)
COMMANDS = {
    "teacher": ("training.teacher", parameters.TeacherArgs, "fine-tune and register the teacher"),
    "distill": ("training.distill", parameters.DistillArgs, "distil students from the registered teacher"),
    "quantize": ("deploy.quantize", parameters.QuantizeArgs, "export a registered model to ONNX and INT8, check, register"),
    "promote": ("deploy.promote", parameters.PromoteArgs, "move an alias to a version that passes its accuracy gate"),
    "benchmark": ("measure.benchmark", parameters.BenchmarkArgs, "latency, throughput, memory, accuracy and ECE of every model"),
    "pipeline": ("pipeline", parameters.PipelineArgs, "teacher -> distill -> quantize -> promote -> benchmark, from a config"),
    "study": ("study", parameters.StudyArgs, "the calibration study: one student from teachers of different calibration"),
    "loadtest": ("measure.loadtest", parameters.LoadTestArgs, "serve a model and load it with concurrent clients (loopback only)"),
    "score": ("deploy.score", parameters.ScoreArgs, "label a file or folder of texts with a registered model through Spark"),
    "report": ("report.results", parameters.ReportArgs, "write results/RESULTS.md from the MLflow runs"),
}


BOOLEAN_METAVAR = "true|false"  # how --help shows a boolean flag's optional value


def step_parser_class():
    """HfArgumentParser (imported here: transformers brings torch, ~2 s) makes each field a flag: its
    type, default, help, choices, `--flag` alone for a true boolean, `--no_flag` for one that
    defaults to true, required when there is no default. Taught three things the schema declares:
    a field's own reader (`param(read=...)`: 'all' for no limit, '3.0' as a whole number; the same
    reader a config file's value goes through), positional fields, a nested dataclass (TrainConfig)
    whose fields are the step's flags, and a boolean flag alone before a positional
    (`promote --history NAME`): it means true, and NAME stays the positional."""
    from transformers import HfArgumentParser

    def is_boolean(text: str) -> bool:
        try:
            parameters.boolean(text)
            return True
        except argparse.ArgumentTypeError:
            return False

    class StepParser(HfArgumentParser):
        def parse_known_args(self, args=None, namespace=None):
            # argparse would take the word after `--flag` as its value whatever it is; here only a
            # true/false word is, and `--flag` alone before anything else reads as `--flag=true`.
            args = list(sys.argv[1:] if args is None else args)
            flags = {f"--{a.dest}" for a in self._actions if a.metavar == BOOLEAN_METAVAR}
            args = [f"{arg}=true" if arg in flags and (k + 1 == len(args) or not is_boolean(args[k + 1])) else arg
                    for k, arg in enumerate(args)]
            return super().parse_known_args(args, namespace)

        def _add_dataclass_arguments(self, dtype):
            for f in parameters.flat_fields(dtype).values():
                self._parse_dataclass_field(self, f)

        def _parse_dataclass_field(self, parser, f):
            flag = copy.copy(f)
            flag.metadata = {k: v for k, v in f.metadata.items() if k in ("help", "choices") and v is not None}
            # The reader decides what a value is: HfArgumentParser sees text (it reads no unions).
            flag.type = bool if isinstance(f.default, bool) else str
            if f.metadata.get("positional"):
                required = f.default is MISSING
                parser.add_argument(f.name, nargs=None if required else "?", type=parameters.reader(f),
                                    **({} if required else {"default": f.default}), **flag.metadata)
                return
            super()._parse_dataclass_field(parser, flag)
            action = parser._option_string_actions[f"--{f.name}"]
            action.type = parameters.reader(f)
            if isinstance(f.default, bool):  # `--flag`, `--flag true|false` (MLproject's form), `--flag=false`
                action.metavar = BOOLEAN_METAVAR

    return StepParser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-sentiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="also print details (tracking store, step keys, cache look-ups), before the command")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=step_parser_class())
    for name, (_, args_class, help_line) in COMMANDS.items():
        commands.add_parser(name, dataclass_types=[args_class], help=help_line,
                            description=" ".join(args_class.__doc__.split()),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return parser


def step_arguments(ns: argparse.Namespace):
    """The command's arguments dataclass from the parsed flags, validated before the step's module
    (and with it MLflow, ONNX Runtime...) is imported."""
    args_class = COMMANDS[ns.command][1]
    values = {name: getattr(ns, name) for name in parameters.flat_fields(args_class)}
    args = parameters.build(args_class, values)
    if hasattr(args, "validate"):
        args.validate()
    return args


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
        args = step_arguments(ns)
        importlib.import_module(f"kd_sentiment.{COMMANDS[ns.command][0]}").run(args)
    except UserError as err:
        print(f"kd-sentiment {ns.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
