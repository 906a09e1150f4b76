"""MLflow: where runs go, how a step's run ends, and the registry (register, alias, look up).

Tracking store: $MLFLOW_TRACKING_URI when set (e.g. a team's `mlflow server`); otherwise the
embedded default `sqlite:///mlflow.db` with artifacts under `./mlruns` (MLflow's own default, so
runs that `mlflow run` starts in an experiment it creates land in the same place), both in the working
directory. Runs live in one experiment per dataset, `kd-sentiment/<dataset>`, so a pipeline's
steps can be child runs of one parent; each run is tagged with its step.

A step's run ends FINISHED only when the step returns; an exception marks it FAILED, Ctrl-C or
SIGTERM KILLED. Registration is the last thing a step does and is undone if any part of it fails,
so a failed run never leaves a half-made version behind.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kd_sentiment.core.errors import UserError
from kd_sentiment.core.machine import machine_tags

log = logging.getLogger(__name__)

# The MLflow UI opens an experiment of this kind on its runs, not on the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The tags this project's runs are found by: every step's run has STEP_TAG; a pipeline's steps
# STEP_KEY_TAG (their reuse key); a study's runs STUDY_TAG and VARIANT_TAG.
STEP_TAG, STEP_KEY_TAG = "kd_sentiment.step", "kd_sentiment.step_key"
STUDY_TAG, VARIANT_TAG = "kd_sentiment.study", "teacher_variant"
MODEL_PREFIX = "kd-sentiment"  # every registered model of the project: kd-sentiment-<what>-<dataset>[-...]
LIBRARIES = ("torch", "transformers", "accelerate", "mlflow", "datasets", "onnxruntime", "openvino", "optimum",
             "optimum-onnx")
# Explicit requirements for logged models: inference alone would also pull in torchvision.
MODEL_PIP_REQUIREMENTS = [f"{lib}=={version(lib)}" for lib in ("mlflow", "torch", "transformers", "tokenizers")] + \
    [f"{lib}=={version(lib)}" for lib in ("numpy", "pandas")]


def embedded_uri() -> str:
    """`sqlite:///mlflow.db` of the working directory, as an absolute path: MLflow caches stores by
    URI string, so a relative URI would keep pointing at the first directory it was opened in."""
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def configure() -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, else at the embedded sqlite store. Returns the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()
    mlflow.set_tracking_uri(uri)
    log.debug("tracking store: %s", uri)
    return uri


def use_experiment(dataset: str) -> str:
    """Select (creating if needed) the experiment `kd-sentiment/<dataset>`; returns its id.

    Inside `mlflow run`, the run already exists in the experiment `mlflow run` chose; keep it.
    Either way the experiment is marked as model development (EXPERIMENT_KIND).
    """
    if os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment_id = (os.environ.get("MLFLOW_EXPERIMENT_ID")
                         or mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
        MlflowClient().set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        return experiment_id
    name = f"kd-sentiment/{dataset}"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:  # the store's default artifact root: ./mlruns beside the embedded store
        experiment_id = mlflow.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made by an older version, or by hand
            MlflowClient().set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    # set_experiment exports MLFLOW_EXPERIMENT_ID, which would pin every later step of this process
    # (and its subprocesses) to this experiment, as if inside `mlflow run`; MLflow keeps it in memory.
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return experiment_id


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# Tags the step runs started inside `step_tags(...)` get, e.g. the pipeline's reuse key.
_STEP_TAGS: ContextVar[dict[str, str]] = ContextVar("step_tags", default={})


@contextmanager
def step_tags(tags: dict[str, str]):
    """Every step run started inside this block also gets `tags` (the pipeline's reuse key, a
    study's variant), without the step's code knowing about them."""
    token = _STEP_TAGS.set({**_STEP_TAGS.get(), **tags})
    try:
        yield
    finally:
        _STEP_TAGS.reset(token)


def registered_name(*parts: str) -> str:
    """A registered model name of this project: `kd-sentiment-<part>-<part>...`."""
    return "-".join([MODEL_PREFIX, *parts])


def find_runs(step: str | None = None, tags: dict | None = None, params: dict | None = None,
              finished: bool = True, oldest_first: bool = False, max_results: int | None = None) -> list:
    """Runs of every experiment with the given step, tags and params (and FINISHED, by default),
    newest first unless `oldest_first`: the one way this project looks runs up."""
    clauses = [f"tags.`{STEP_TAG}` = '{step}'"] if step else []
    clauses += [f"tags.`{key}` = '{value}'" for key, value in (tags or {}).items()]
    clauses += [f"params.`{key}` = '{value}'" for key, value in (params or {}).items()]
    if finished:
        clauses.append("attributes.status = 'FINISHED'")
    return mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=" and ".join(clauses),
                              order_by=[f"attributes.start_time {'ASC' if oldest_first else 'DESC'}"],
                              **({"max_results": max_results} if max_results else {}))


@contextmanager
def step_run(step: str, run_name: str, run_id: str | None = None, nested: bool = False, active: bool = True):
    """Start (or, with run_id, continue) the step's run and end it with the right status.

    A step started while another run is active (a pipeline's parent run) becomes its child.
    `active=False` (non-main processes of a multi-process job) yields None and logs nothing.
    """
    if not active:
        yield None
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                           nested=nested or mlflow.active_run() is not None,
                           tags={STEP_TAG: step, **_STEP_TAGS.get()})
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous)


def log_params(params: dict) -> None:
    """Log params not yet on the active run. `mlflow run` has already logged its -P values (as
    typed), and a resumed run has its params from the first attempt; MLflow forbids changing them."""
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_environment(threads: int | None = None, device: str | None = None) -> None:
    """Tags for reproducing the run: code version, library versions, the machine (`machine.*`: CPU
    features, threads, GPU) and the device the step's models run on."""
    tags = {"git_commit": git_commit(), **machine_tags(threads)}
    tags.update({f"version.{lib}": version(lib) for lib in LIBRARIES})
    if device is not None:
        tags["device"] = device
    mlflow.set_tags(tags)


def log_texts(frame, name: str, source: str | None, context: str, run_id: str | None = None) -> None:
    """`frame` (a `text` column, and `label` where labelled) as an `mlflow.data` input of `run_id` or
    the active run, in `context` (train, validation, test, calibration, transfer, ...): the UI's
    Datasets. `source`: the data's file or folder (None: not known where the texts were read)."""
    from mlflow.entities import DatasetInput, InputTag

    targets = "label" if "label" in frame.columns else None
    # Silenced: a local path "can be interpreted in multiple ways" (it is a path) and the integer
    # label column "cannot represent missing values" (labels are validated, never missing).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, name=name, targets=targets, **({"source": source} if source else {}))
        if run_id is None:
            mlflow.log_input(dataset, context=context)
        else:
            MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                                     tags=[InputTag("mlflow.data.context", context)])])


