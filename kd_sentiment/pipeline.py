"""The whole pipeline for one dataset, from a configuration file: teacher -> distill (each student,
with KD and the alpha=0 baseline) -> quantize (each KD student) -> promote -> benchmark.

Every step is a child run of one parent run. A step whose run already FINISHED with the same
parameters, upstream models and code is reused instead of re-run (its key, a hash of those, is the
tag `kd_sentiment.step_key`), so re-running an interrupted pipeline continues where it stopped; the
parent lists reused steps in the tag `reused_steps`. Training steps also resume from their last
checkpoint (in `outputs/pipeline/<key>`), in their original run; a finished one's checkpoints are deleted.

Configuration (experiments/*.yaml), every section optional:
  catalog: experiments/catalog-offline.yaml
  data:      {<dataset>: {max_train_samples, max_eval_samples, validation_size}}
  teacher:   {model, epochs, lr, batch_size, max_length, ...}      (TrainConfig fields + model)
  distill:   {students: [...], baseline: true, seeds: [42, 43, 44], transfer_set, transfer_size, epochs, lr,
              alpha, temperature, ...}
With several `seeds`, each student is trained with KD and as its alpha=0 baseline once per seed
(one run each, on the same texts: the data subsets follow `data_seed`, not the training seed); every
KD seed registers a version, and the one best on validation gets the alias and is quantized; its
version's tag `seed_runs` links the others. With a `transfer_set`, each student is also trained
with KD on the labelled texts alone (`kd_no_transfer`), so the set's gain is measured on its own. The parent logs `pipeline_record.json`: which runs
served the teacher, each student's KD and baseline seeds, the selected one, its quantization and
the benchmark (what the report reads).
  quantize:  {mode, per_channel, optimize_level, calibration_samples}
  promote:   {margin}
  benchmark: {batch_sizes, fixed_length, threads, time_budget, max_eval_samples}
A key of these sections may take one value per dataset, `epochs: {tweeteval: 1, imdb: 3}`: a run
reads its dataset's (and refuses a config without one); the run logs the values it used.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import mlflow
from accelerate import PartialState

from kd_sentiment.measure import benchmark
from kd_sentiment.core import parameters, tracking
from kd_sentiment.report import results
from kd_sentiment.training import distill, teacher
from kd_sentiment.deploy import promote, quantize
from kd_sentiment.core.data import data_fingerprint
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.configs import load_config
from kd_sentiment.core.models import load_catalog
from kd_sentiment.core.parameters import PipelineArgs

log = logging.getLogger(__name__)



def code_version(folder: Path = Path(__file__).parent) -> str:
    """Hash of the package's code, not of its comments and docstrings: a changed step implementation
    invalidates reuse, a reworded comment does not retrain a teacher."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.relative_to(folder).as_posix().encode() + ast.dump(tree).encode())
    return h.hexdigest()[:12]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def step_context(dataset: str, data_dir: str | None, catalog: str | None) -> dict[str, str]:
    """What besides a step's arguments and upstream models makes its result, each part hashed: the
    code, the data files' content and where they are read, the catalog's resolved model sources
    (after $KD_SENTIMENT_MODELS_DIR and the like), the library versions."""
    return {"code": code_version(), "data": digest(data_fingerprint(dataset, data_dir)),
            "catalog": digest(load_catalog(catalog)),
            "libraries": digest({lib: version(lib) for lib in tracking.LIBRARIES})}


# A step's label names a metric (`step_seconds.<label>`) and is listed comma-separated in `reused_steps`:
# what MLflow refuses in a metric name (a student like `teacher-layers:0,1` has a comma) becomes `_`.
NOT_IN_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")


