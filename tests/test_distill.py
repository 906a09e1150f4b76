import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from kd_sentiment.training import distill
from kd_sentiment.core import tracking
from kd_sentiment.core.errors import UserError

from conftest import run_cli, tiny_train_config


def distill_args(student, **overrides):
    train = tiny_train_config(epochs=2, alpha=overrides.pop("alpha", 0.7), temperature=2.0)
    # 1,500 reviews: a student cut from the tiny *pre-trained* (random) encoder needs them to beat the majority class.
    return distill.DistillArgs(student=str(student), dataset="imdb", validation_size=300, max_train_samples=1500,
                               max_eval_samples=300, train=train, **overrides)


@pytest.fixture
def in_teacher_home(teacher_home, monkeypatch):
    home, metrics = teacher_home
    monkeypatch.chdir(home)
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    return home, metrics


def test_students_from_registry_share_cached_soft_targets(in_teacher_home, tiny_model, monkeypatch):
    home, teacher_metrics = in_teacher_home
    # First student: cut from the teacher (1 of its 2 layers).
    first = distill.run(distill_args("teacher-layers:1"))["teacher-layers:1"]
    # Second student: the teacher must not be loaded again: its logits come from the cache.
    loads = []
    real_load = tracking.load_registered_classifier
    monkeypatch.setattr(tracking, "load_registered_classifier", lambda uri: loads.append(uri) or real_load(uri))
    second = distill.run(distill_args(tiny_model, name="kd-sentiment-fresh-imdb"))[str(tiny_model)]
    assert loads == []

    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                                                           filter_string="tags.`kd_sentiment.step` = 'distill'")}
    cut = runs["distill-cut-l1-a0.7-T2"]
    assert cut.data.metrics["soft_targets_cache_hit"] == 0
    fresh = [r for name, r in runs.items() if name != "distill-cut-l1-a0.7-T2"][0]
    assert fresh.data.metrics["soft_targets_cache_hit"] == 1
    for metrics in (first, second):
        assert 0 <= metrics["test_agreement_with_teacher"] <= 1 and metrics["test_kl_teacher_student"] >= 0
        assert metrics["teacher_test_accuracy"] == pytest.approx(teacher_metrics["test_accuracy"], abs=1e-9)
        assert metrics["retention_accuracy"] == pytest.approx(metrics["test_accuracy"] / metrics["teacher_test_accuracy"])
        assert metrics["parameters"] > 0 and metrics["flops_per_example"] > 0
    # The cut student keeps the teacher's width with half the layers.
    assert first["parameters"] < teacher_metrics["parameters"]

    client = MlflowClient()
    version = client.get_model_version_by_alias("kd-sentiment-cut-l1-imdb", "champion")
    assert version.tags["teacher"] == "kd-sentiment-teacher-imdb/1"
    teacher_version = client.get_model_version("kd-sentiment-teacher-imdb", "1")
    assert teacher_version.tags["soft_targets_run_id"] == cut.data.tags["soft_targets_run_id"]
    assert client.get_model_version_by_alias("kd-sentiment-fresh-imdb", "champion").tags["alpha"] == "0.7"


def test_alpha_zero_baseline_never_uses_teacher_for_training(in_teacher_home, tiny_model, monkeypatch):
    from kd_sentiment.training import loop, losses

    seen = []  # the teacher logits every training batch's loss was given

    def spy(student_logits, labels, teacher_logits, *rest, **kwargs):
        seen.append(teacher_logits)
        return losses.distillation_loss(student_logits, labels, teacher_logits, *rest, **kwargs)

    monkeypatch.setattr(loop, "distillation_loss", spy)
    metrics = distill.run(distill_args(tiny_model, alpha=0.0, name="kd-sentiment-baseline-imdb", alias=""))
    assert seen and all(t is None for t in seen)  # no soft target reached any batch's loss
    (baseline,) = metrics.values()
    assert "test_agreement_with_teacher" in baseline  # compared with the teacher, never trained on it
    assert MlflowClient().get_registered_model("kd-sentiment-baseline-imdb").aliases == {}


def test_a_bf16_student_after_an_fp32_teacher_in_one_process(in_teacher_home, tiny_model):
    """The pipeline runs every step in one process: a student in bf16 mixed precision after the fp32
    teacher (trained in this process by the fixture) trains and evaluates in bf16 on the CPU, where
    accelerate's one state per process would otherwise refuse it."""
    from dataclasses import replace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="no")  # the state an fp32 teacher's step leaves in the process
    args = distill_args(tiny_model, alpha=0.5, name="kd-sentiment-bf16-imdb", alias="", cpu=True)
    try:
        metrics = distill.run(replace(args, train=replace(args.train, epochs=1, mixed_precision="bf16")))
        assert AcceleratorState().mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state()  # later tests' Accelerator(cpu=True) must not inherit bf16
    (student,) = metrics.values()
    assert "test_accuracy" in student  # trained and evaluated
    assert tracking.find_runs("distill")[0].data.params["mixed_precision"] == "bf16"


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16": False, "amx": False}, "no"),
                                             ({"avx512_bf16": True, "amx": False}, "bf16"),
                                             ({"avx512_bf16": False, "amx": True}, "bf16")])
