"""Every model runs on the device its step's accelerator chose, checked on a CPU-only machine.

A GPU is not needed to catch a model left on one device while its inputs go to another: an
accelerator whose device is PyTorch's `meta` device stands in for the GPU, and the model's forward
is replaced by one that fails when an input is not where the model's weights are. The replacement
computes nothing (a meta tensor holds no values): it returns zero logits on the CPU, so the code
around it runs to the end. tests/test_gpu.py runs the real thing on CUDA.
"""
import shutil

import mlflow
import numpy as np
import torch
from accelerate import Accelerator
from transformers.modeling_outputs import SequenceClassifierOutput

from kd_sentiment.training import soft_targets
from kd_sentiment.core import tracking
from kd_sentiment.core.models import load_classifier
from kd_sentiment.training.loop import predict_logits

TEXTS = ["a fine film", "dull and far too long", "not bad at all", "I left early", "great cast, weak plot"]


class MetaAccelerator(Accelerator):
    """A single-process CPU accelerator that reports the meta device as the one to run on."""

    @property
    def device(self):
        return torch.device("meta")


def placement_checked(model):
    """`model` with a forward that raises unless every input tensor is on its weights' device; the
    devices it saw are recorded in `model.seen_devices`."""
    model.seen_devices = []

    def forward(input_ids=None, attention_mask=None, **inputs):
        weights = next(model.parameters()).device
        for name, value in {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}.items():
            if isinstance(value, torch.Tensor) and value.device != weights:
                raise RuntimeError(f"{name} on {value.device}, model weights on {weights}")
        model.seen_devices.append(weights)
        return SequenceClassifierOutput(logits=torch.zeros(input_ids.shape[0], model.config.num_labels))

    model.forward = forward
    return model


def test_predict_logits_runs_the_model_where_the_accelerator_says(tiny_model):
    model, tokenizer = load_classifier(str(tiny_model), ["negative", "positive"])
    model = placement_checked(model)
    logits = predict_logits(model, tokenizer, TEXTS, max_length=32, batch_size=2, accelerator=MetaAccelerator(cpu=True))
    assert logits.shape == (len(TEXTS), 2) and logits.dtype == np.float32
    assert model.seen_devices and set(model.seen_devices) == {torch.device("meta")}
    assert next(model.parameters()).device == torch.device("meta")


def test_without_an_accelerator_the_model_stays_where_it_is(tiny_model):
    model, tokenizer = load_classifier(str(tiny_model), ["negative", "positive"])
    model = placement_checked(model)
    predict_logits(model, tokenizer, TEXTS, max_length=32, batch_size=2)
    assert set(model.seen_devices) == {torch.device("cpu")}


def test_soft_targets_run_the_registered_teacher_on_the_accelerators_device(teacher_home, tmp_path, monkeypatch):
    """The teacher loaded from the registry (on the CPU) is moved to the step's device for its pass."""
    home, _ = teacher_home
    shutil.copy(home / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the cache run written here stays here
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    uri = "models:/kd-sentiment-teacher-imdb@champion"
    version = tracking.resolve_version(uri)
    loaded = []
    real_load = tracking.load_registered_classifier

    def load(model_uri):
        model, tokenizer = real_load(model_uri)
        loaded.append(placement_checked(model))
        return model, tokenizer

    monkeypatch.setattr(tracking, "load_registered_classifier", load)
    experiment = mlflow.get_experiment_by_name("kd-sentiment/imdb").experiment_id
    arrays, hit, _ = soft_targets.teacher_logits(version, uri, {"train": TEXTS}, 32, 2, MetaAccelerator(cpu=True),
                                                 experiment)
    assert not hit and arrays["train"].shape == (len(TEXTS), 2) and arrays["train"].dtype == np.float32
    assert set(loaded[0].seen_devices) == {torch.device("meta")}
