"""Quantization-aware distillation (QAD): the fp32 model fine-tuned briefly under simulated INT8 to
match its own fp32 logits, then made into a static QDQ INT8 graph.

Post-training INT8 flips the answers of texts whose top two logits nearly tie. QAD lets the weights
move so that the INT8 model lands where fp32 did: each Linear layer whose MatMul the static recipe
quantizes (int8_recipes, mode static) computes with per-output-channel symmetric INT8 weights and
per-tensor asymmetric UINT8 inputs whose ranges are calibrated (min/max) on the calibration texts,
the recipe's own scheme; rounding passes gradients straight through (PyTorch's fake-quantize ops).
The loss is the KL divergence from the frozen fp32 model's softened logits (DistilBERT's KD loss
with no hard labels), so any unlabelled text the judge never reads can train it. The trained
weights are exported and quantized by the same static recipe: integer weights in a QDQ graph that
ONNX Runtime and OpenVINO both run.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from kd_sentiment.core.errors import UserError
from kd_sentiment.training.losses import UNLABELLED, distillation_loss
from kd_sentiment.training.loop import collate, length_grouped_batches, model_inputs, tokenize
from kd_sentiment.training.steps import step_accelerator

log = logging.getLogger(__name__)

TEMPERATURE = 2.0   # softens both logit sets so near-ties (the flips) carry gradient
BATCH_SIZE = 32
WARMUP_SHARE = 0.1  # of the steps, learning rate ramping up from 0: the first steps see calibrated ranges only


def module_name(onnx_node: str) -> str:
    """The PyTorch module an exported MatMul node belongs to: `/bert/encoder/layer.0/output/dense/MatMul`
    -> `bert.encoder.layer.0.output.dense`."""
    return onnx_node.strip("/").rsplit("/", 1)[0].replace("/", ".")


class FakeQuantLinear(torch.nn.Module):
    """A Linear layer computing as the static INT8 recipe will: fake-quantized weights and inputs."""

    def __init__(self, linear: torch.nn.Linear, weight_max: int):
        super().__init__()
        self.linear, self.weight_max = linear, weight_max
        self.register_buffer("low", torch.tensor(0.0))   # calibrated input range (always holds 0)
        self.register_buffer("high", torch.tensor(0.0))
        self.calibrating = False

    def forward(self, x):
        if self.calibrating:
            self.low.copy_(torch.minimum(self.low, x.detach().min()))
            self.high.copy_(torch.maximum(self.high, x.detach().max()))
            return self.linear(x)
        scale = ((self.high - self.low) / 255).clamp(min=1e-8)
        zero = torch.round(-self.low / scale).to(torch.int32)
        x = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
        weight = self.linear.weight
        w_scale = (weight.detach().abs().amax(dim=1) / self.weight_max).clamp(min=1e-8)
        weight = torch.fake_quantize_per_channel_affine(weight, w_scale, torch.zeros_like(w_scale, dtype=torch.int32),
                                                        0, -self.weight_max, self.weight_max)
        return F.linear(x, weight, self.linear.bias)


def wrap(model: torch.nn.Module, names: list[str], weight_max: int) -> list[FakeQuantLinear]:
    """Replace the Linear modules `names` with FakeQuantLinear in place; a UserError naming any
    that is not a Linear of `model`."""
    modules, wrapped = dict(model.named_modules()), []
    missing = [name for name in names if not isinstance(modules.get(name), torch.nn.Linear)]
    if missing:
        raise UserError(f"QAD: the quantized MatMuls {missing[:3]} map to no Linear layer of the model; this "
                        "architecture's export names are not understood. Leave it out (qad_steps 0).")
    for name in names:
        parent, _, child = name.rpartition(".")
        fake = FakeQuantLinear(modules[name], weight_max)
        setattr(modules[parent] if parent else model, child, fake)
        wrapped.append(fake)
    return wrapped


def unwrap(model: torch.nn.Module) -> None:
    """Put the trained Linear layers back in place of their wrappers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.linear)


@torch.no_grad()
def calibrate(model, wrapped: list[FakeQuantLinear], tokenizer, texts: list[str], max_length: int, device) -> None:
    """Each wrapped layer's input range: min and max over `texts`, each at its own length (the static
    recipe's minmax)."""
    for fake in wrapped:
        fake.calibrating = True
    encodings = tokenize(tokenizer, texts, max_length)
    for i in range(len(texts)):
        model(**model_inputs(collate(encodings, [i], tokenizer), device))
    for fake in wrapped:
        fake.calibrating = False


