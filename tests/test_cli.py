"""The MLproject entry points and the `kd-sentiment` CLI must agree: every entry point's command,
with its default parameters filled in the way `mlflow run` fills them (shell-quoted), parses."""
import shlex
from pathlib import Path

import pytest
import yaml

from kd_sentiment.cli import COMMANDS, build_parser

MLPROJECT = yaml.safe_load((Path(__file__).parents[1] / "MLproject").read_text())
REQUIRED = {"model": "models:/kd-sentiment-minilm-tweeteval@champion", "name": "kd-sentiment-minilm-tweeteval-int8",
            "version": "1", "input": "tweets.csv", "output": "labelled"}  # parameters without a default: a value a user would pass


@pytest.mark.parametrize("entry_point", sorted(MLPROJECT["entry_points"]))
def test_entry_point_command_parses_with_its_defaults(entry_point):
    spec = MLPROJECT["entry_points"][entry_point]
    values = {name: p["default"] if "default" in p else REQUIRED[name] for name, p in spec["parameters"].items()}
    argv = shlex.split(spec["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()}))
    assert argv[0] == "kd-sentiment"
    namespace = build_parser().parse_args(argv[1:])
    for name, value in values.items():  # every parameter reaches a flag of the same name
        assert hasattr(namespace, name), f"{entry_point}: parameter {name} has no --{name} flag"


@pytest.mark.parametrize("entry_point", ["teacher", "distill", "quantize", "promote", "benchmark", "loadtest",
                                         "report", "study", "score"])
def test_every_step_flag_is_an_entry_point_parameter(entry_point):
    """A flag (a new TrainConfig field, say) missing from MLproject would be unreachable from `mlflow run`."""
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {a.dest for a in subcommands[entry_point]._actions if a.dest != "help"}
    missing = flags - set(MLPROJECT["entry_points"][entry_point]["parameters"])
    assert not missing, f"{entry_point}: flags without an MLproject parameter: {sorted(missing)}"


@pytest.mark.parametrize("entry_point", sorted(MLPROJECT["entry_points"]))
def test_entry_point_parameters_match_the_flags_field_by_field(entry_point):
    """Each MLproject parameter has its flag's default (read through the flag's own parser) and, for
    a whole-number flag, type int: a default changed in one place and not the other fails here."""
    from kd_sentiment.core.parameters import whole_number

    command = "pipeline" if entry_point == "main" else entry_point
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {}
    for action in subcommands[command]._actions:  # the first of a name: --no_FLAG comes after --FLAG
        flags.setdefault(action.dest, action)
    for name, spec in MLPROJECT["entry_points"][entry_point]["parameters"].items():
        flag = flags[name]
        if flag.type is whole_number:
            assert spec.get("type") == "int", f"{entry_point}.{name}: a whole number, declared {spec.get('type')}"
        if "default" in spec:
            parse = flag.type or (lambda text: text)
            empty = (None, "")  # optional text flags read '' as None: both mean "not given"
            parsed = parse(str(spec["default"]))
            assert parsed == flag.default or (parsed in empty and flag.default in empty), \
                f"{entry_point}.{name}: MLproject default {spec['default']!r}, flag default {flag.default!r}"


def test_every_command_has_an_entry_point():
    """`pipeline` is the `main` entry point; every other command is an entry point of its own name."""
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(subcommands) - {"pipeline"} <= set(MLPROJECT["entry_points"]) and "main" in MLPROJECT["entry_points"]


@pytest.mark.parametrize("argv", [["promote", "--history", "kd-sentiment-x-int8"], ["promote", "kd-sentiment-x-int8", "--history"],
                                  ["promote", "--history=true", "kd-sentiment-x-int8"],
                                  ["promote", "--history", "true", "kd-sentiment-x-int8"]])
def test_a_boolean_flag_alone_is_true_on_either_side_of_the_positional(argv):
    ns = build_parser().parse_args(argv)
    assert ns.history is True and ns.name == "kd-sentiment-x-int8" and ns.rollback is False


def test_a_boolean_flag_still_takes_the_value_mlproject_passes():
    ns = build_parser().parse_args(["promote", "--history", "false", "--force", "no", "kd-sentiment-x-int8"])
    assert ns.history is False and ns.force is False and ns.name == "kd-sentiment-x-int8"
    ns = build_parser().parse_args(["teacher", "--resume", "false", "--cpu", "--dataset", "imdb"])
    assert ns.resume is False and ns.cpu is True and ns.dataset == "imdb"
    assert "--history [true|false]" in build_parser()._subparsers._group_actions[0].choices["promote"].format_help()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_commands_help_renders(command, capsys):
    """`kd-sentiment COMMAND --help` prints its flags (a bare % in a help text made argparse crash)."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0 and "--" in capsys.readouterr().out
