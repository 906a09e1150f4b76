"""Experiment configuration files (experiments/*.yaml): their sections read and checked as the steps'
flags would read them, so a typo or a bad value is refused with one line before anything runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from kd_sentiment.core import parameters
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.models import read_yaml

SECTIONS = ("catalog", "data", "teacher", "distill", "quantize", "promote", "benchmark")

# What the pipeline sets itself in a training step's arguments; a config section may not.
SET_FOR_TRAINING = {"dataset", "data_dir", "catalog", *parameters.DATA_KEYS, "output_dir", "resume", "alias", "name"}
DISTILL_PLAN = {"students", "baseline", "seeds"}  # distill-section keys the pipeline itself reads


def section_keys() -> dict[str, set[str]]:
    """The keys each config section takes: the parameters of the step's schema (parameters.py) that the
    config sets, minus what the pipeline sets itself (dataset, data, upstream models, names)."""
    flat = parameters.flat_fields
    return {
        "data": set(parameters.DATA_KEYS),
        "teacher": set(flat(parameters.TeacherArgs)) - SET_FOR_TRAINING,
        "distill": set(flat(parameters.DistillArgs)) - SET_FOR_TRAINING - {"student", "teacher"} | DISTILL_PLAN,
        "quantize": set(flat(parameters.QuantizeArgs)) - {"model", "dataset", "data_dir", "max_eval_samples"},
        "promote": {"margin"},
        "benchmark": set(flat(parameters.BenchmarkArgs)) - {"dataset", "data_dir", "models"},
    }


SECTION_SCHEMA = {"data": parameters.StepArgs, "teacher": parameters.TeacherArgs, "distill": parameters.DistillArgs,
                  "quantize": parameters.QuantizeArgs, "promote": parameters.PromoteArgs, "benchmark": parameters.BenchmarkArgs}


def read_plan(plan: dict, where: str) -> dict:
    """The distill section's own keys: students (a list of names), seeds (a list of whole numbers),
    baseline (true or false)."""
    students, seeds = plan.get("students", []), plan.get("seeds", [])
    if not isinstance(students, list) or not all(isinstance(s, str) and s for s in students):
        raise UserError(f"{where}: students must be a list of student names, e.g. [minilm, tinybert].")
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{where}: seeds must be a list of whole numbers, e.g. [42, 43, 44].")
    if "baseline" in plan:
        try:
            plan["baseline"] = parameters.boolean(plan["baseline"])
        except argparse.ArgumentTypeError as err:
            raise UserError(f"{where}: baseline: {err}") from None
    return plan


def read_block(section: str, block: dict, where: str) -> dict:
    """One section's values read as their flags would (the distill plan's own keys as read_plan does)."""
    plan = read_plan({k: block[k] for k in DISTILL_PLAN & set(block)}, where)
    return {**parameters.read_values(SECTION_SCHEMA[section], {k: v for k, v in block.items() if k not in plan}, where),
            **plan}


def check_sections(config: dict, file: Path, dataset: str | None = None) -> None:
    """Refuse a key no step would read (a typo would otherwise be dropped silently or crash later)
    and read every value as its flag would, in place: one line naming the file, the section, the
    key and the valid keys (or what the value should be). A value given per dataset becomes
    `dataset`'s (refused where it has none); without a `dataset` each one is read and kept per dataset."""
    for section, keys in section_keys().items():
        content = config.get(section) or {}
        blocks = content.items() if section == "data" else [(None, content)]
        for data_name, block in blocks:
            name = f"data.{data_name}" if data_name else section
            where = f"config {file}: section '{name}'"
            if not isinstance(block, dict):
                raise UserError(f"{where} must be a mapping of keys {sorted(keys)}.")
            unknown = sorted(set(block) - keys)
            if unknown:
                raise UserError(f"config {file}: unknown key(s) {unknown} in section '{name}'; valid keys: "
                                f"{sorted(keys)}.")
            if data_name:
                content[data_name] = read_block(section, block, where)
                continue
            per_dataset = {k: v for k, v in block.items() if isinstance(v, dict)}
            if dataset is not None:
                missing = sorted(k for k, values in per_dataset.items() if dataset not in values)
                if missing:
                    raise UserError(f"{where}: {missing} give a value per dataset but none for '{dataset}'; add "
                                    f"`{dataset}: VALUE` to each.")
                block, per_dataset = {**block, **{k: v[dataset] for k, v in per_dataset.items()}}, {}
            read = read_block(section, {k: v for k, v in block.items() if k not in per_dataset}, where)
            for key, values in per_dataset.items():
                read[key] = {each: read_block(section, {key: value}, f"{where}, {key} for {each}")[key]
                             for each, value in values.items()}
            config[section] = read


def load_config(path: str, dataset: str | None = None) -> dict:
    """The config file's sections, checked and read as their flags would be; values given per dataset
    resolved to `dataset`'s where one is named (a pipeline run), kept per dataset otherwise."""
    file = Path(path)
    config = read_yaml(file, "config (see experiments/smoke.yaml, cpu.yaml, paper.yaml)", SECTIONS)
    check_sections(config, file, dataset)
    catalog = config.get("catalog")
    if catalog and not Path(catalog).exists():  # written relative to the project root (experiments/..)
        config["catalog"] = str(file.resolve().parent.parent / catalog)
    return config
