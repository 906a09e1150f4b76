"""The texts quantize chooses on, judges on and trains on, rebuilt from the parent's run and never the same.

A quantized candidate is judged on held-out texts: the parent's validation split and the training
texts its run did not use (outside its labelled subset and its transfer set), or a labelled file
(`--judge_texts`). `auto` chooses on a stratified sample of those texts and the gate reads another
(`--judge_samples`, thousands where the data has them): the texts that choose never judge. What is
left of the held-out texts, with the parent's own training texts, is what calibration and
quantization-aware distillation may read. The parent's subset is rebuilt from its run's parameters
and checked against the digest its run logged, so a changed data folder is refused, not misread.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import mlflow
import pandas as pd

from kd_sentiment.core.data import Splits, read_table, stratified_take, validate_frame
from kd_sentiment.core.errors import UserError
from kd_sentiment.training.transfer_sets import load_transfer

ENOUGH_TO_JUDGE = 5000  # texts the gate should rest on; fewer is logged and warned about, not refused


@dataclass
class HeldOut:
    """Three disjoint sets of texts: what chooses, what judges, what calibration and QAD may train on."""

    choose: pd.DataFrame         # held-out texts (text, label) auto chooses on and the temperature is fitted on
    judge: pd.DataFrame          # held-out texts (text, label) the gate reads
    train: list[str]             # the parent's training texts and the held-out texts neither chooses nor judges
    source: str                  # where the judged texts come from

    def sample(self, n: int, seed: int) -> list[str]:
        """A seeded sample of at most `n` of the texts training and calibration may read."""
        return random.Random(seed).sample(self.train, min(n, len(self.train)))


def digest(frame: pd.DataFrame) -> str:
    """The digest MLflow gives a (text, label) frame logged as a dataset input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(frame[["text", "label"]].reset_index(drop=True), targets="label").digest


def parent_training_texts(run_id: str | None, trained: dict, full: Splits) -> list[str]:
    """The texts the parent trained on: its labelled subset of `full.train` (rebuilt with its
    max_train_samples and seed, checked against the digest its run logged) and its transfer set."""
    labelled = full.train
    if trained.get("max_train_samples"):
        labelled, _ = stratified_take(full.train, trained["max_train_samples"], trained["seed"], "max_train_samples")
    logged = {d.dataset.digest for d in (mlflow.get_run(run_id).inputs.dataset_inputs if run_id else [])
              for tag in d.tags if tag.key == "mlflow.data.context" and tag.value == "train"}
    if logged and digest(labelled) not in logged:
        raise UserError(f"the parent's training texts cannot be rebuilt from {full.source}: its run ({run_id}) "
                        f"logged training data {sorted(logged)}, the data now gives {digest(labelled)}. The data "
                        "changed since it was trained; quantize it where it was trained, or retrain it.")
    texts = labelled["text"].tolist()
    if trained.get("transfer_set"):
        subset = Splits(full.name, full.label_names, labelled.reset_index(drop=True), full.validation, full.test,
                        full.source, full.selection_metric)
        texts += load_transfer(trained["transfer_set"], trained.get("transfer_size"), subset, full,
                               trained["seed"]).texts
    return texts


def read_judge_file(path: str, label_names: list[str]) -> pd.DataFrame:
    """A labelled file of held-out texts (text, label columns; CSV, JSON Lines or Parquet)."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"judge_texts={path!r}: no such file; give a CSV, JSON Lines or Parquet file with text "
                        "and label columns.")
    return validate_frame(read_table(file), file, len(label_names)).reset_index(drop=True)


def refuse_overlap(judge: pd.DataFrame, seen: set[str], source: str) -> None:
    """A UserError naming the first judged row whose text (stripped) a training step saw."""
    overlap = judge["text"].str.strip().isin(seen)
    if overlap.any():
        row = int(overlap.to_numpy().nonzero()[0][0])
        raise UserError(f"{source}: row {row + 1} ({int(overlap.sum())} row(s) in all) is a text the parent trained "
                        f"on: {judge['text'].iloc[row][:60]!r}. Judge on texts no training step saw; drop them.")


def held_out(full: Splits, training: list[str], choice_samples: int, judge_samples: int | None,
             seed: int, judge_file: str = "") -> HeldOut:
    """The texts that choose, judge and train, disjoint; `full`: the parent's dataset without subsets,
    `training`: the texts the parent trained on (compared stripped: a transfer set is read stripped).
    Where the held-out texts cannot fill both samples they are shared in the samples' proportion, so
    the choice never takes every text the gate needed."""
    seen = {text.strip() for text in training}
    pool = pd.concat([full.validation, full.train], ignore_index=True)
    pool = pool[~pool["text"].str.strip().isin(seen)].drop_duplicates("text").reset_index(drop=True)
    judge, source = None, "validation+unused-train"
    if judge_file:
        judge = read_judge_file(judge_file, full.label_names)
        refuse_overlap(judge, seen, f"judge_texts {judge_file}")
        pool = pool[~pool["text"].isin(set(judge["text"]))].reset_index(drop=True)
        source = str(judge_file)
    judged = 0 if judge is not None else judge_samples or max(len(pool) - choice_samples, choice_samples)
    n_choose = min(choice_samples, len(pool) * choice_samples // (choice_samples + judged))
    if n_choose < 1 or (judge is None and len(pool) - n_choose < 1):
        raise UserError(f"{len(pool)} held-out text(s) (the parent trained on the rest) cannot give both texts to "
                        f"choose on and texts to judge on; give judge_texts, or quantize a parent trained on fewer.")
    choose, pool = stratified_take(pool, n_choose, seed, "choice_samples")
    if judge is None:
        judge, pool = stratified_take(pool, judge_samples or len(pool), seed, "judge_samples")
    return HeldOut(choose.reset_index(drop=True), judge.reset_index(drop=True), training + pool["text"].tolist(),
                   source)
