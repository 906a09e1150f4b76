"""The `promote` step: move a registry alias to a version only if it passes its accuracy gate.

The gate compares the version with its parent on the same evaluation data, from the `gate.*` tags
its step wrote (quantize: INT8 vs the fp32 parent, on its judged held-out texts, `gate.split`):
accuracy, and macro-recall where present, may be at most `margin` points below the parent's, and
quantize's own verdict (`gate.passed`: its paired bounds, ECE and agreement on the judged texts)
must be a pass; the prediction agreement is recorded beside them. A version no better than the majority class on those
texts (`gate.majority_*`) is refused before any gate, like the training steps withhold their alias
from such a model. The decision and the numbers are written as version tags (`promotion.*`); a
refusal moves nothing; `force` overrides and says so.

Every promotion (accepted, refused, forced, or a rollback) is also an MLflow run of its own (step
`promote`, in the model's dataset experiment): the model, the version, the alias's holder before
and after, the gate's numbers, the decision, the user and the machine. From those runs,
`history` lists an alias's past holders and `rollback` moves it back to the holder before the
current one, through the same gate. The alias can also be moved by hand in the MLflow UI (model
page -> version -> Aliases); that leaves no promote run.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kd_sentiment.core import tracking
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.machine import DECIDING_FEATURES, cpu_features
from kd_sentiment.core.parameters import PromoteArgs

log = logging.getLogger(__name__)

GATED = ("accuracy", "macro_recall")
NONE = "none"  # the alias's holder before its first promotion
MOVED = ("accepted", "forced", "rolled back", "rolled back (forced)")  # decisions that moved the alias


def gate(tags: dict, margin: float) -> tuple[bool, dict]:
    """(passed, numbers): each gated metric's drop vs the parent, in points, against `margin`."""
    numbers, passed = {}, True
    for metric in GATED:
        own, parent = tags.get(f"gate.{metric}"), tags.get(f"gate.parent_{metric}")
        if own is None or parent is None:
            continue
        drop = round(100 * (float(parent) - float(own)), 4)  # 1.0000000000000009 points is 1.0
        numbers[f"{metric}_drop_points"] = drop
        passed &= drop <= margin
    if "gate.passed" in tags:  # quantize's own verdict on the judged texts (bounds, ECE, agreement)
        numbers["quantize_gate_passed"] = float(tags["gate.passed"] == "true")
        passed &= tags["gate.passed"] == "true"
    return passed, numbers


def alias_holder(name: str, alias: str) -> str:
    """The version `alias` points at now, or NONE where the model has no such alias; a model not in
    the registry is a UserError, and any other registry error is raised as it is (never read as "no
    alias", which would write a wrong holder into the rollback history)."""
    try:
        model = MlflowClient().get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"{name}: not in the model registry at {mlflow.get_tracking_uri()}.") from None
    return str(model.aliases.get(alias, NONE))


def promotion_runs(name: str, alias: str) -> list:
    """The promote runs of `name`'s `alias`, oldest first."""
    return tracking.find_runs("promote", params={"name": name, "alias": alias}, oldest_first=True)


