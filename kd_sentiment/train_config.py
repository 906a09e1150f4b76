"""Training hyperparameters, in a module of their own so the CLI can build its flags (and reject
bad values) without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, fields

from kd_sentiment.errors import UserError


@dataclass
class TrainConfig:
    """Hyperparameters of one training run. Every field is a CLI flag and an MLflow param."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 42
    checkpoint_every: int = 100  # optimizer steps between checkpoints; 0: only at epoch ends
    temperature: float = 2.0     # distillation temperature (unused when alpha == 0)
    alpha: float = 0.0           # weight of the soft-target loss; 0 = plain fine-tuning
    label_smoothing: float = 0.0  # on the hard-label cross-entropy; > 0 makes a less confident model

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TrainConfig":
        """The config a run was trained with, from its MLflow params (strings); fields the run
        predates keep their defaults."""
        return cls(**{f.name: type(f.default)(params[f.name]) for f in fields(cls) if f.name in params})

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "lr", "max_length", "gradient_accumulation_steps", "temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)}: must be greater than 0.")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha={self.alpha}: must lie in [0, 1].")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing={self.label_smoothing}: must lie in [0, 1).")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio={self.warmup_ratio}: must lie in [0, 1).")
        if self.weight_decay < 0 or self.checkpoint_every < 0:
            raise UserError("weight_decay and checkpoint_every must not be negative.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16.")