def log_splits(splits) -> None:
    """Dataset name, source and sizes as params, each split as an `mlflow.data` input."""
    log_params({"dataset": splits.name, "data_source": splits.source, "selection_metric": splits.selection_metric,
                       **{f"n_{split}": n for split, n in splits.sizes().items()}})
    mlflow.log_metrics({f"data_{k}": v for k, v in splits.duplicates.items()})
    for split, size in splits.sizes().items():
        log_texts(splits.split(split)[["text", "label"]], f"{splits.name}-{split}-{size}", splits.source, split)


def log_transfer(transfer, dataset: str, n_labelled: int) -> None:
    """A transfer set as params (source, size, fingerprint, its share of the training pool), its
    drop counts as `transfer_*` metrics, and its texts as an `mlflow.data` input, context `transfer`."""
    import pandas as pd

    log_params({"transfer_source": transfer.source, "n_transfer": len(transfer.texts),
                "transfer_fingerprint": transfer.fingerprint,
                "transfer_fraction": round(len(transfer.texts) / (len(transfer.texts) + n_labelled), 4)})
    mlflow.log_metrics({f"transfer_{k}": v for k, v in transfer.counts.items()})
    log_texts(pd.DataFrame({"text": transfer.texts}), f"{dataset}-transfer-{len(transfer.texts)}", transfer.source,
              "transfer")


