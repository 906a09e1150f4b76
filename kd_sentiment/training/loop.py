"""The one training loop, shared by the teacher step (alpha=0: cross-entropy) and distill (soft targets).

Built on accelerate (device placement, mixed precision, multi-process via torchrun) in the spirit
of accelerate's nlp_example.py. Batches are made by this module rather than by accelerate's
dataloader wrappers so that three things stay exact and simple:
  - each process takes every W-th batch of one seeded, length-grouped order (W = world size);
  - evaluation sees every example exactly once (results are keyed by example index);
  - a resumed run skips precisely the batches it already trained on.
Texts are tokenized once, padded per batch (dynamic padding), and grouped by length so short tweets
are not padded to the length of the longest review.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from kd_sentiment.core.metrics import classification_metrics
from kd_sentiment.core.errors import UserError
from kd_sentiment.training.losses import distillation_loss
from kd_sentiment.core.parameters import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    model: torch.nn.Module
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0


# ----------------------------------------------------------------------------- batches

def tokenize(tokenizer, texts, max_length: int):
    """Token ids per text, truncated to max_length, not padded (padding happens per batch)."""
    limit = tokenizer.model_max_length  # a huge sentinel (1e30) when the checkpoint does not say
    if limit and limit < 1_000_000 and max_length > limit:
        raise UserError(f"max_length={max_length}: {tokenizer.name_or_path or 'the model'} takes at most "
                        f"{limit} tokens per text; use max_length {limit} or less.")
    # Tokenizing once and padding per batch is deliberate; silence the "call __call__ instead" advice.
    tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    return tokenizer(list(texts), truncation=True, max_length=max_length)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int | None) -> list[np.ndarray]:
    """Batches of indices with similar lengths. With a seed: shuffle, sort within chunks of 50
    batches by length, then shuffle the batches (randomness kept, padding cut). Without: one
    sort by length (for evaluation)."""
    if seed is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(order, range(chunk, len(order), chunk))])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shard(batches: list, rank: int, world: int, pad: bool) -> list:
    """This process's share: every world-th batch. With pad, wrap around so every rank gets the same
    number of batches (DDP needs equal step counts); evaluation never pads."""
    if pad and len(batches) % world:
        batches = batches + batches[: world - len(batches) % world]
    return batches[rank::world]


def collate(encodings, indices, tokenizer, labels=None, teacher_logits=None) -> dict:
    features = [{k: encodings[k][i] for k in encodings.keys()} for i in indices]
    batch = dict(tokenizer.pad(features, return_tensors="pt"))
    batch["index"] = torch.as_tensor(indices)
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels[indices])
    if teacher_logits is not None:
        batch["teacher_logits"] = torch.as_tensor(teacher_logits[indices], dtype=torch.float32)
    return batch


def model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k not in ("index", "labels", "teacher_logits")}


# ----------------------------------------------------------------------------- prediction

@torch.no_grad()
def predict_logits(model, tokenizer, texts, max_length: int, batch_size: int = 64,
                   accelerator: Accelerator | None = None) -> np.ndarray:
    """Float32 logits (N, K) for `texts`, in input order, on the CPU.

    With an accelerator the model is moved to its device (a GPU, or the CPU under `--cpu true`) and
    runs under its mixed precision; without one it runs where it is. Under several processes each
    computes a share and all receive the full result, every example exactly once."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    model.to(device)
    encodings = tokenize(tokenizer, texts, max_length)
    lengths = np.array([len(ids) for ids in encodings["input_ids"]])
    model.eval()
    indices, outputs = [], []
    with accelerator.autocast() if accelerator else nullcontext():
        for batch_idx in shard(length_grouped_batches(lengths, batch_size, None), rank, world, pad=False):
            batch = collate(encodings, batch_idx, tokenizer)
            outputs.append(model(**model_inputs(batch, device)).logits.float().cpu())
            indices.append(batch["index"])
    num_labels = model.config.num_labels
    index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)
    logits = torch.cat(outputs) if outputs else torch.empty(0, num_labels)
    if world > 1:
        index = accelerator.gather(accelerator.pad_across_processes(index.to(device), pad_index=-1)).cpu()
        logits = accelerator.gather(accelerator.pad_across_processes(logits.to(device))).cpu()
        keep = index >= 0
        index, logits = index[keep], logits[keep]
    result = np.zeros((len(lengths), num_labels), dtype=np.float32)
    result[index.numpy()] = logits.numpy()
    assert len(np.unique(index.numpy())) == len(lengths), "every example must be predicted exactly once"
    return result


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict) -> None:
    """Full training state (weights, optimizer, scheduler, RNGs) plus loop position, swapped in
    atomically so a kill during saving leaves the previous checkpoint intact."""
    tmp, final = output_dir / "checkpoint.tmp", output_dir / "checkpoint"
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()


