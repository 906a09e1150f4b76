import gzip

import pandas as pd
import pytest

from kd_sentiment.core.data import load_splits
from kd_sentiment.core.errors import UserError

from conftest import DATA_DIR


def test_tweeteval_subsets_are_stratified_and_seeded():
    a = load_splits("tweeteval", max_train_samples=900, max_eval_samples=300, seed=1)
    b = load_splits("tweeteval", max_train_samples=900, max_eval_samples=300, seed=1)
    assert a.sizes() == {"train": 900, "validation": 300, "test": 300}
    assert a.label_names == ["negative", "neutral", "positive"] and a.selection_metric == "macro_recall"
    assert a.train["text"].tolist() == b.train["text"].tolist()
    full = pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "train.csv", keep_default_na=False)
    expected = full["label"].value_counts(normalize=True).sort_index()
    got = a.train["label"].value_counts(normalize=True).sort_index()
    assert (expected - got).abs().max() < 0.01
    # `row` points back at the source file.
    r = a.train.iloc[0]
    assert full["text"].iloc[r["row"] - 1] == r["text"]
    assert a.duplicates["duplicates_train"] == 29  # counted, as the data README states, never dropped


def test_imdb_validation_is_carved_from_train_never_test():
    s = load_splits("imdb", validation_size=500, max_train_samples=1000, max_eval_samples=400)
    assert s.sizes() == {"train": 1000, "validation": 400, "test": 400}
    test_full = pd.read_csv(DATA_DIR / "imdb" / "test.csv.gz", keep_default_na=False)
    assert not set(s.validation["text"]) & set(s.train["text"])
    assert set(s.test["text"]) <= set(test_full["text"])
    assert s.validation["label"].value_counts().tolist() == [200, 200]


def test_folder_dataset_with_label_names(tmp_path):
    for split, n in (("train", 30), ("validation", 9), ("test", 9)):
        pd.DataFrame({"text": [f"text {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}).to_json(
            tmp_path / f"{split}.jsonl", orient="records", lines=True)
    (tmp_path / "labels.txt").write_text("bad\nmeh\ngood\n")
    s = load_splits(str(tmp_path))
    assert s.label_names == ["bad", "meh", "good"] and s.sizes()["train"] == 30


def write(folder, split, text):
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.csv").write_text(text)


def folder_with(tmp_path, train_csv):
    write(tmp_path / "d", "train", train_csv)
    write(tmp_path / "d", "test", "text,label\nok,0\nfine,1\n")
    return str(tmp_path / "d")


@pytest.mark.parametrize("train_csv, message", [
    ("text,label\nhello,0\n,1\n", "row 2: text is empty"),
    ("text,label\nhello,0\n   ,1\n", "row 2: text is empty or whitespace"),
    ("text,label\nhello,0\nbye,x\n", "row 2: label 'x' is not an integer"),
    ("text,label\nhello,0\nbye,0.5\n", "row 2: label 0.5 is not an integer"),  # as the file has it
    ("text,label\nhello,0\nbye,-1\n", "row 2: label -1 is outside"),
    ("sentence,label\nhello,0\n", "missing column(s) ['text']"),
    ("text,label\n", "holds no examples"),
])
def test_bad_folder_input_names_file_and_row(tmp_path, train_csv, message):
    with pytest.raises(UserError, match=None) as err:
        load_splits(folder_with(tmp_path, train_csv))
    assert message in str(err.value) and "train.csv" in str(err.value)


def test_known_dataset_label_out_of_range(tmp_path):
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "train.csv").write_text("text,label\ngood,1\nbad,2\n")
    (tmp_path / "imdb" / "test.csv").write_text("text,label\ngood,1\n")
    with pytest.raises(UserError, match=r"train.csv: row 2: label 2 is outside 0..1"):
        load_splits("imdb", data_dir=str(tmp_path))


def test_non_utf8_names_the_line(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.csv").write_bytes(b"text,label\nfine,0\ncaf\xe9 au lait,1\n")
    (folder / "test.csv").write_text("text,label\nok,0\n")
    with pytest.raises(UserError, match=r"train.csv: line 3 is not valid UTF-8"):
        load_splits(str(folder))


def test_gzip_and_labels_unseen_in_train(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    with gzip.open(folder / "train.csv.gz", "wt") as f:
        f.write("text,label\na,0\nb,1\n")
    (folder / "test.csv").write_text("text,label\nc,2\n")
    with pytest.raises(UserError, match="do not occur in train"):
        load_splits(str(folder))


def test_missing_test_file_and_unknown_dataset(tmp_path):
    write(tmp_path / "d", "train", "text,label\na,0\n")
    with pytest.raises(UserError, match="no test file"):
        load_splits(str(tmp_path / "d"))
    with pytest.raises(UserError, match="Unknown dataset 'sst9'"):
        load_splits("sst9")


def test_hub_unreachable_says_how_to_use_local_files(monkeypatch):
    monkeypatch.delenv("KD_SENTIMENT_DATA_DIR")
    with pytest.raises(UserError, match="Hugging Face Hub.*data_dir"):
        load_splits("tweeteval")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_train_samples": 0}, "max_train_samples=0"),
    ({"max_eval_samples": -5}, "max_eval_samples=-5"),
    ({"validation_size": 1.5}, "validation_size=1.5"),
    ({"max_train_samples": 2}, "fewer than the 3 classes"),
])
def test_bad_sizes(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_splits("tweeteval", **kwargs)


def test_an_unreachable_hub_is_the_users_to_fix_a_bug_is_not(monkeypatch):
    import datasets

    from kd_sentiment.core import data

    info = data.KNOWN_DATASETS["tweeteval"]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cardiffnlp/tweet_eval' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="Offline\\? Point data_dir"):
        data.read_hub(info, "tweeteval")

    def bug(*args, **kwargs):
        raise TypeError("load_dataset() got an unexpected keyword argument")

    monkeypatch.setattr(datasets, "load_dataset", bug)
    with pytest.raises(TypeError):
        data.read_hub(info, "tweeteval")