class StepRunner:
    """Runs steps as child runs of the active run, reusing a finished identical one (also used by
    kd_sentiment/study.py): same label, arguments, upstream models and `step_context`."""

    def __init__(self, dataset: str, data_dir: str | None, catalog: str | None):
        self.context = step_context(dataset, data_dir, catalog)
        self.reused: list[str] = []
        self.step_runs: dict[str, str] = {}  # label -> run id, run now or reused (for reports)

    def step(self, label: str, step_fn, step_args, upstream: str = "", tags: dict | None = None):
        """Run `step_fn(step_args)` as a child run (with `tags`) unless an identical finished run
        exists; return that run."""
        label = NOT_IN_METRIC_NAME.sub("_", label)
        # the key from its parts, each also a tag on the run: what changed when a step ran again
        parts = {"arguments": digest(asdict(step_args)), "upstream": digest(upstream), **self.context}
        identity = json.dumps([label, parts], sort_keys=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        found = tracking.find_runs(tags={tracking.STEP_KEY_TAG: key}, max_results=1)
        if found:
            log.info("[pipeline] %s: reusing finished run %s", label, found[0].info.run_id)
            self.reused.append(label)
            return self.record(label, found[0])
        trains = hasattr(step_args, "resume")  # a training step: checkpoints to resume from, then to drop
        if trains:  # an interrupted training step continues from its checkpoint
            step_args.resume, step_args.output_dir = True, f"outputs/pipeline/{key}"
        log.info("[pipeline] %s: running", label)
        log.debug("[pipeline] %s: step key %s from %s", label, key, identity)
        with tracking.step_tags({**(tags or {}), tracking.STEP_KEY_TAG: key,
                                 **{f"{tracking.STEP_KEY_TAG}.{part}": value for part, value in parts.items()}}):
            step_fn(step_args)
        if trains:
            drop_checkpoints(Path(step_args.output_dir))
        return self.record(label, tracking.find_runs(tags={tracking.STEP_KEY_TAG: key}, max_results=1)[0])

    def record(self, label: str, finished):
        """Note the step's run and log its wall time on the active (parent) run as `step_seconds.<label>`
        (a reused step's from its original run): the next sizing of a configuration reads them."""
        self.step_runs[label] = finished.info.run_id
        mlflow.log_metric(f"step_seconds.{label}", (finished.info.end_time - finished.info.start_time) / 1000)
        return finished


def drop_checkpoints(output_dir: Path) -> None:
    """Delete a finished training step's checkpoints and best weights (about 1 GB for a 6-layer
    student): its model is logged and registered, a re-run reuses the run, and a study's dozens of
    runs would otherwise fill the disk. Every process has finished reading them first."""
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(output_dir, ignore_errors=True)


def registered_uri(run) -> str:
    """`models:/NAME/VERSION` of the model a finished step run registered."""
    return f"models:/{run.data.tags['registered_model']}/{run.data.tags['registered_version']}"


def refusal_tag(student: str) -> str:
    """The parent run's tag saying a student's INT8 promotion was refused (a tag key takes no comma:
    the student's registry name)."""
    return f"promotion.{distill.student_name(student)}"


def select_seed(runs: list, alias: str = "champion"):
    """The seed run best on validation (the dataset's selection metric; the first on a tie): its
    version gets `alias` unless it did not beat the majority class, and a tag linking the others."""
    metric = f"val_{runs[0].data.params['selection_metric']}"
    best = max(runs, key=lambda r: r.data.metrics[metric])
    name, number = best.data.tags["registered_model"], best.data.tags["registered_version"]
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, number, "seed_runs", ",".join(r.info.run_id for r in runs))
    client.set_model_version_tag(name, number, "selected_by", f"{metric} (best of {len(runs)} seeds)")
    if "alias_withheld" not in client.get_model_version(name, number).tags:
        client.set_registered_model_alias(name, alias, number)
    log.info("[pipeline] %s: version %s is the best of %d seeds by %s", name, number, len(runs), metric)
    return best