def read_checkpoint_state(output_dir: Path) -> dict | None:
    path = Path(output_dir) / "checkpoint" / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_identical_across_processes(model, accelerator: Accelerator) -> None:
    """DDP keeps replicas in sync by construction; verify it (one float64 checksum per process)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    everyone = accelerator.gather(checksum.to(accelerator.device)).cpu()
    if not torch.all(everyone == everyone[0]):
        raise RuntimeError(f"model weights differ across processes: checksums {everyone.tolist()}")


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainData:
    """What one training run learns from and is selected on."""

    texts: list[str]
    labels: np.ndarray
    val_texts: list[str]
    val_labels: np.ndarray
    label_names: list[str]
    selection_metric: str                    # the validation metric that picks the best epoch
    teacher_logits: np.ndarray | None = None  # soft targets aligned with `texts` (needed when alpha > 0)


@dataclass
class Checkpoints:
    """Where a run's checkpoints and best weights go, and whether to continue from the last one."""

    output_dir: Path
    resume: bool = False  # continue from output_dir/checkpoint if present (same data and config expected)
    extra_state: dict = field(default_factory=dict)  # stored in each checkpoint (the MLflow run id), read back


def optimizer_and_schedule(model, config: TrainConfig, total_steps: int):
    """AdamW (no weight decay on biases and LayerNorm) and a linear warm-up then linear decay to 0."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)


def start_state(accelerator: Accelerator, checkpoints: Checkpoints) -> dict:
    """The loop's position: fresh, or read from the last checkpoint (weights and optimizer restored)."""
    output_dir = Path(checkpoints.output_dir)
    if checkpoints.resume and read_checkpoint_state(output_dir):
        accelerator.load_state(str(output_dir / "checkpoint"))
        state = read_checkpoint_state(output_dir)
        if accelerator.is_main_process:
            log.info(f"Resuming from {output_dir / 'checkpoint'}: epoch {state['epoch']}, step {state['global_step']}")
        return state
    return {"epoch": 0, "batches_done": 0, "global_step": 0, "best_metric": -math.inf, "best_epoch": -1,
            "history": [], **checkpoints.extra_state}


def end_epoch(model, tokenizer, data: TrainData, config: TrainConfig, accelerator: Accelerator, state: dict,
              best_dir: Path, log_metrics: Callable[[dict, int], None]) -> None:
    """Evaluate on validation, keep the best epoch's weights in `best_dir`, record the history.
    (Eight parameters: the loop's pieces it reads, passed rather than bundled into an object.)"""
    epoch = state["epoch"] + 1
    val_logits = predict_logits(accelerator.unwrap_model(model), tokenizer, data.val_texts, config.max_length,
                                config.batch_size * 2, accelerator)
    metrics = classification_metrics(val_logits, data.val_labels, data.label_names)
    state["history"].append({"epoch": epoch, **metrics})
    if accelerator.is_main_process:
        log_metrics({f"history/val_{k}": v for k, v in metrics.items()}, epoch)
        log.info(f"epoch {epoch}: val {data.selection_metric}={metrics[data.selection_metric]:.4f}")
    if metrics[data.selection_metric] > state["best_metric"]:
        state["best_metric"], state["best_epoch"] = metrics[data.selection_metric], epoch
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(best_dir, safe_serialization=True)
    accelerator.wait_for_everyone()


