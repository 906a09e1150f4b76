"""Datasets: IMDb, TweetEval sentiment or a folder of files, as validated train/validation/test frames.

Every split comes back as a pandas DataFrame with columns `text` (str) and `label` (int in
0..K-1) plus `row`, the example's position in its source file, so any example can be traced back.

Where the data comes from, first match wins:
  1. `dataset` is a folder                    -> its train/validation/test files
  2. `data_dir` (parameter)                   -> local files, layout of ../shared/data
  3. KD_SENTIMENT_DATA_DIR (environment)      -> same
  4. the Hugging Face Hub                     -> stanfordnlp/imdb, cardiffnlp/tweet_eval (sentiment)

Test data is never used for model selection: IMDb has no validation split, so one is carved from
train (stratified, seeded).
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from kd_sentiment.core.errors import UserError

SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".jsonl", ".jsonl.gz")
DATA_DIR_ENV = "KD_SENTIMENT_DATA_DIR"


@dataclass(frozen=True)
class KnownDataset:
    hub_id: str
    hub_config: str | None
    local_name: str  # folder name in the layout of ../shared/data
    label_names: tuple[str, ...]
    selection_metric: str  # the metric the field reports, used to pick the best checkpoint


KNOWN_DATASETS = {
    "imdb": KnownDataset("stanfordnlp/imdb", None, "imdb", ("negative", "positive"), "accuracy"),
    # TweetEval's official sentiment metric is macro-averaged recall.
    "tweeteval": KnownDataset(
        "cardiffnlp/tweet_eval", "sentiment", "tweeteval_sentiment",
        ("negative", "neutral", "positive"), "macro_recall",
    ),
}


@dataclass
class Splits:
    """A dataset ready for training: three validated splits and what is known about them."""

    name: str
    label_names: list[str]
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    source: str
    selection_metric: str
    duplicates: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> pd.DataFrame:
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


def fingerprint(texts) -> str:
    """A short content hash of a list of texts: the identity of a (sub)split for caching."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- reading files

def find_split_file(folder: Path, split: str) -> Path | None:
    for suffix in FILE_SUFFIXES:
        path = folder / f"{split}{suffix}"
        if path.exists():
            return path
    return None


def _encoding_error(path: Path, err: UnicodeDecodeError) -> UserError:
    # Point at the line holding the bad bytes: the byte offset alone is no help to a person.
    raw = path.read_bytes()
    if path.suffix == ".gz":
        import gzip
        raw = gzip.decompress(raw)
    bad = raw.find(err.object[err.start:err.end]) if err.object else -1
    line = raw.count(b"\n", 0, bad) + 1 if bad >= 0 else "?"
    return UserError(f"{path}: line {line} is not valid UTF-8 ({err.reason}). "
                     "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).")


def read_table(path: Path) -> pd.DataFrame:
    """Read one split file (csv, csv.gz, parquet, jsonl[.gz]) without guessing at missing values."""
    if not path.exists():
        raise UserError(f"{path}: file not found.")
    try:
        if path.name.endswith((".csv", ".csv.gz")):
            # keep_default_na=False: the text "NA" or "null" is a review, not a missing value.
            frame = pd.read_csv(path, keep_default_na=False, encoding="utf-8")
        elif path.name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_json(path, lines=True, encoding="utf-8", dtype=False)
    except UnicodeDecodeError as err:
        raise _encoding_error(path, err) from None
    except (pd.errors.EmptyDataError, ValueError, OSError) as err:
        raise UserError(f"{path}: cannot be read as a table ({err}).") from None
    if frame.empty:
        raise UserError(f"{path}: the file holds no examples.")
    return frame


def as_read(value):
    """A cell as the file holds it, for error messages: numpy scalars as plain Python values, so a
    label 0.5 reads `0.5`, not `np.float64(0.5)`."""
    return value.item() if isinstance(value, np.generic) else value