def test_auto_mixed_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    from kd_sentiment.core import machine

    monkeypatch.setattr(machine, "cpu_features", lambda: {"model_name": "test cpu", **flags})
    assert machine.native_mixed_precision(on_gpu=False) == expected


def test_a_student_trained_with_auto_mixed_precision_logs_what_it_trained_in(in_teacher_home, tiny_model,
                                                                              monkeypatch):
    """On a CPU without native bf16 (emulated bf16 trained 3x slower than fp32), auto trains in fp32
    and the run's param says so, not "auto"."""
    from dataclasses import replace

    from kd_sentiment.core import machine

    monkeypatch.setattr(machine, "cpu_features", lambda: {"model_name": "test cpu", "avx512_bf16": False, "amx": False})
    args = distill_args(tiny_model, alpha=0.5, name="kd-sentiment-auto-imdb", alias="", cpu=True)
    distill.run(replace(args, train=replace(args.train, epochs=1, mixed_precision="auto")))
    assert tracking.find_runs("distill")[0].data.params["mixed_precision"] == "no"


def test_missing_teacher_alias_is_a_clear_error_and_registers_nothing(in_teacher_home, tiny_model):
    before = {m.name for m in MlflowClient().search_registered_models()}
    out = run_cli("distill", "--student", str(tiny_model), "--dataset", "imdb", "--teacher",
                  "models:/kd-sentiment-teacher-imdb@nosuchalias", "--max_train_samples", "100",
                  "--max_eval_samples", "50", cwd=in_teacher_home[0])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is not in the model registry" in out.stderr and "teacher step on dataset=imdb" in out.stderr
    assert {m.name for m in MlflowClient().search_registered_models()} == before


def test_teacher_with_other_labels_is_rejected(in_teacher_home, tiny_model):
    with pytest.raises(UserError, match=r"predicts \[negative,positive\] but the dataset has labels"):
        distill.run(distill.DistillArgs(student=str(tiny_model), dataset="tweeteval",
                                        teacher="models:/kd-sentiment-teacher-imdb@champion",
                                        max_train_samples=60, max_eval_samples=30, train=tiny_train_config()))


@pytest.mark.parametrize("raced", [True, False])
def test_soft_target_cache_survives_a_concurrent_tag_write(monkeypatch, raced):
    """Two students starting at once both tag the teacher version; a server may fail the second
    insert of the same key. store_entries writes the tag again instead of failing the student, only
    where the other's tag is there: any other failure is raised, not retried blindly."""
    from types import SimpleNamespace

    import numpy as np
    from mlflow.exceptions import MlflowException

    from kd_sentiment.training import soft_targets

    class RacingClient:
        tags, artifacts = [], []

        def create_run(self, experiment_id, run_name, tags):
            return SimpleNamespace(info=SimpleNamespace(run_id="cache-run"))

        def log_param(self, *args):
            pass

        def set_terminated(self, *args):
            pass

        def set_model_version_tag(self, name, version, key, value):
            if not self.tags:
                self.tags.append(None)
                raise MlflowException("duplicate key value violates unique constraint")
            self.tags.append((name, version, key, value))

        def get_model_version(self, name, version):
            return SimpleNamespace(tags={"soft_targets_run_id": "the-other-run"} if raced else {})

    RacingClient.tags, RacingClient.artifacts = [], []
    monkeypatch.setattr(soft_targets, "MlflowClient", RacingClient)
    monkeypatch.setattr(soft_targets, "log_array", lambda array, path, run_id: RacingClient.artifacts.append(
        (run_id, path)))
    version = SimpleNamespace(name="kd-sentiment-teacher-imdb", version="1", source="s", run_id="r")
    if not raced:  # the write failed for another reason: raised
        with pytest.raises(MlflowException, match="duplicate key"):
            soft_targets.store_entries(version, 64, None, "0", {"train-x.npy": np.zeros((2, 2))})
        return
    run_id = soft_targets.store_entries(version, 64, None, "0", {"train-x.npy": np.zeros((2, 2))})
    assert run_id == "cache-run"
    assert RacingClient.tags[-1] == ("kd-sentiment-teacher-imdb", "1", "soft_targets_run_id", "cache-run")
    assert RacingClient.artifacts == [("cache-run", "soft_targets/train-x.npy")]


