"""On a CUDA GPU: prediction, training, resume, evaluation and the teacher's pass run on the GPU.

Skipped without CUDA (CI has none; scripts/gpu_check.sh runs these on a GPU machine). They need only
torch, transformers and accelerate, and build their data and a tiny model on the fly, so they run
where neither MLflow nor ../shared/data is present; the two that exercise MLflow-backed code skip
where MLflow is missing.
"""
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from conftest import make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LABELS = ["negative", "positive"]
GOOD, BAD = ["good", "great", "lovely", "fine", "superb"], ["bad", "awful", "dull", "poor", "boring"]


def texts_and_labels(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Short synthetic reviews whose label is told by their sentiment words: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    texts = [" ".join(rng.choice(GOOD if y else BAD, 3)) + " film " + " ".join(rng.choice(["a", "the", "it"], 2))
             for y in labels]
    return texts, labels


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny BERT classifier with its (random) head saved, so every load is the same model."""
    from kd_sentiment.core.models import load_classifier

    texts, _ = texts_and_labels(400, 0)
    encoder = make_tiny_model(tmp_path_factory.mktemp("tiny-gpu"), texts)
    model, tokenizer = load_classifier(str(encoder), LABELS)
    folder = tmp_path_factory.mktemp("tiny-gpu-classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test makes its own Accelerator (bf16 on the GPU, or --cpu); accelerate keeps one state
    per process, so forget the previous test's."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def classifier(folder):
    from kd_sentiment.core.models import load_classifier

    return load_classifier(str(folder), LABELS)


def test_predict_logits_runs_on_the_gpu_under_bf16_and_returns_float32(tiny_folder):
    from kd_sentiment.training.loop import predict_logits

    texts, _ = texts_and_labels(50, 1)
    model, tokenizer = classifier(tiny_folder)
    reference = predict_logits(model, tokenizer, texts, 32, 16)  # no accelerator: where it is, the CPU, fp32
    accelerator = Accelerator(mixed_precision="bf16")
    assert accelerator.device.type == "cuda"
    logits = predict_logits(model, tokenizer, texts, 32, 16, accelerator)
    assert next(model.parameters()).device.type == "cuda"
    assert logits.dtype == np.float32 and logits.shape == (50, 2)
    np.testing.assert_allclose(logits, reference, atol=0.05)  # bf16 matmuls, same model


def test_cpu_flag_keeps_everything_on_the_cpu(tiny_folder):
    from kd_sentiment.training.loop import predict_logits

    texts, _ = texts_and_labels(10, 2)
    model, tokenizer = classifier(tiny_folder)
    accelerator = Accelerator(cpu=True)
    predict_logits(model, tokenizer, texts, 32, 16, accelerator)
    assert accelerator.device.type == "cpu" and next(model.parameters()).device.type == "cpu"


def test_train_resume_and_temperature_fit_on_the_gpu(tiny_folder, tmp_path):
    """A run interrupted after a checkpoint resumes onto the GPU and ends where an uninterrupted run
    does; evaluation and temperature scaling work from its logits."""
    from kd_sentiment.core.metrics import evaluate_with_temperature
    from kd_sentiment.training.loop import Checkpoints, TrainConfig, TrainData, predict_logits, train

    train_texts, train_labels = texts_and_labels(256, 3)
    val_texts, val_labels = texts_and_labels(64, 4)
    config = TrainConfig(epochs=2, batch_size=16, lr=2e-3, max_length=32, checkpoint_every=4, seed=0,
                         mixed_precision="bf16")

    def fit(output_dir, resume=False, log_metrics=lambda metrics, step: None):
        model, tokenizer = classifier(tiny_folder)
        accelerator = Accelerator(mixed_precision="bf16")
        data = TrainData(train_texts, train_labels, val_texts, val_labels, LABELS, "accuracy")
        result = train(model, tokenizer, data, config, accelerator, Checkpoints(output_dir, resume), log_metrics)
        return result, tokenizer, accelerator

    reference, tokenizer, accelerator = fit(tmp_path / "reference")
    assert next(reference.model.parameters()).device.type == "cuda"

    class Crash(Exception):
        pass

    def crash_at_step_6(metrics, step):
        if step == 6:  # after the checkpoint at step 4, before the one at step 8
            raise Crash

    with pytest.raises(Crash):
        fit(tmp_path / "run", log_metrics=crash_at_step_6)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed, tokenizer, accelerator = fit(tmp_path / "run", resume=True)
    assert resumed.resumed_from_step == 4
    assert next(resumed.model.parameters()).device.type == "cuda"
    assert resumed.best_metric == pytest.approx(reference.best_metric, abs=0.05)  # GPU kernels are not bit-exact

    val_logits = predict_logits(resumed.model, tokenizer, val_texts, 32, 32, accelerator)
    metrics = evaluate_with_temperature(val_logits, val_labels, val_logits, val_labels, LABELS)
    assert metrics["temperature"] > 0 and 0 <= metrics["test_ece_after_ts"] <= 1


def test_teacher_pass_runs_on_the_gpu_and_frees_its_memory(tiny_folder, monkeypatch):
    """soft_targets.teacher_logits: the registered teacher (loaded on the CPU) runs on the GPU and is
    gone from GPU memory before it returns. The MLflow cache is replaced by an empty one."""
    pytest.importorskip("mlflow")
    from types import SimpleNamespace

    from kd_sentiment.training import soft_targets
    from kd_sentiment.core import tracking

    texts, _ = texts_and_labels(64, 5)
    seen = []

    def load(uri):
        model, tokenizer = classifier(tiny_folder)
        real_forward = model.forward
        model.forward = lambda **inputs: seen.append(inputs["input_ids"].device) or real_forward(**inputs)
        return model, tokenizer

    monkeypatch.setattr(tracking, "load_registered_classifier", load)
    monkeypatch.setattr(soft_targets, "find_cache_run", lambda *args: None)
    monkeypatch.setattr(soft_targets, "store_entries", lambda *args: "cache-run")
    accelerator = Accelerator(mixed_precision="bf16")
    version = SimpleNamespace(name="teacher", version="1", run_id="r")

    def teacher_pass():
        return soft_targets.teacher_logits(version, "models:/teacher/1", {"train": texts}, 32, 16, accelerator, "0")

    teacher_pass()  # the first pass also leaves CUDA's own lasting allocations (cuBLAS workspaces)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    arrays, hit, _ = teacher_pass()
    assert not hit and arrays["train"].dtype == np.float32 and arrays["train"].shape == (64, 2)
    assert seen and {d.type for d in seen} == {"cuda"}
    assert torch.cuda.max_memory_allocated() > before  # the teacher was on the GPU ...
    assert torch.cuda.memory_allocated() == before     # ... and is gone from it


def test_benchmark_measures_pytorch_on_the_gpu_in_fp32_and_bf16(tiny_folder, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from kd_sentiment.measure import benchmark
    from kd_sentiment.core import tracking
    from kd_sentiment.core.machine import gpu_facts

    assert benchmark.torch_backends() == ["torch_fp32", "torch_cuda_fp32", "torch_cuda_bf16"]
    facts = gpu_facts()
    assert facts["gpu_name"] and facts["cuda_version"] != "unknown" and facts["gpu_driver"]

    monkeypatch.setattr(tracking, "load_registered_classifier", lambda uri: classifier(tiny_folder))
    texts, _ = texts_and_labels(32, 6)
    outputs = {}
    for backend in ("torch_fp32", "torch_cuda_fp32", "torch_cuda_bf16"):
        predict, tokenizer, size_mb, parameters = benchmark.load_backend({"backend": backend, "uri": "models:/m/1"},
                                                                         2, tmp_path)
        encoded = dict(tokenizer(texts, padding=True, return_tensors="np"))
        outputs[backend] = predict(encoded)
        timing = benchmark.time_setting(predict, tokenizer, texts, 8, True, 32, 0.5, 5, 20)
        assert timing["batches"] >= 5 and timing["model_p50_ms"] > 0
    np.testing.assert_allclose(outputs["torch_cuda_fp32"], outputs["torch_fp32"], atol=1e-3)
    np.testing.assert_allclose(outputs["torch_cuda_bf16"], outputs["torch_fp32"], atol=0.05)
    assert outputs["torch_cuda_bf16"].dtype == np.float32