def history(name: str, alias: str) -> list[dict]:
    """Every recorded promotion of the alias: when, who, the decision, the holder before and after."""
    rows = [{"time": r.info.start_time, "user": r.info.user_id or "", "decision": r.data.tags["promotion.decision"],
             "before": r.data.tags["promotion.alias_before"], "after": r.data.tags["promotion.alias_after"],
             "version": r.data.tags["promotion.version"], "run_id": r.info.run_id} for r in promotion_runs(name, alias)]
    log.info("%s@%s: %d recorded promotion(s); now at version %s", name, alias, len(rows), alias_holder(name, alias))
    for row in rows:
        when = datetime.fromtimestamp(row["time"] / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        log.info(f"  {when}  {row['user'] or '-':<10} {row['decision']:<21} version {row['version']}: "
              f"{row['before']} -> {row['after']}  (run {row['run_id']})")
    return rows


def rollback_target(name: str, alias: str) -> str:
    """The version that held the alias before its current holder: the promote runs replayed as a
    stack (a promotion pushes its version, a rollback pops one), so rolling back twice goes two
    holders back; promotions that moved nothing (already the holder, refused) are skipped."""
    stack = []
    for run in promotion_runs(name, alias):
        tags = run.data.tags
        before, after = tags["promotion.alias_before"], tags["promotion.alias_after"]
        if tags["promotion.decision"] not in MOVED or before == after:
            continue
        stack = stack or [before]
        if tags["promotion.decision"].startswith("rolled back"):
            stack.pop()
        else:
            stack.append(after)
    current = alias_holder(name, alias)
    if len(stack) < 2 or stack[-1] != current or stack[-2] == NONE:
        raise UserError(f"{name}@{alias}: no recorded earlier holder to roll back to (see history).")
    return stack[-2]


def below_majority(version) -> str | None:
    """Why a version is no better than always predicting the majority class (None where it is better):
    its gate's numbers against the baseline on the same texts (`gate.majority_*`, written by quantize),
    else its training run's validation metric against `val_majority_*` (teacher, distill); "not
    measured" where neither was recorded."""
    tags = version.tags
    metric = tags.get("gate.selection_metric")
    if metric and f"gate.majority_{metric}" in tags and f"gate.{metric}" in tags:
        own, floor = float(tags[f"gate.{metric}"]), float(tags[f"gate.majority_{metric}"])
        where = tags.get("gate.eval_data", "its gate texts")
    else:
        run = mlflow.get_run(version.run_id) if version.run_id else None
        metric = run.data.params.get("selection_metric") if run else None
        if not metric or f"val_majority_{metric}" not in run.data.metrics:
            return "not measured"
        own, floor, where = run.data.metrics[f"val_{metric}"], run.data.metrics[f"val_majority_{metric}"], "validation"
    if own > floor:
        return None
    return f"not better than the majority class on {where} ({metric} {own:.4f} vs {floor:.4f})"


def hardware_differences(tags: dict) -> list[str]:
    """The deciding CPU features (machine.DECIDING_FEATURES) in which this machine differs from the one
    the version was validated on (its `validated_on.*` tags); empty for versions without them."""
    here = cpu_features()
    return [f"{k} {tags[f'validated_on.{k}']} there, {here[k]} here" for k in DECIDING_FEATURES
            if f"validated_on.{k}" in tags and tags[f"validated_on.{k}"] != str(here[k])]


def decide(version, args: PromoteArgs, rollback: bool) -> tuple[str, dict, str | None]:
    """(decision, gate numbers, `below_majority`'s finding) for moving the alias to `version`. A
    version no better than the majority class fails the gate. A version validated on a CPU whose
    deciding features differ from this one's is refused unless forced: which runtime and precision
    is fastest, and how INT8 computes, depend on them."""
    differences = hardware_differences(version.tags)
    if differences and not args.force:
        raise UserError(f"{args.name} version {version.version} was validated on {version.tags.get('validated_on.cpu')}"
                        f" and this CPU differs ({'; '.join(differences)}): run quantize on this machine to choose and "
                        "check a model for it, or set force to promote it anyway (recorded).")
    passed, numbers = gate(version.tags, args.margin)
    floor = below_majority(version)
    passed &= floor in (None, "not measured")  # a model that learnt nothing usable
    if not numbers and not args.force:
        raise UserError(f"{args.name} version {version.version} has no gate.* measurements against a parent (only "
                        "quantize writes them); nothing moved. Set force to promote it anyway.")
    decision = "accepted" if passed and not differences else ("forced" if args.force else "refused")
    if rollback and decision != "refused":
        decision = "rolled back" if passed else "rolled back (forced)"
    return decision, numbers, floor


def run(args: PromoteArgs) -> bool:
    """Promote (or roll back) if the gate passes, or with force; every decision is a run. Returns
    whether the alias moved; a refusal raises UserError after it is recorded."""
    if not args.name:
        raise UserError("promote needs a registered model name.")
    if not (args.version or args.history or args.rollback):
        raise UserError("promote needs version (or history, or rollback).")
    if args.version and args.rollback:
        raise UserError(f"version={args.version} with rollback: a rollback picks the previous holder itself; "
                        "pass one of them.")
    if args.margin < 0:
        raise UserError(f"margin={args.margin}: must not be negative (points of accuracy).")
    tracking.configure()
    if args.history:
        history(args.name, args.alias)
        return False
    number = rollback_target(args.name, args.alias) if args.rollback else args.version
    version = tracking.resolve_version(f"models:/{args.name}/{number}")
    decision, numbers, floor = decide(version, args, args.rollback)
    before = alias_holder(args.name, args.alias)
    after = before if decision == "refused" else str(version.version)
    tracking.use_experiment(version.tags.get("dataset") or "registry")
    tags = {"promotion.decision": decision, "promotion.alias": args.alias, "promotion.version": str(version.version),
            "promotion.margin_points": str(args.margin),
            "promotion.eval_data": version.tags.get("gate.eval_data", ""),
            "promotion.split": version.tags.get("gate.split", ""),
            "promotion.agreement": version.tags.get("gate.agreement", ""),
            "promotion.alias_before": before, "promotion.alias_after": after,
            "promotion.hardware": "; ".join(hardware_differences(version.tags)) or "as validated",
            "promotion.majority_floor": floor or "above",
            **{f"promotion.{k}": str(v) for k, v in numbers.items()}}
    with tracking.step_run("promote", f"promote-{args.name}-v{version.version}-{args.alias}") as promotion:
        tracking.log_params({"name": args.name, "version": str(version.version), "alias": args.alias,
                             "margin": args.margin, "force": args.force, "rollback": args.rollback})
        tracking.log_environment()
        mlflow.set_tags(tags)
        mlflow.log_metrics(numbers)
        client = MlflowClient()
        for key, value in {**tags, "promotion.run_id": promotion.info.run_id}.items():
            client.set_model_version_tag(args.name, version.version, key, value)
        if decision != "refused":
            client.set_registered_model_alias(args.name, args.alias, version.version)
    summary = ", ".join(f"{k}={v}" for k, v in numbers.items()) or "no gate measurements"
    if floor not in (None, "not measured"):
        summary = f"{floor}; {summary}"
    if decision == "refused":
        raise UserError(f"{args.name} version {version.version} failed its gate ({summary}; margin {args.margin} "
                        f"points): alias '{args.alias}' not moved. Set force to override.")
    log.info("%s: %s@%s version %s -> %s (%s)", decision, args.name, args.alias, before, version.version, summary)
    return True
