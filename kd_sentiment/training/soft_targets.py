"""The teacher's logits ("soft targets"), computed once and cached in MLflow.

Distilling several students, or sweeping temperature and alpha, reuses one teacher pass. The cache
is a dedicated MLflow run per (teacher version, max_length, mixed precision of the teacher pass), tagged
`kd_sentiment.soft_targets_for`,
holding one `soft_targets/<split>-<fingerprint>.npy` per distinct set of texts (the fingerprint is
a hash of the texts, so a different subset or dataset never hits a stale entry). The teacher's
model version gets a tag `soft_targets_run_id` pointing at it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kd_sentiment.core.data import fingerprint
from kd_sentiment.core.tracking import STEP_TAG, find_runs, load_array, log_array, log_texts
from kd_sentiment.training.loop import predict_logits

log = logging.getLogger(__name__)

CACHE_TAG = "kd_sentiment.soft_targets_for"


def cache_key(version, max_length: int, precision: str = "no") -> str:
    # The source run id guards against a deleted and re-created model reusing a version number; the
    # precision keeps a bf16/fp16 teacher pass apart from an fp32 one (fp32 keys are as before).
    precision = "" if precision == "no" else f"/mixed_precision={precision}"
    return f"{version.name}/{version.version}/{version.run_id}/max_length={max_length}{precision}"


def find_cache_run(version, max_length: int, precision: str = "no") -> str | None:
    runs = find_runs(tags={CACHE_TAG: cache_key(version, max_length, precision)}, finished=False, max_results=1)
    return runs[0].info.run_id if runs else None


def cached_entries(run_id: str | None) -> set[str]:
    if run_id is None:
        return set()
    return {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, "soft_targets")}


def store_entries(version, max_length: int, run_id: str | None, experiment_id: str, arrays: dict[str, np.ndarray],
                  precision: str = "no") -> str:
    """Add arrays to the cache run (created on first use); returns its run id."""
    client = MlflowClient()
    if run_id is None:
        run = client.create_run(experiment_id, run_name=f"soft-targets-{version.name}-v{version.version}",
                                tags={CACHE_TAG: cache_key(version, max_length, precision),
                                      STEP_TAG: "soft-targets", "teacher": f"{version.name}/{version.version}"})
        run_id = run.info.run_id
        client.log_param(run_id, "max_length", max_length)
        client.log_param(run_id, "mixed_precision", precision)
        client.set_terminated(run_id, "FINISHED")
        try:
            client.set_model_version_tag(version.name, version.version, "soft_targets_run_id", run_id)
        except MlflowException:
            # Two students that start at once both miss the cache and both tag the teacher; a tracking
            # server's select-then-insert can then fail the second insert of the same key (seen on
            # PostgreSQL). Only then, with the other's tag in place, is it written again (an update of
            # that row; either cache run is valid): any other failure is raised.
            if "soft_targets_run_id" not in client.get_model_version(version.name, version.version).tags:
                raise
            client.set_model_version_tag(version.name, version.version, "soft_targets_run_id", run_id)
    for name, array in arrays.items():
        log_array(array, f"soft_targets/{name}", run_id)
    return run_id


def teacher_logits(version, model_uri: str, texts_by_split: dict, max_length: int, batch_size: int,
                   accelerator, experiment_id: str) -> tuple[dict[str, np.ndarray], bool, str]:
    """Logits of the registered teacher for each split's texts: (arrays, cache_hit, cache_run_id).

    Only on a miss is the teacher loaded; it runs on the accelerator's device under its mixed
    precision (the logits are stored as float32) and is released, with the device's cached memory,
    before returning, so the student trains without the teacher in memory. Every process gets the
    same arrays; the main one talks to MLflow.
    """
    from accelerate.utils import broadcast_object_list
    from accelerate.utils.memory import clear_device_cache

    from kd_sentiment.core.tracking import load_registered_classifier

    names = {split: f"{split}-{fingerprint(texts)}.npy" for split, texts in texts_by_split.items()}
    found = [None, set()]
    if accelerator.is_main_process:
        run_id = find_cache_run(version, max_length, accelerator.mixed_precision)
        found = [run_id, cached_entries(run_id)]
    broadcast_object_list(found)
    run_id, present = found
    missing = [split for split, name in names.items() if name not in present]
    log.debug("soft targets: cache run %s, computing %s, cached %s", run_id, missing,
              [split for split in names if split not in missing])

    arrays = {}
    if missing:
        model, tokenizer = load_registered_classifier(model_uri)  # on the CPU; predict_logits moves it
        for split in missing:
            arrays[split] = predict_logits(model, tokenizer, texts_by_split[split], max_length, batch_size, accelerator)
        del model
        clear_device_cache(garbage_collection=True)  # the student trains without the teacher's memory
        if accelerator.is_main_process:
            run_id = store_entries(version, max_length, run_id, experiment_id,
                                   {names[s]: arrays[s] for s in missing}, accelerator.mixed_precision)
            for split in missing:  # the texts the teacher labelled, on the cache run
                log_texts(pd.DataFrame({"text": list(texts_by_split[split])}), names[split].removesuffix(".npy"), None,
                          split, run_id)
    # Cached splits are read from the store by every process (local file copies; cheap).
    for split in texts_by_split:
        if split not in arrays:
            arrays[split] = load_array(run_id, f"soft_targets/{names[split]}")
    return arrays, not missing, run_id
