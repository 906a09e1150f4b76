"""The texts quantize chooses, judges and trains on: disjoint, held out from the parent's training, rebuilt
from its run; and quantization-aware distillation, whose graph must hold integer weights."""
import mlflow
import pandas as pd
import pytest

from kd_sentiment.core.data import Splits, stratified_take
from kd_sentiment.core.errors import UserError
from kd_sentiment.deploy import held_out

LABELS = ["negative", "positive"]


def splits(n_train: int = 400, n_validation: int = 60) -> Splits:
    frame = lambda prefix, n: pd.DataFrame({"text": [f"{prefix} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    return Splits("toy", LABELS, frame("train", n_train), frame("validation", n_validation), frame("test", 50),
                  "toy", "accuracy")


def test_choice_judge_and_training_texts_are_disjoint_and_held_out():
    full = splits()
    trained_on = [f"train {i}" for i in range(100)]  # the parent's labelled subset
    held = held_out.held_out(full, trained_on, choice_samples=80, judge_samples=150, seed=0)
    choose, judge, train = set(held.choose["text"]), set(held.judge["text"]), set(held.train)
    assert (len(choose), len(judge)) == (80, 150)
    assert not choose & judge and not (choose | judge) & train
    assert not (choose | judge) & set(trained_on)  # nothing the parent trained on judges or chooses
    assert set(trained_on) <= train  # ... and QAD and calibration may read it
    # every held-out text lands in exactly one set: validation and the unused training texts
    assert choose | judge | (train - set(trained_on)) == set(full.validation["text"]) | set(full.train["text"][100:])
    assert list(held.judge["label"].value_counts()) == [75, 75]  # stratified
    sample = held.sample(1000, seed=1)
    assert len(sample) == len(train) and not set(sample) & judge
    assert held.sample(5, seed=1) == held.sample(5, seed=1)


def test_texts_trained_on_stay_out_whatever_their_spaces_and_a_small_pool_is_shared():
    """A transfer set is read stripped: ' train 150 ' trained on as 'train 150' must not be judged; a
    validation text the parent also trained on neither; too few held-out texts for both samples are
    shared in their proportion, never all taken by the choice."""
    full = splits(n_train=40, n_validation=20)
    full.train.loc[0, "text"], full.validation.loc[0, "text"] = " train 0 ", "train 1"
    trained_on = ["train 0", "train 1"]
    held = held_out.held_out(full, trained_on, choice_samples=2000, judge_samples=5000, seed=0)
    picked = set(held.choose["text"]) | set(held.judge["text"])
    assert not {" train 0 ", "train 1", "train 0"} & picked
    assert len(held.choose) + len(held.judge) == 40 + 20 - 3  # both copies of "train 1" and " train 0 " dropped
    assert len(held.choose) == (40 + 20 - 3) * 2000 // 7000 and len(held.judge) > len(held.choose)
    with pytest.raises(UserError, match="cannot give both texts to choose on and texts to judge on"):
        held_out.held_out(splits(n_train=2, n_validation=0), [], 2000, 5000, 0)


def test_a_judge_file_with_training_texts_is_refused_by_row(tmp_path):
    full = splits()
    trained_on = [f"train {i}" for i in range(100)]
    path = tmp_path / "judge.csv"
    pd.DataFrame({"text": ["new text", "train 7", "train 8"], "label": [0, 1, 0]}).to_csv(path, index=False)
    with pytest.raises(UserError, match=r"judge_texts .*judge.csv: row 2 \(2 row\(s\) in all\) is a text the parent "
                                        r"trained on: 'train 7'"):
        held_out.held_out(full, trained_on, 10, None, 0, judge_file=str(path))
    pd.DataFrame({"text": ["new text", "validation 3"], "label": [0, 1]}).to_csv(path, index=False)
    held = held_out.held_out(full, trained_on, 10, None, 0, judge_file=str(path))
    assert list(held.judge["text"]) == ["new text", "validation 3"] and held.source == str(path)
    assert "validation 3" not in set(held.choose["text"]) | set(held.train)


def test_the_parents_subset_is_checked_against_the_digest_its_run_logged(tmp_path):
    from kd_sentiment.core import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    full = splits()
    trained = {"max_train_samples": 100, "seed": 42, "transfer_set": ""}
    labelled = stratified_take(full.train, 100, 42, "max_train_samples")[0]
    with mlflow.start_run() as run:
        tracking.log_texts(labelled[["text", "label"]].reset_index(drop=True), "toy-train-100", None, "train")
    rebuilt = held_out.parent_training_texts(run.info.run_id, trained, full)
    assert rebuilt == labelled["text"].tolist()
    changed = splits(n_train=401)  # one more training row: another stratified subset
    with pytest.raises(UserError, match="the parent's training texts cannot be rebuilt .* The data changed"):
        held_out.parent_training_texts(run.info.run_id, trained, changed)


def test_qad_trains_under_simulated_int8_and_makes_a_graph_with_integer_weights(tiny_model, tmp_path):
    """The wrapped layers are exactly the static recipe's MatMuls; the simulation changes the logits;
    training moves the weights; the exported graph holds integer nodes and int8 weights."""
    import onnx
    import torch

    from kd_sentiment.core.models import load_classifier
    from kd_sentiment.deploy import export, int8_recipes, qad

    model, tokenizer = load_classifier(str(tiny_model), LABELS)
    model.save_pretrained(tmp_path / "fp32")
    tokenizer.save_pretrained(tmp_path / "fp32")
    unfused = export.export_onnx(tmp_path / "fp32", tmp_path / "onnx")
    nodes = int8_recipes.static_matmuls(onnx.load(str(unfused)).graph)
    texts = [f"a {'good' if i % 2 else 'bad'} film number {i}" for i in range(64)]

    probe = load_classifier(str(tmp_path / "fp32"), LABELS)[0].eval()
    wrapped = qad.wrap(probe, sorted({qad.module_name(n) for n in nodes}), 127)
    assert len(wrapped) == len({qad.module_name(n) for n in nodes}) > 0
    qad.calibrate(probe, wrapped, tokenizer, texts[:8], 32, "cpu")
    batch = tokenizer(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        simulated = probe(**batch).logits
        qad.unwrap(probe)
        assert not any(isinstance(m, qad.FakeQuantLinear) for m in probe.modules())
        assert not torch.allclose(simulated, probe(**batch).logits)  # the simulation is on

    before = {k: v.clone() for k, v in model.state_dict().items()}
    path, recipe = qad.qad_graph(tmp_path / "fp32", unfused, tmp_path / "qad", texts, texts[:8], 32, steps=4,
                                 learning_rate=1e-3, reduce_range=None, seed=0)
    trained = load_classifier(str(tmp_path / "qad" / "fp32"), LABELS)[0].state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    assert recipe["qad_steps"] == 4 and recipe["qad_quantized_layers"] == len(wrapped)
    assert int8_recipes.integer_nodes(path) > 0
    graph = onnx.load(str(path)).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= len(nodes)
    assert int8_recipes.integer_nodes(unfused) == 0