def describe_run(markdown: str) -> None:
    """The active run's description: the Markdown the MLflow UI shows at the top of its page."""
    mlflow.set_tag("mlflow.note.content", markdown)


def log_array(array, artifact_path: str, run_id: str | None = None) -> None:
    """Save a numpy array as the artifact `artifact_path` (e.g. predictions/test_logits.npy) of
    `run_id`, or of the active run."""
    import tempfile

    import numpy as np

    folder, _, name = artifact_path.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / name, array)
        if run_id is None:
            mlflow.log_artifact(str(Path(tmp) / name), folder or None)
        else:
            mlflow.MlflowClient().log_artifact(run_id, str(Path(tmp) / name), folder or None)


def load_array(run_id: str, artifact_path: str):
    """A numpy array a run logged (`log_array`, or the soft-target cache)."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        return np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp))


def log_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- registry

def register(model_uri: str, name: str, alias: str | None, tags: dict | None = None, description: str = "",
             model_description: str = "") -> ModelVersion:
    """Register `model_uri` as a new version of `name` with `description`, tag it, point `alias` at
    it; `model_description` says what the registered model's versions are (set while it has none).

    All or nothing: if tagging or aliasing fails the version is deleted again (and the registered
    model too, if no other version is left in it).
    """
    client = MlflowClient()
    try:  # create-then-tolerate, not get-then-create: two steps may register the same new name at once
        client.create_registered_model(name, description=model_description or None)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if model_description and not client.get_registered_model(name).description:  # made by an older version
            client.update_registered_model(name, description=model_description)
    model_version = None
    try:
        run_id = mlflow.active_run().info.run_id if mlflow.active_run() else None
        # A logged model's URI (models:/m-...) must also be passed as model_id: a tracking server
        # rejects it as a plain source.
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        model_version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags or {},
                                                    model_id=model_id, description=description or None)
        if alias:
            client.set_registered_model_alias(name, alias, model_version.version)
        return model_version
    except BaseException:
        if model_version is not None:
            client.delete_model_version(name, model_version.version)
        if not client.search_model_versions(f"name='{name}'"):  # nobody else's versions: remove the empty name
            client.delete_registered_model(name)
        raise


def resolve_version(model_uri: str, needed_by: str = "") -> ModelVersion:
    """The registry version behind `models:/NAME@ALIAS` or `models:/NAME/VERSION`, or a clear error."""
    if not model_uri.startswith("models:/"):
        raise UserError(f"'{model_uri}' is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION.")
    ref = model_uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, number = ref.rpartition("/")
        return client.get_model_version(name, number)
    except MlflowException as err:
        hint = f" {needed_by}" if needed_by else ""
        raise UserError(f"'{model_uri}' is not in the model registry at {mlflow.get_tracking_uri()} "
                        f"({err.message.splitlines()[0]}).{hint}") from None


def log_classifier(model, tokenizer, input_example: list[str], max_length: int) -> str:
    """Log a fine-tuned classifier as an `mlflow.transformers` text-classification pipeline
    (signature inferred from a real prediction on `input_example`); returns the model URI.

    The pipeline truncates to `max_length` tokens, the length the model was trained at, so long
    inputs (a whole review) are answered instead of overflowing the position embeddings.
    """
    from transformers import pipeline

    inference = {"truncation": True, "max_length": max_length}
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1)
    signature = mlflow.models.infer_signature(input_example, classifier(input_example, **inference))
    info = mlflow.transformers.log_model(classifier, name="model", task="text-classification",
                                         signature=signature, input_example=input_example, model_config=inference,
                                         pip_requirements=MODEL_PIP_REQUIREMENTS)
    return info.model_uri


def load_registered_classifier(model_uri: str):
    """(model, tokenizer) of a registered `mlflow.transformers` classifier, in eval mode on CPU."""
    components = mlflow.transformers.load_model(model_uri, return_type="components", device=-1)
    model = components["model"].to("cpu")  # device=-1 is advice MLflow may drop for this pipeline type
    model.eval()
    return model, components["tokenizer"]