class Pipeline(StepRunner):
    """The configured steps for one dataset, in order."""

    def __init__(self, config: dict, args: PipelineArgs):
        super().__init__(args.dataset, args.data_dir, config.get("catalog"))
        self.config, self.args = config, args
        self.common = {"dataset": args.dataset, "data_dir": args.data_dir, "catalog": config.get("catalog"),
                       **(config.get("data") or {}).get(args.dataset, {})}

    def distill_student(self, student: str, section: dict, seeds: list[int], baseline: bool,
                        teacher_uri: str) -> dict[str, list]:
        """One student's distill runs, one per seed of each kind: `kd` (as configured; with one seed it
        gets the alias), `nokd` (alpha=0: same student, data and budget, no teacher) and, when the
        section has a transfer set, `kd_no_transfer` (KD on the labelled texts alone), the twins
        registered without an alias under names of their own."""
        dataset = self.args.dataset
        transfer = bool(section.get("transfer_set"))
        kinds = {"kd": {"alias": "champion" if len(seeds) == 1 else ""}}
        if baseline:
            kinds["nokd"] = {"alpha": 0.0, "transfer_set": "", "transfer_size": None, "alias": ""}
        if transfer:
            kinds["kd_no_transfer"] = {"transfer_set": "", "transfer_size": None, "alias": ""}
        runs = {kind: [] for kind in kinds}
        for seed in seeds:
            suffix = f"-s{seed}" if len(seeds) > 1 else ""
            for kind, overrides in kinds.items():
                tail = "" if kind == "kd" else f"-{kind.replace('_', '-')}"
                if kind != "kd":
                    overrides = {**overrides, "name": tracking.registered_name(
                        distill.student_name(student), dataset, kind.replace("_", "-"))}
                args = parameters.build(parameters.DistillArgs, {**self.common, **section, "seed": seed, "student": student,
                                                         "teacher": teacher_uri, **overrides})
                runs[kind].append(self.step(f"distill-{student}{tail}{suffix}", distill.run, args, teacher_uri))
        return runs

    def run(self) -> dict:
        cfg, dataset = self.config, self.args.dataset
        t_section = dict(cfg.get("teacher") or {})
        teacher_run = self.step("teacher", teacher.run, parameters.build(parameters.TeacherArgs, {**self.common, **t_section}))
        teacher_uri = registered_uri(teacher_run)

        d_section = dict(cfg.get("distill") or {})
        students = d_section.pop("students", None) or load_catalog(cfg.get("catalog"))["students"]
        baseline = d_section.pop("baseline", True)
        seeds = d_section.pop("seeds", None) or [d_section.get("seed", parameters.TrainConfig.seed)]
        record = {"teacher": teacher_run.info.run_id, "students": {}}
        student_runs, models = {}, [teacher_uri]
        for student in students:
            runs = self.distill_student(student, d_section, seeds, baseline, teacher_uri)
            selected = select_seed(runs["kd"]) if len(seeds) > 1 else runs["kd"][0]
            student_runs[student] = selected
            models.append(registered_uri(selected))
            record["students"][student] = {**{kind: [r.info.run_id for r in found] for kind, found in runs.items()},
                                           "selected": selected.info.run_id}

        q_section, margin = cfg.get("quantize") or {}, (cfg.get("promote") or {}).get("margin", 1.0)
        promotions = {}
        for student, kd in student_runs.items():
            parent = registered_uri(kd)
            q = self.step(f"quantize-{student}", quantize.run, parameters.QuantizeArgs(
                model=parent, dataset=dataset, data_dir=self.args.data_dir,
                max_eval_samples=self.common.get("max_eval_samples"), **q_section), parent)
            record["students"][student]["quantize"] = q.info.run_id
            name, version = q.data.tags["registered_model"], q.data.tags["registered_version"]
            models.append(f"models:/{name}/{version}")
            try:  # a step like the others: a re-run reuses the recorded decision
                self.step(f"promote-{student}", promote.run, parameters.PromoteArgs(
                    name=name, version=version, alias="champion", margin=margin), f"{name}/{version}")
            except UserError as refusal:  # a refused gate is an outcome to record, not a pipeline failure
                log.warning("[pipeline] promote %s v%s: %s", name, version, refusal)
                mlflow.set_tag(refusal_tag(student), "refused")
                promotions[student] = "refused"

        b_section = cfg.get("benchmark") or {}
        bench = self.step("benchmark", benchmark.run, parameters.BenchmarkArgs(
            dataset=dataset, data_dir=self.args.data_dir, models=",".join(models), **b_section), ",".join(models))
        record["benchmark"] = bench.info.run_id
        mlflow.set_tag("reused_steps", ",".join(self.reused) or "none")
        mlflow.log_dict(self.step_runs, "pipeline_steps.json")
        mlflow.log_dict(record, "pipeline_record.json")
        # the data the steps read, on the parent too: the UI's Datasets of the run a user opens first
        client = mlflow.MlflowClient()
        client.log_inputs(mlflow.active_run().info.run_id,
                          datasets=list(client.get_run(record["teacher"]).inputs.dataset_inputs))
        tracking.describe_run(results.pipeline_summary(record, dataset, promotions))
        return {"models": models, "reused": self.reused}


def run(args: PipelineArgs) -> dict:
    """Run the configured pipeline for one dataset under a parent run `pipeline-<config>-<dataset>`."""
    config = load_config(args.config, args.dataset)
    tracking.configure()
    tracking.use_experiment(args.dataset)
    name = f"pipeline-{Path(args.config).stem}-{args.dataset}"
    with tracking.step_run("pipeline", name):
        tracking.log_params({"config": args.config, "dataset": args.dataset, "code_version": code_version()})
        mlflow.log_dict(config, "pipeline_config.yaml")
        return Pipeline(config, args).run()