def validate_frame(frame: pd.DataFrame, path: Path, num_labels: int | None) -> pd.DataFrame:
    """Check columns, texts and labels; return `text,label,row`. `row` is the 1-based data row."""
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}. "
                        "Each split needs the columns `text,label`.")
    rows = np.arange(1, len(frame) + 1)

    def first_bad(mask) -> int:
        return int(rows[np.asarray(mask)][0])

    not_str = ~frame["text"].map(lambda t: isinstance(t, str))
    if not_str.any():
        r = first_bad(not_str)
        raise UserError(f"{path}: row {r}: text is not a string ({as_read(frame['text'].iloc[r - 1])!r}); "
                        f"{int(not_str.sum())} such row(s).")
    blank = frame["text"].str.strip() == ""
    if blank.any():
        raise UserError(f"{path}: row {first_bad(blank)}: text is empty or whitespace only; "
                        f"{int(blank.sum())} such row(s). Remove them or fill them in.")

    labels = pd.to_numeric(frame["label"], errors="coerce")
    not_int = labels.isna() | (labels != labels.round())
    if not_int.any():
        r = first_bad(not_int)
        raise UserError(f"{path}: row {r}: label {as_read(frame['label'].iloc[r - 1])!r} is not an integer "
                        "class id. Labels must be integers 0..K-1.")
    labels = labels.astype(np.int64)
    upper = num_labels - 1 if num_labels else labels.max()
    out_of_range = (labels < 0) | (labels > upper)
    if out_of_range.any():
        r = first_bad(out_of_range)
        raise UserError(f"{path}: row {r}: label {int(labels.iloc[r - 1])} is outside 0..{upper}.")
    return pd.DataFrame({"text": frame["text"].to_numpy(), "label": labels.to_numpy(), "row": rows})


def read_folder(folder: Path, num_labels: int | None, name: str) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Read train/[validation]/test from a folder; label names from labels.txt if present."""
    if not folder.is_dir():
        raise UserError(f"{folder}: data folder not found.")
    paths = {split: find_split_file(folder, split) for split in SPLITS}
    for split in ("train", "test"):
        if paths[split] is None:
            raise UserError(f"{folder}: no {split} file ({split}.csv, {split}.csv.gz, {split}.parquet "
                            f"or {split}.jsonl) for dataset '{name}'.")
    frames = {split: validate_frame(read_table(p), p, num_labels) for split, p in paths.items() if p}
    if num_labels is None:
        label_file = folder / "labels.txt"
        if label_file.exists():
            try:
                label_names = [l.strip() for l in label_file.read_text(encoding="utf-8").splitlines() if l.strip()]
            except UnicodeDecodeError as err:
                raise _encoding_error(label_file, err) from None
        else:
            label_names = [f"label_{i}" for i in range(int(frames["train"]["label"].max()) + 1)]
        seen = set(frames["train"]["label"])
        for split, frame in frames.items():
            extra = sorted(set(frame["label"]) - seen) if split != "train" else []
            if extra:
                raise UserError(f"{paths[split]}: labels {extra} do not occur in train ({paths['train']}); "
                                "every split must share one label set.")
            unnamed = frame["label"] >= len(label_names)
            if unnamed.any():  # only with labels.txt: otherwise the names cover train's labels
                row = frame[unnamed].iloc[0]
                raise UserError(f"{paths[split]}: row {int(row['row'])}: label {int(row['label'])} has no name in "
                                f"{label_file} ({len(label_names)} names, one per line, for labels "
                                f"0..{len(label_names) - 1}).")
        return frames, label_names
    return frames, []


def read_hub(info: KnownDataset, name: str) -> dict[str, pd.DataFrame]:
    """Download a known dataset from the Hugging Face Hub; a clear error when it is unreachable."""
    import datasets

    try:
        hub = datasets.load_dataset(info.hub_id, info.hub_config)
    except (OSError, datasets.exceptions.DatasetsError) as err:  # unreachable, offline, not found, not cached:
        # all of these are OSErrors or the library's own; a bug (TypeError, KeyError...) is not the user's
        raise UserError(
            f"Could not load dataset '{name}' ({info.hub_id}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            f"Offline? Point data_dir (or {DATA_DIR_ENV}) at a folder holding {info.local_name}/"
            "{train,test}.csv[.gz], e.g. `-P data_dir=../shared/data`.") from None
    frames = {}
    for split in SPLITS:
        if split in hub:
            frame = hub[split].to_pandas()[["text", "label"]]
            frames[split] = validate_frame(frame, Path(f"{info.hub_id}:{split}"), len(info.label_names))
    return frames


# ----------------------------------------------------------------------------- subsets

def stratified_take(frame: pd.DataFrame, size: int | float, seed: int, what: str):
    """Split `frame` into (taken, rest) with `size` examples (or fraction) taken, per-class balanced."""
    n = round(size * len(frame)) if isinstance(size, float) else int(size)
    if n >= len(frame):
        return frame, frame.iloc[:0]
    classes = frame["label"].nunique()
    if n < classes:
        raise UserError(f"{what}={size} gives {n} example(s), fewer than the {classes} classes; "
                        f"use at least {classes}.")
    stratify = frame["label"] if frame["label"].value_counts().min() >= 2 else None
    taken, rest = train_test_split(frame, train_size=n, stratify=stratify, random_state=seed)
    return taken.sort_index(), rest.sort_index()


def count_duplicates(frames: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Duplicate texts within each split and test texts also in train: counted, never dropped."""
    counts = {f"duplicates_{split}": int(frame["text"].duplicated().sum())
              for split, frame in frames.items()}
    counts["duplicates_test_in_train"] = int(frames["test"]["text"].isin(set(frames["train"]["text"])).sum())
    return counts