def test_cut_students_start_from_the_teachers_pretrained_source(in_teacher_home, tiny_model, monkeypatch):
    """`teacher-layers:every-other` cuts the teacher's pre-trained source (tiny_model here, as
    DistilBERT cut BERT), not the fine-tuned teacher: the KD student and its alpha=0 twin start from
    identical weights, equal to that source's, and the alpha=0 run loads nothing of the teacher."""
    from kd_sentiment.core.models import load_classifier

    initial, teacher_loads = [], []
    real_build, real_load = distill.build_student, tracking.load_registered_classifier

    def recording_build(*args):
        model, tokenizer, init = real_build(*args)
        initial.append(({k: v.clone() for k, v in model.state_dict().items()}, init))
        return model, tokenizer, init

    monkeypatch.setattr(distill, "build_student", recording_build)
    distill.run(distill_args("teacher-layers:every-other", name="kd-sentiment-half-imdb", alias=""))
    monkeypatch.setattr(tracking, "load_registered_classifier", lambda uri: teacher_loads.append(uri) or real_load(uri))
    distill.run(distill_args("teacher-layers:every-other", alpha=0.0, name="kd-sentiment-half-imdb-nokd", alias=""))
    assert teacher_loads == []  # its test logits come from the KD run's cache; its weights from the source

    (kd, kd_init), (baseline, baseline_init) = initial
    assert kd_init == baseline_init and str(tiny_model) in kd_init and "pre-trained" in kd_init
    assert kd.keys() == baseline.keys() and all(torch.equal(kd[k], baseline[k]) for k in kd)
    source, _ = load_classifier(str(tiny_model), ["negative", "positive"], "every-other")
    finetuned, _ = real_load("models:/kd-sentiment-teacher-imdb@champion")
    encoder = [k for k in kd if k.startswith("bert.encoder.")]
    assert len({k.split(".")[3] for k in encoder}) == 1  # every other of the teacher's 2 layers: one
    assert all(torch.equal(kd[k], source.state_dict()[k]) for k in kd if k.startswith("bert."))
    assert not any(torch.equal(kd[k], finetuned.state_dict()[k]) for k in encoder if k.endswith("weight"))
    runs = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                              filter_string="params.registered_name LIKE 'kd-sentiment-half-imdb%'")
    assert {r.data.params["student_init"] for r in runs} == {kd_init}


def test_finetuned_teacher_cut_is_explicit_and_never_the_baseline(in_teacher_home, monkeypatch):
    """`finetuned-teacher-layers:` cuts the registered, fine-tuned teacher and says so; an alpha=0
    baseline that would start from it is refused."""
    first = []
    real_build = distill.build_student

    def recording_build(*args):
        model, tokenizer, init = real_build(*args)
        first.append(({k: v.clone() for k, v in model.state_dict().items()}, init))
        return model, tokenizer, init

    monkeypatch.setattr(distill, "build_student", recording_build)
    distill.run(distill_args("finetuned-teacher-layers:1", alias=""))
    state, init = first[0]
    assert "fine-tuned" in init and "models:/kd-sentiment-teacher-imdb" in init
    teacher, _ = tracking.load_registered_classifier("models:/kd-sentiment-teacher-imdb@champion")
    assert torch.equal(state["bert.encoder.layer.0.output.dense.weight"],
                       teacher.state_dict()["bert.encoder.layer.1.output.dense.weight"])
    with pytest.raises(UserError, match="alpha=0 .* never sees the teacher"):
        distill.run(distill_args("finetuned-teacher-layers:1", alpha=0.0, alias=""))


def test_soft_target_cache_misses_on_other_length_version_or_texts(teacher_home, tmp_path, monkeypatch):
    """One teacher pass per (teacher version, max_length, set of texts): the same three hit the cache;
    changing any one of them runs the teacher again."""
    import shutil

    from accelerate import Accelerator

    from kd_sentiment.training import soft_targets

    home, _ = teacher_home
    shutil.copy(home / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the cache runs written here stay here
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    first = tracking.resolve_version("models:/kd-sentiment-teacher-imdb/1")
    second = client.create_model_version(first.name, first.source, run_id=first.run_id, tags=first.tags)
    experiment = mlflow.get_experiment_by_name("kd-sentiment/imdb").experiment_id
    loads = []
    real_load = tracking.load_registered_classifier
    monkeypatch.setattr(tracking, "load_registered_classifier", lambda uri: loads.append(uri) or real_load(uri))
    texts, other = ["a fine film", "dull"], ["a fine film", "dull", "great"]

    def hit(version, texts, max_length):
        uri = f"models:/{version.name}/{version.version}"
        arrays, hit, _ = soft_targets.teacher_logits(version, uri, {"train": texts}, max_length, 4,
                                                     Accelerator(cpu=True), experiment)
        assert arrays["train"].shape == (len(texts), 2)
        return hit

    assert not hit(first, texts, 32) and hit(first, texts, 32)
    assert not hit(first, texts, 48)       # another max_length
    assert not hit(second, texts, 32)      # another teacher version
    assert not hit(first, other, 32)       # another set of texts
    assert len(loads) == 4
    # A bf16 teacher pass is cached apart from the fp32 one (one accelerator state per process here).
    assert soft_targets.cache_key(first, 32, "bf16") != soft_targets.cache_key(first, 32)