def distil(model, tokenizer, quantized_nodes: list[str], texts: list[str], calibration_texts: list[str],
           max_length: int, steps: int, learning_rate: float, reduce_range: bool, seed: int) -> dict:
    """Fine-tune `model` in place (fp32 weights, wrappers removed at the end) for `steps` batches of
    `texts` under simulated INT8 of `quantized_nodes`, against its own fp32 logits. Returns what it
    cost and how the KL loss moved."""
    if steps <= 0 or not texts:
        raise UserError(f"QAD needs steps > 0 and training texts (steps={steps}, {len(texts)} texts).")
    set_seed(seed)
    # fp32 whatever precision an earlier step of the pipeline's process trained in: the simulation is of INT8
    accelerator = step_accelerator(cpu=False, mixed_precision="no")
    reference = copy.deepcopy(model).eval()
    wrapped = wrap(model, sorted({module_name(node) for node in quantized_nodes}), 63 if reduce_range else 127)
    model.to(accelerator.device)
    calibrate(model, wrapped, tokenizer, calibration_texts, max_length, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    from transformers import get_linear_schedule_with_warmup

    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP_SHARE * steps), steps)
    model, reference, optimizer = accelerator.prepare(model, reference, optimizer)
    encodings = tokenize(tokenizer, texts, max_length)
    lengths = np.array([len(i) for i in encodings["input_ids"]])
    batches, losses, started, epoch = [], [], time.perf_counter(), 0
    model.eval()  # no dropout: the target is the fp32 model's own deterministic logits
    for _ in range(steps):
        if not batches:  # another pass over the texts, reshuffled
            batches, epoch = length_grouped_batches(lengths, BATCH_SIZE, seed + epoch), epoch + 1
        inputs = model_inputs(collate(encodings, batches.pop(), tokenizer), accelerator.device)
        with torch.no_grad():
            target = reference(**inputs).logits
        logits = model(**inputs).logits
        unlabelled = torch.full((len(logits),), UNLABELLED, device=logits.device)  # the KD term alone
        loss = distillation_loss(logits, unlabelled, target, TEMPERATURE, alpha=1.0)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model = accelerator.unwrap_model(model).eval().cpu()
    unwrap(model)
    tenth = max(1, steps // 10)
    return {"qad_steps": steps, "qad_texts": len(texts), "qad_epochs": epoch, "qad_seconds": time.perf_counter() - started,
            "qad_kl_first": float(np.mean(losses[:tenth])), "qad_kl_last": float(np.mean(losses[-tenth:])),
            "qad_quantized_layers": len(wrapped), "qad_device": str(accelerator.device)}


def qad_graph(fp32_dir: Path, unfused: Path, out: Path, texts: list[str], calibration_texts: list[str],
              max_length: int, steps: int, learning_rate: float, reduce_range: bool | None, seed: int) -> tuple[Path, dict]:
    """The QDQ INT8 graph of the QAD-trained model saved in `fp32_dir` (its export `unfused`), under
    `out`: (its path, the recipe with QAD's cost)."""
    import onnx

    from kd_sentiment.core.models import load_tokenizer
    from kd_sentiment.deploy import export, int8_recipes
    from kd_sentiment.core.machine import cpu_features
    from transformers import AutoModelForSequenceClassification

    graph = onnx.load(str(unfused), load_external_data=False).graph
    nodes = int8_recipes.static_matmuls(graph)
    narrow = int8_recipes.seven_bit_weights(cpu_features(), reduce_range)
    model = AutoModelForSequenceClassification.from_pretrained(fp32_dir)
    tokenizer = load_tokenizer(str(fp32_dir))
    cost = distil(model, tokenizer, nodes, texts, calibration_texts, max_length, steps, learning_rate, narrow, seed)
    model.save_pretrained(out / "fp32")
    tokenizer.save_pretrained(out / "fp32")
    exported = export.export_onnx(out / "fp32", out / "onnx")
    path, recipe = int8_recipes.quantize_onnx(exported.parent, out / "int8", "static", reduce_range=reduce_range,
                                              calibration_texts=calibration_texts, max_length=max_length)
    log.info("QAD: %d steps on %d texts in %.0f s, KL to fp32 %.4f -> %.4f", steps, len(texts), cost["qad_seconds"],
             cost["qad_kl_first"], cost["qad_kl_last"])
    return path, {**recipe, **cost, "qad_learning_rate": learning_rate, "qad_temperature": TEMPERATURE}
