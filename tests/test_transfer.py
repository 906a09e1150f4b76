"""Transfer sets (kd_sentiment/training/transfer_sets.py): what is read, what is refused, and a student trained on one."""
import gzip

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from kd_sentiment.training import distill
from kd_sentiment.core import tracking
from kd_sentiment.core.data import load_splits
from kd_sentiment.core.errors import UserError
from kd_sentiment.training.transfer_sets import TRAIN_UNLABELLED, load_transfer

from conftest import tiny_train_config


@pytest.fixture(scope="module")
def imdb():
    """(labelled: a 300-review subset, full: the same dataset without subsets): the distill step's pair."""
    return (load_splits("imdb", validation_size=300, max_train_samples=300, max_eval_samples=100, seed=42),
            load_splits("imdb", validation_size=300, seed=42))


def test_train_unlabelled_is_the_rest_of_train_without_leaks(imdb):
    labelled, full = imdb
    transfer = load_transfer(TRAIN_UNLABELLED, 2000, labelled, full, seed=0)
    assert len(transfer.texts) == transfer.counts["kept"] == 2000
    texts = set(transfer.texts)
    assert not texts & set(labelled.train["text"]) and not texts & set(full.test["text"])
    assert not texts & set(full.validation["text"])
    # the labelled subset (IMDb repeats some reviews between train and test: those count as test overlaps)
    labelled_only = set(labelled.train["text"]) - set(full.test["text"]) - set(full.validation["text"])
    assert transfer.counts["dropped_overlap_train"] == len(labelled_only) > 250
    assert texts <= set(full.train["text"].str.strip())  # transfer texts are stripped
    again = load_transfer(TRAIN_UNLABELLED, 2000, labelled, full, seed=0)
    assert again.fingerprint == transfer.fingerprint  # seeded: the same sample, the same cache entry


def test_a_file_holding_test_validation_or_labelled_texts_has_them_dropped_and_counted(imdb, tmp_path):
    labelled, full = imdb
    leaked = full.test["text"].iloc[:3].tolist()
    chosen_on = full.validation["text"].iloc[:2].tolist()  # the texts seeds and recipes are chosen on
    trained_on = labelled.train["text"].iloc[:1].tolist()
    rows = leaked + chosen_on + trained_on + ["a new review", "another one", "  a new review  ", "", "third", "fourth",
                                              "fifth"]
    pd.DataFrame({"text": rows, "label": 1}).to_csv(tmp_path / "extra.csv", index=False)
    transfer = load_transfer(str(tmp_path / "extra.csv"), None, labelled, full, seed=0)
    assert sorted(transfer.texts) == sorted(["a new review", "another one", "third", "fourth", "fifth"])
    assert transfer.counts["dropped_overlap_test"] == 3 and transfer.counts["dropped_empty_or_repeated"] == 2
    assert transfer.counts["dropped_overlap_validation"] == 2 and transfer.counts["dropped_overlap_train"] == 1


def test_text_files_and_folders_are_read(imdb, tmp_path):
    labelled, full = imdb
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("one review\ntwo reviews\n")
    with gzip.open(tmp_path / "texts" / "b.jsonl.gz", "wt") as file:
        file.write('{"text": "three", "stars": 5}\n{"text": "four"}\n')
    transfer = load_transfer(str(tmp_path / "texts"), None, labelled, full, seed=0)
    assert sorted(transfer.texts) == ["four", "one review", "three", "two reviews"]


@pytest.mark.parametrize("content, expect", [
    (b"sentence,label\nfine,1\n", "no `text` column"),
    (b"", "cannot be read"),
    (None, "neither 'train-unlabelled' nor an existing file"),
])
def test_bad_transfer_files_are_refused_with_one_line(imdb, tmp_path, content, expect):
    labelled, full = imdb
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=expect):
        load_transfer(str(path), None, labelled, full, seed=0)


def test_a_transfer_set_left_empty_by_the_leak_check_is_refused(imdb, tmp_path):
    labelled, full = imdb
    (tmp_path / "all-test.txt").write_text("\n".join(full.test["text"].iloc[:5]))
    with pytest.raises(UserError, match="no text left"):
        load_transfer(str(tmp_path / "all-test.txt"), None, labelled, full, seed=0)


def distill_args(student, **overrides):
    return distill.DistillArgs(student=str(student), dataset="imdb", validation_size=300, max_train_samples=300,
                               max_eval_samples=100, train=tiny_train_config(epochs=1, alpha=0.5), **overrides)


def test_students_learn_from_the_transfer_set_and_share_its_soft_targets(teacher_home, tiny_model, monkeypatch):
    home, _ = teacher_home
    monkeypatch.chdir(home)
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    sizes = []
    real_train = distill.fit_and_evaluate
    monkeypatch.setattr(distill, "fit_and_evaluate", lambda ctx, args, model, tok, soft, transfer=None: (
        sizes.append((len(ctx.splits.train), len(transfer[0]), transfer[1].shape)) or
        real_train(ctx, args, model, tok, soft, transfer)))
    distill.run(distill_args("teacher-layers:1", transfer_set=TRAIN_UNLABELLED, transfer_size=400,
                             name="kd-sentiment-transfer-imdb"))
    loads = []
    real_load = tracking.load_registered_classifier
    monkeypatch.setattr(tracking, "load_registered_classifier", lambda uri: loads.append(uri) or real_load(uri))
    distill.run(distill_args(tiny_model, transfer_set=TRAIN_UNLABELLED, transfer_size=400,
                             name="kd-sentiment-transfer2-imdb"))
    assert loads == []  # the second student's transfer soft targets came from the cache
    assert sizes == [(300, 400, (400, 2)), (300, 400, (400, 2))]

    runs = mlflow.search_runs(experiment_names=["kd-sentiment/imdb"], output_format="list",
                              filter_string="params.transfer_source = 'train-unlabelled'")
    assert len(runs) == 2 and {r.data.params["n_transfer"] for r in runs} == {"400"}
    assert {r.data.metrics["soft_targets_cache_hit"] for r in runs} == {0.0, 1.0}
    assert all(r.data.metrics["transfer_dropped_overlap_test"] >= 0 for r in runs)
    inputs = MlflowClient().get_run(runs[0].info.run_id).inputs.dataset_inputs
    transfer_inputs = [i for i in inputs if any(t.value == "transfer" for t in i.tags)]
    assert len(transfer_inputs) == 1 and transfer_inputs[0].dataset.name == "imdb-transfer-400"


def test_the_alpha_zero_baseline_refuses_a_transfer_set():
    args = distill_args("tinybert", transfer_set=TRAIN_UNLABELLED)
    args.train.alpha = 0.0
    with pytest.raises(UserError, match="alpha=0"):
        args.validate()