def accumulation_group(i: int, batches: int, steps: int) -> tuple[int, bool]:
    """(the number of batches in the gradient-accumulation group of batch `i`, whether `i` ends it): groups
    of `steps` batches, the epoch's last one shorter, each group's loss averaged over its own batches."""
    group_end = min((i // steps + 1) * steps, batches)
    return group_end - (i // steps) * steps, i + 1 == group_end


def batch_loss(model, batch: dict, config: TrainConfig, device) -> torch.Tensor:
    """The distillation loss of one batch (cross-entropy alone where it has no teacher logits)."""
    logits = model(**model_inputs(batch, device)).logits
    teacher = batch.get("teacher_logits")
    return distillation_loss(logits.float(), batch["labels"].to(device), None if teacher is None else teacher.to(device),
                             config.temperature, config.alpha, config.label_smoothing)


def best_model(model, accelerator: Accelerator, best_dir: Path):
    """`model` with the best epoch's weights (checked identical across processes first), in eval mode."""
    if accelerator.num_processes > 1:
        check_identical_across_processes(model, accelerator)
    if best_dir.exists():
        from safetensors.torch import load_file
        model.load_state_dict(load_file(best_dir / "model.safetensors"))
    return model.eval()


def train(model, tokenizer, data: TrainData, config: TrainConfig, accelerator: Accelerator,
          checkpoints: Checkpoints, log_metrics: Callable[[dict, int], None] = lambda metrics, step: None) -> TrainResult:
    """Train `model`, evaluate on validation after each epoch, return it with the best epoch's weights.

    log_metrics: called on the main process with (metrics, step) for per-step loss and per-epoch
    validation metrics (`history/val_*`, step = epoch; final `val_*` are the caller's).
    """
    config.validate()
    if config.alpha > 0 and data.teacher_logits is None:
        raise UserError("alpha > 0 needs the teacher's logits (soft targets).")
    output_dir = Path(checkpoints.output_dir)
    set_seed(config.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    encodings = tokenize(tokenizer, data.texts, config.max_length)
    lengths = np.array([len(ids) for ids in encodings["input_ids"]])
    total_steps = config.optimizer_steps(len(lengths), world)
    model, optimizer, scheduler = accelerator.prepare(model, *optimizer_and_schedule(model, config, total_steps))
    state = start_state(accelerator, checkpoints)
    resumed_from = state["global_step"]
    best_dir = output_dir / "best"
    output_dir.mkdir(parents=True, exist_ok=True)

    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process,
                    desc="training")
    for epoch in range(state["epoch"], config.epochs):
        model.train()
        # The order depends only on seed and epoch, so a resumed run rebuilds it and skips ahead.
        my_batches = shard(length_grouped_batches(lengths, config.batch_size, config.seed + epoch), rank, world, pad=True)
        for i in range(state["batches_done"], len(my_batches)):
            batch = collate(encodings, my_batches[i], tokenizer, data.labels, data.teacher_logits)
            group_size, sync = accumulation_group(i, len(my_batches), config.gradient_accumulation_steps)
            with accelerator.no_sync(model) if not sync else nullcontext():
                loss = batch_loss(model, batch, config, accelerator.device)
                accelerator.backward(loss / group_size)
            if not sync:
                continue
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["global_step"] += 1
            state["batches_done"] = i + 1
            progress.update(1)
            if accelerator.is_main_process:
                log_metrics({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, state["global_step"])
            if config.checkpoint_every and state["global_step"] % config.checkpoint_every == 0 and i + 1 < len(my_batches):
                save_checkpoint(accelerator, output_dir, state)

        # End of epoch: evaluate, keep the best weights, checkpoint the position.
        end_epoch(model, tokenizer, data, config, accelerator, state, best_dir, log_metrics)
        state["epoch"], state["batches_done"] = epoch + 1, 0
        save_checkpoint(accelerator, output_dir, state)
    progress.close()
    model = best_model(accelerator.unwrap_model(model), accelerator, best_dir)
    return TrainResult(model, state["best_epoch"], state["best_metric"], state["history"], resumed_from)
