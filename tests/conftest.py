"""Test set-up: offline, real data slices from ../shared/data, tiny models made on the fly.

Each test that touches MLflow runs in its own temporary working directory, so it gets a fresh
embedded store (sqlite:///mlflow.db + ./mlruns) and never writes into the repository.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("KD_SENTIMENT_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false",
                  DO_NOT_TRACK="1", GIT_PYTHON_REFRESH="quiet")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("KD_SENTIMENT_CATALOG", None)
DATA_DIR = Path(os.environ["KD_SENTIMENT_DATA_DIR"])


def pytest_report_header(config):
    return f"KD_SENTIMENT_DATA_DIR={DATA_DIR}"


@pytest.fixture(autouse=True)
def _fresh_mlflow(tmp_path, monkeypatch):
    """Every test: its own working directory and embedded MLflow store, no leftover active run.
    Where MLflow is not installed (a GPU machine running only the `gpu` tests), just the directory."""
    monkeypatch.chdir(tmp_path)
    try:
        import mlflow
    except ImportError:
        yield
        return

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it; steps must choose themselves
    # An experiment selected by an earlier test lives on in MLflow's memory and names an id of
    # another store; forget it so this test starts in the new store's default experiment.
    mlflow.tracking.fluent._active_experiment_id = None
    yield
    while mlflow.active_run():
        mlflow.end_run()
    # and forget this test's, also the id mlflow.set_experiment exported: a later module's fixture
    # (test_quantize's, on teacher_home's store) is set up before that test's own reset above.
    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def make_tiny_model(folder: Path, texts: list[str], layers: int = 2) -> Path:
    """A 2-layer, 64-wide BERT with a WordPiece tokenizer trained on `texts`: real architecture,
    random weights, built in about a second."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=3000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=512)
    import torch
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a tiny BERT encoder (no classification head, like a pretrained checkpoint)."""
    texts = pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "train.csv", keep_default_na=False)["text"].iloc[:5000]
    imdb = pd.read_csv(DATA_DIR / "imdb" / "train.csv.gz", keep_default_na=False)["text"].iloc[::25]
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"), list(texts) + list(imdb))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m kd_sentiment.cli ARGS` in a fresh process, as a user would."""
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "kd_sentiment.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def wait_until_ok(url: str, server, log: Path, seconds: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or `seconds` pass."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not answering after {seconds} s:\n{log.read_text()[-3000:]}")


def tiny_train_config(**overrides):
    from kd_sentiment.training.loop import TrainConfig

    return TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 2e-3, "max_length": 96, "checkpoint_every": 0,
                          "seed": 0, **overrides})


@pytest.fixture(scope="session")
def teacher_home(tiny_model, tmp_path_factory):
    """A working directory whose MLflow store holds a tiny teacher trained on an IMDb slice and
    registered as kd-sentiment-teacher-imdb@champion: (folder, the teacher's final metrics)."""
    from kd_sentiment.training import teacher

    home = tmp_path_factory.mktemp("teacher-home")
    old = os.getcwd()
    os.chdir(home)
    try:
        metrics = teacher.run(teacher.TeacherArgs(model=str(tiny_model), dataset="imdb", validation_size=300,
                                                  max_train_samples=1500, max_eval_samples=300,
                                                  train=tiny_train_config()))
    finally:
        os.chdir(old)
    return home, metrics