# ----------------------------------------------------------------------------- entry point

def resolve_local_dir(name: str, info: KnownDataset, data_dir: str | None) -> Path | None:
    root = data_dir or os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
    root = Path(root).expanduser()
    # Accept the parent (…/data with imdb/ inside) or the dataset folder itself.
    for candidate in (root / info.local_name, root / name, root):
        if find_split_file(candidate, "train"):
            return candidate
    raise UserError(f"{root}: no {info.local_name}/train.csv[.gz] (nor train.* directly) for dataset "
                    f"'{name}'. data_dir must hold the layout of ../shared/data.")


def unknown_dataset(dataset: str) -> UserError:
    return UserError(f"Unknown dataset '{dataset}': use one of {sorted(KNOWN_DATASETS)} or a folder "
                     "holding train/validation/test files with columns text,label.")


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes, once per process for a given size and modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def data_fingerprint(dataset: str, data_dir: str | None = None) -> dict:
    """Where `dataset` would be read from and the content of its split files: what a result made
    from it depends on (a Hub dataset: its id alone, as its content is not pinned here)."""
    if dataset in KNOWN_DATASETS:
        folder = resolve_local_dir(dataset, KNOWN_DATASETS[dataset], data_dir)
        if folder is None:
            return {"source": f"hf://{KNOWN_DATASETS[dataset].hub_id}"}
    elif Path(dataset).expanduser().is_dir():
        folder = Path(dataset).expanduser()
    else:
        raise unknown_dataset(dataset)
    files = {split: find_split_file(folder, split) for split in ("train", "validation", "test")}
    return {"source": str(folder.resolve()),
            "files": {path.name: _file_digest(path.resolve(), path.stat().st_size, path.stat().st_mtime_ns)
                      for path in files.values() if path is not None}}


def load_splits(dataset: str, data_dir: str | None = None, validation_size: float | int = 0.1,
                max_train_samples: int | None = None, max_eval_samples: int | None = None,
                seed: int = 42) -> Splits:
    """Load, validate and subset a dataset; see the module docstring for where data comes from.

    validation_size: fraction (0 < x < 1) or count of train carved out as validation where the
    dataset has no validation split. max_*_samples: stratified seeded subsets (None = all);
    max_eval_samples applies to validation and test each.
    """
    if isinstance(validation_size, float) and not 0 < validation_size < 1:
        raise UserError(f"validation_size={validation_size}: a fraction must lie in (0, 1).")
    if isinstance(validation_size, int) and validation_size < 1:
        raise UserError(f"validation_size={validation_size}: a count must be at least 1.")
    for what, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value <= 0:
            raise UserError(f"{what}={value}: must be a positive number of examples (or empty for all).")

    if dataset in KNOWN_DATASETS:
        info = KNOWN_DATASETS[dataset]
        folder = resolve_local_dir(dataset, info, data_dir)
        if folder is not None:
            frames, _ = read_folder(folder, len(info.label_names), dataset)
            source = str(folder.resolve())
        else:
            frames, source = read_hub(info, dataset), f"hf://{info.hub_id}"
        label_names, metric = list(info.label_names), info.selection_metric
    elif Path(dataset).expanduser().is_dir():
        folder = Path(dataset).expanduser().resolve()
        frames, label_names = read_folder(folder, None, dataset)
        source, metric, dataset = str(folder), "accuracy", folder.name
    else:
        raise unknown_dataset(dataset)

    duplicates = count_duplicates(frames)
    train = frames["train"]
    if "validation" in frames:
        validation = frames["validation"]
    else:
        validation, train = stratified_take(train, validation_size, seed, "validation_size")
        if train.empty:
            raise UserError(f"validation_size={validation_size} takes all {len(validation)} training examples "
                            "for validation, leaving none to train on; use a smaller fraction or count.")
        # A text both in the carved validation and in train would leak; keep it in validation only.
        leaked = train["text"].isin(set(validation["text"]))
        train = train[~leaked]
        duplicates["train_rows_dropped_as_in_validation"] = int(leaked.sum())
    if max_train_samples:
        train, _ = stratified_take(train, max_train_samples, seed, "max_train_samples")
    test = frames["test"]
    if max_eval_samples:
        validation, _ = stratified_take(validation, max_eval_samples, seed, "max_eval_samples")
        test, _ = stratified_take(test, max_eval_samples, seed, "max_eval_samples")
    return Splits(dataset, label_names, train.reset_index(drop=True), validation.reset_index(drop=True),
                  test.reset_index(drop=True), source, metric, duplicates)
