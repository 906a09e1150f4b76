"""Transfer sets: unlabelled texts the teacher labels, so a student learns from more than the labelled set.

Knowledge distillation's practical win is that the teacher can label text nobody labelled
(DistilBERT, TinyBERT's augmented data and SetFit's distillation all train the student on far more
text than the labelled set). A transfer set is:
  train-unlabelled   the dataset's training texts outside the labelled subset (the labels dropped):
                     the realistic case of a few labels and many unlabelled texts
  a file or folder   `.txt` (one text per line) or `.csv` / `.jsonl` / `.parquet` (optionally
                     gzipped) with a `text` column; any label column is ignored; a folder: every
                     such file in it
Texts are stripped; empty ones and repeats are dropped. Leakage is refused: a text that also occurs
in the test or validation split (the whole split, not only the evaluated subset), or among the
labelled training texts, is dropped and counted. `transfer_size` keeps a seeded sample. The step
logs the set as an MLflow dataset input (context `transfer`) with its source, size and fingerprint.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from kd_sentiment.core.data import Splits, fingerprint, read_table
from kd_sentiment.core.errors import UserError

TRAIN_UNLABELLED = "train-unlabelled"
TABLE_SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".parquet")
TEXT_SUFFIXES = (".txt", ".txt.gz")


@dataclass
class TransferSet:
    """The unlabelled texts a student learns from, and what was dropped on the way."""

    source: str
    texts: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # read, dropped (empty, repeated, overlaps), kept

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.texts)


def read_texts(path: Path) -> list[str]:
    """The texts of one file: lines of a .txt, the `text` column of a table."""
    name = path.name
    if name.endswith(TEXT_SUFFIXES):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as file:
                return file.read().splitlines()
        except (UnicodeDecodeError, OSError) as err:
            raise UserError(f"transfer_set {path}: cannot be read as UTF-8 text ({err}).") from None
    if name.endswith(TABLE_SUFFIXES):
        frame = read_table(path)
        if "text" not in frame.columns:
            raise UserError(f"transfer_set {path}: no `text` column (columns: {list(frame.columns)}); the texts "
                            "must be in a column named text.")
        return [t if isinstance(t, str) else "" for t in frame["text"].tolist()]
    raise UserError(f"transfer_set {path}: not a .txt, .csv, .jsonl or .parquet file.")


def read_source(spec: str, full: Splits) -> list[str]:
    """Every text `spec` names, before any filtering."""
    if spec == TRAIN_UNLABELLED:
        return full.train["text"].tolist()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TABLE_SUFFIXES + TEXT_SUFFIXES))
        if not files:
            raise UserError(f"transfer_set {path}: the folder holds no .txt, .csv, .jsonl or .parquet file.")
        return [text for file in files for text in read_texts(file)]
    if path.is_file():
        return read_texts(path)
    raise UserError(f"transfer_set={spec!r}: neither '{TRAIN_UNLABELLED}' nor an existing file or folder.")


def load_transfer(spec: str, size: int | None, labelled: Splits, full: Splits, seed: int) -> TransferSet:
    """The transfer set `spec` for a run trained on `labelled`, checked against `full` (the same
    dataset without subsets) for leakage; at most `size` texts, a seeded sample."""
    raw = read_source(spec, full)
    counts = {"read": len(raw)}
    texts, seen = [], set()
    for text in (t.strip() for t in raw):
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
    counts["dropped_empty_or_repeated"] = len(raw) - len(texts)
    for split, frame in (("test", full.test), ("validation", full.validation), ("train", labelled.train)):
        known = set(frame["text"].str.strip())
        kept = [t for t in texts if t not in known]
        counts[f"dropped_overlap_{split}"] = len(texts) - len(kept)
        texts = kept
    if not texts:
        raise UserError(f"transfer_set={spec!r}: no text left after dropping empty and repeated texts and those "
                        f"in the test, validation or labelled train split ({counts}).")
    if size is not None and size < len(texts):
        texts = random.Random(seed).sample(texts, size)
    counts["kept"] = len(texts)
    return TransferSet(spec if spec == TRAIN_UNLABELLED else str(Path(spec).expanduser().resolve()), texts, counts)
