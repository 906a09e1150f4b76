"""Model catalog and loading: names -> sources -> (classifier, tokenizer), plus layer cuts.

A *source* is any of:
  - a catalog name (`roberta-large`, `distilbert`, `minilm`, `tinybert`, ...),
  - a Hugging Face Hub id or a local model folder,
  - either of those followed by `#layers=0,2,4` or `#layers=every-other`: the model with only those
    encoder layers kept (DistilBERT's initialisation: a student cut from a bigger model, no
    download needed); `every-other` keeps layers 0, 2, 4, ... of whatever depth the model has.
Two cuts name the distill step's teacher, so a catalog entry stays right whatever teacher is registered:
  - `teacher-layers:0,2,4` / `teacher-layers:every-other`: the teacher's *pre-trained* source (the
    model it was fine-tuned from), cut, as DistilBERT cut pre-trained BERT; a new classifier head;
  - `finetuned-teacher-layers:...`: the registered, fine-tuned teacher itself, cut, head included.

The built-in catalog points at the Hub (the paper setting). A YAML file (parameter `catalog`, or
KD_SENTIMENT_CATALOG) overrides it, e.g. `experiments/catalog-offline.yaml` maps the same names
to local folders; `${VAR}` in its values is expanded from the environment.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from kd_sentiment.core.errors import UserError

CATALOG_ENV = "KD_SENTIMENT_CATALOG"

DEFAULT_CATALOG = {
    "teacher": "roberta-large",
    "students": ["distilbert", "minilm", "tinybert"],
    "models": {
        "roberta-large": "roberta-large",
        "distilbert": "distilbert-base-uncased",
        "minilm": "microsoft/MiniLM-L12-H384-uncased",
        "tinybert": "huawei-noah/TinyBERT_General_4L_312D",
    },
}


def read_yaml(file: Path, what: str, allowed) -> dict:
    """A YAML mapping whose top-level keys must be in `allowed`, with errors that name the file."""
    if not file.is_file():
        raise UserError(f"{what} {file}: file not found.")
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{what} {file}: not valid YAML ({err}).") from None
    if not isinstance(content, dict):
        raise UserError(f"{what} {file}: expected a mapping of keys {sorted(allowed)}.")
    unknown = set(content) - set(allowed)
    if unknown:
        raise UserError(f"{what} {file}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
    return content


def load_catalog(path: str | None = None) -> dict:
    """The catalog in force: built-in, overridden key by key by the YAML at `path` or $KD_SENTIMENT_CATALOG."""
    path = path or os.environ.get(CATALOG_ENV)
    catalog = {**DEFAULT_CATALOG, "models": dict(DEFAULT_CATALOG["models"])}
    if not path:
        return catalog
    file = Path(path).expanduser()
    override = read_yaml(file, "catalog", DEFAULT_CATALOG)
    catalog["models"].update({k: os.path.expandvars(str(v)) for k, v in (override.get("models") or {}).items()})
    for key in ("teacher", "students"):
        if key in override:
            catalog[key] = override[key]
    unset = [m for m in catalog["models"].values() if "$" in m]  # os.path.expandvars keeps unset ones
    if unset:
        raise UserError(f"catalog {file}: {unset} still hold an unset environment variable; "
                        "export it (see README, offline recipe).")
    return catalog


EVERY_OTHER = "every-other"  # a layer spec: layers 0, 2, 4, ... of the model's depth (half of it)
# Sources that name the distill step's teacher: its pre-trained source, or the fine-tuned teacher itself.
TEACHER_SOURCE, FINETUNED_TEACHER = "teacher", "finetuned-teacher"
TEACHER_CUTS = {"teacher-layers:": TEACHER_SOURCE, "finetuned-teacher-layers:": FINETUNED_TEACHER}


def split_layers(source: str) -> tuple[str, list[int] | str | None]:
    """`path#layers=0,2,4` -> ('path', [0, 2, 4]); `path#layers=every-other` -> ('path', 'every-other');
    `teacher-layers:X` -> ('teacher', X) (likewise finetuned-teacher); a plain source -> (source, None)."""
    for prefix, name in TEACHER_CUTS.items():
        if source.startswith(prefix):
            source = f"{name}#layers={source[len(prefix):]}"
    if "#layers=" not in source:
        return source, None
    base, spec = source.split("#layers=", 1)
    if spec.strip() == EVERY_OTHER:
        return base, EVERY_OTHER
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"'{source}': layers must be comma-separated integers, e.g. #layers=0,2,4, "
                        f"or {EVERY_OTHER}.") from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise UserError(f"'{source}': layers must be distinct non-negative integers.")
    return base, sorted(layers)


def with_layers(source: str, layers: list[int] | str | None) -> str:
    """The source string of `source` cut to `layers`: the inverse of split_layers."""
    if not layers:
        return source
    return f"{source}#layers={layers if isinstance(layers, str) else ','.join(map(str, layers))}"


def resolve(name: str, catalog: dict) -> tuple[str, list[int] | str | None]:
    """Map a catalog name or source string to (hub id or folder, layers to keep or None)."""
    base, layers = split_layers(name)
    if base in catalog["models"]:
        base, inner = split_layers(catalog["models"][base])
        layers = layers or inner
    return base, layers


def encoder_layers(model):
    """The ModuleList of transformer blocks, for BERT/RoBERTa/MPNet (encoder.layer) and DistilBERT."""
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer"):
        module = base
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if module is not None:
            return module
    raise UserError(f"Cannot cut layers from a {type(model).__name__}: no encoder.layer or transformer.layer.")


def layer_indices(layers: list[int] | str, depth: int) -> list[int]:
    """The encoder layers a spec keeps of a model with `depth` layers (`every-other`: 0, 2, 4, ...)."""
    return list(range(0, depth, 2)) if layers == EVERY_OTHER else list(layers)


def keep_layers(model, layers: list[int] | str):
    """Keep only `layers` of the encoder (indices, or `every-other`), in order, and record it in the
    config. Returns the model."""
    import torch

    blocks = encoder_layers(model)
    layers = layer_indices(layers, len(blocks))
    if max(layers) >= len(blocks):
        raise UserError(f"layers {layers}: the model has only {len(blocks)} layers (0..{len(blocks) - 1}).")
    kept = torch.nn.ModuleList([blocks[i] for i in layers])
    owner = model.base_model.encoder if hasattr(model.base_model, "encoder") else model.base_model.transformer
    owner.layer = kept
    key = "n_layers" if model.config.model_type == "distilbert" else "num_hidden_layers"
    setattr(model.config, key, len(layers))
    return model


def _load_error(source: str, err: Exception) -> UserError:
    if Path(source).expanduser().exists():
        return UserError(f"{source}: not a loadable model folder ({type(err).__name__}: {err}). "
                         "It needs config.json, weights and tokenizer files.")
    return UserError(f"Could not load '{source}' from the Hugging Face Hub ({type(err).__name__}). "
                     "Offline? Pass a local model folder, or run "
                     "`python ../shared/tools/offline_models.py MODELS_DIR` and use "
                     "`KD_SENTIMENT_CATALOG=experiments/catalog-offline.yaml` with KD_SENTIMENT_MODELS_DIR=MODELS_DIR.")


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None


def load_classifier(source: str, label_names: list[str], layers: list[int] | str | None = None):
    """A sequence classifier with `len(label_names)` outputs and `id2label` set, plus its tokenizer.

    A checkpoint whose head has another size (or no head, like a sentence encoder) gets a new,
    randomly initialised head of the right size.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise UserError(f"{source}: not a model folder (no config.json).")
    tokenizer = load_tokenizer(source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(label_names), ignore_mismatched_sizes=True,
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if layers:
        keep_layers(model, layers)
    return model, tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_example(config, seq_len: int) -> int:
    """Forward FLOPs of one example at `seq_len` tokens (multiply-add = 2 FLOPs), embeddings excluded.

    Per layer, with hidden size d and feed-forward size f:
      QKV and output projections 4*d*d, feed-forward 2*d*f  -> 2*(4*d*d + 2*d*f) * seq_len
      attention scores and weighted sum                     -> 2*(2*seq_len*seq_len*d)
    summed over layers; the classifier head is negligible and left out.
    """
    d = getattr(config, "hidden_size", None) or config.dim
    f = getattr(config, "intermediate_size", None) or config.hidden_dim
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    per_layer = 2 * (4 * d * d + 2 * d * f) * seq_len + 2 * (2 * seq_len * seq_len * d)
    return int(layers * per_layer)
