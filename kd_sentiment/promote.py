"""The `promote` step: move a registry alias to a version only if it passes its accuracy gate.

The gate compares the version with its parent on the same evaluation data, from the `gate.*` tags
its step wrote (quantize: INT8 vs the fp32 parent, on the parent's validation split, `gate.split`):
accuracy, and macro-recall where present, may be at most `margin` points below the parent's; the
prediction agreement is recorded beside them. The decision and the numbers are written as version
tags (`promotion.*`); a refusal moves nothing; `force` overrides and says so in a tag. The same
alias can also be moved by hand in the MLflow UI (model page -> version -> Aliases).
"""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from kd_sentiment import tracking
from kd_sentiment.errors import UserError

GATED = ("accuracy", "macro_recall")


@dataclass
class PromoteArgs:
    name: str = ""
    version: str = ""
    alias: str = "champion"
    margin: float = 1.0  # points (percentage points of accuracy / macro-recall)
    force: bool = False


def gate(tags: dict, margin: float) -> tuple[bool, dict]:
    """(passed, numbers): each gated metric's drop vs the parent, in points, against `margin`."""
    numbers, passed = {}, True
    for metric in GATED:
        own, parent = tags.get(f"gate.{metric}"), tags.get(f"gate.parent_{metric}")
        if own is None or parent is None:
            continue
        drop = 100 * (float(parent) - float(own))
        numbers[f"{metric}_drop_points"] = round(drop, 4)
        passed &= drop <= margin
    return passed, numbers


def run(args: PromoteArgs) -> bool:
    """Promote if the gate passes (or force); returns whether the alias moved."""
    if not args.name or not args.version:
        raise UserError("promote needs a registered model name and --version.")
    if args.margin < 0:
        raise UserError(f"margin={args.margin}: must not be negative (points of accuracy).")
    tracking.configure()
    version = tracking.resolve_version(f"models:/{args.name}/{args.version}")
    passed, numbers = gate(version.tags, args.margin)
    if not numbers and not args.force:
        raise UserError(f"{args.name} version {args.version} has no gate.* measurements against a parent (only "
                        "quantize writes them); nothing moved. Use --force to promote it anyway.")
    decision = "accepted" if passed else ("forced" if args.force else "refused")
    client = MlflowClient()
    tags = {"promotion.decision": decision, "promotion.alias": args.alias, "promotion.margin_points": str(args.margin),
            "promotion.eval_data": version.tags.get("gate.eval_data", ""),
            "promotion.split": version.tags.get("gate.split", ""),
            "promotion.agreement": version.tags.get("gate.agreement", ""),
            **{f"promotion.{k}": str(v) for k, v in numbers.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(args.name, args.version, key, value)
    summary = ", ".join(f"{k}={v}" for k, v in numbers.items()) or "no gate measurements"
    if decision == "refused":
        raise UserError(f"{args.name} version {args.version} failed its gate ({summary}; margin {args.margin} "
                        f"points): alias '{args.alias}' not moved. Use --force to override.")
    client.set_registered_model_alias(args.name, args.alias, args.version)
    print(f"{decision}: {args.name}@{args.alias} -> version {args.version} ({summary})")
    return True
