"""The benchmark's measuring process: one per (model, backend), alive for the whole benchmark.

Started as `python -m kd_sentiment.measure.bench_worker BACKEND THREADS [RUNTIME]`, it imports that backend's runtime
and nothing else (ONNX rows: onnxruntime, numpy and `tokenizers`, as the served model does, never
torch or transformers; PyTorch rows: torch and transformers), measures its resident memory then,
and answers commands, one JSON object per line on stdin, one JSON answer per line on stdout
(anything libraries print goes to stderr):
  {"cmd": "load", "model": PATH, "tokenizer": PATH, "pad_token": T, "pad_id": N, "max_length": L}
      -> {"size_mb", "parameters"}
  {"cmd": "time", "texts": [...], "batch_size": B, "length": L|null, "warmup", "samples", "budget_s",
   "min_samples"} -> {"tokenize_ms": [...], "model_ms": [...]}   (length null: pad to the batch's longest)
  {"cmd": "memory"} -> {"runtime_rss_mb", "peak_rss_mb", "peak_gpu_mb"}
  {"cmd": "evaluate", "texts": [...]} -> {"logits": [[...], ...]}   (after "memory": it must not count)
  {"cmd": "exit"}
An error answers {"error": "..."} and ends the process.
"""
from __future__ import annotations

import json
import os
import sys

# PyTorch backends: name -> (device, dtype). The GPU ones are measured only where CUDA is available.
TORCH_BACKENDS = {"torch_fp32": ("cpu", "float32"), "torch_cuda_fp32": ("cuda", "float32"),
                  "torch_cuda_bf16": ("cuda", "bfloat16")}
EVAL_BATCH = 64  # texts per batch in the accuracy pass (real lengths)


class TorchModel:
    """A transformers classifier on the backend's device and dtype, with its tokenizer."""

    def __init__(self, backend: str, threads: int, spec: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch, (self.device, dtype) = torch, TORCH_BACKENDS[backend]
        torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(spec["model"])
        self.model.to(device=self.device, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        self.max_length = spec["max_length"]
        self.size_mb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def tokenize(self, texts: list[str], length: int | None):
        padding = "max_length" if length else True
        return dict(self.tokenizer(texts, padding=padding, truncation=True, max_length=length or self.max_length,
                                   return_tensors="pt"))

    def predict(self, encoded):
        with self.torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in encoded.items()}).logits
            return logits.float().cpu().numpy()  # the copy to the host waits for the GPU's kernels


class OnnxModel:
    """An ONNX graph in the runtime it is served with (ONNX Runtime, or OpenVINO in f32 or bf16) and a
    `tokenizers` tokenizer: what the served model runs."""

    def __init__(self, threads: int, spec: dict):
        import numpy as np
        from tokenizers import Tokenizer

        from kd_sentiment.deploy.onnx_session import Session

        self.np = np
        self.session = Session(spec["model"], spec.get("runtime", "onnxruntime"), spec.get("precision", "f32"), threads)
        self.inputs = set(self.session.input_names)
        self.tokenizer = Tokenizer.from_file(spec["tokenizer"])
        self.pad = {"pad_id": int(spec["pad_id"]), "pad_token": spec["pad_token"]}
        self.max_length = spec["max_length"]
        self.size_mb = os.path.getsize(spec["model"]) / 2**20
        self.parameters = None  # counting needs the whole graph in memory (onnx.load): not in this process

    def tokenize(self, texts: list[str], length: int | None):
        self.tokenizer.enable_truncation(max_length=length or self.max_length)
        self.tokenizer.enable_padding(length=length, **self.pad)
        encodings = self.tokenizer.encode_batch(texts)
        feed = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                "token_type_ids": [e.type_ids for e in encodings]}
        return {k: self.np.array(v, dtype=self.np.int64) for k, v in feed.items() if k in self.inputs}

    def predict(self, feed):
        return self.session.run(feed)


def serve(backend: str, threads: int, answer, runtime: str = "onnxruntime") -> None:
    """Import the runtime, then answer commands from stdin until "exit"."""
    if backend in TORCH_BACKENDS:
        import torch  # noqa: F401  (the runtime, imported before the baseline memory is read)
        import transformers  # noqa: F401
    else:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
        if runtime == "openvino":  # a model served by OpenVINO
            import openvino  # noqa: F401
    from kd_sentiment.core import machine, timing

    runtime_rss = machine.rss_mb()
    answer({"runtime_rss_mb": runtime_rss, "imports_torch": "torch" in sys.modules})
    model = None
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "load":
            model = TorchModel(backend, threads, request) if backend in TORCH_BACKENDS else OnnxModel(threads, request)
            answer({"size_mb": model.size_mb, "parameters": model.parameters})
        elif cmd == "time":
            texts, size = request["texts"], request["batch_size"]
            doubled = texts + texts

            def batch(i, texts=texts, size=size, doubled=doubled, length=request["length"]):
                start = (i * size) % len(texts)
                return model.tokenize(doubled[start:start + size], length)

            tokenize_ms, model_ms = timing.time_batches(batch, model.predict, request["warmup"], request["samples"],
                                                        request["budget_s"], request["min_samples"])
            answer({"tokenize_ms": tokenize_ms, "model_ms": model_ms})
        elif cmd == "memory":
            answer({"runtime_rss_mb": runtime_rss, "peak_rss_mb": machine.peak_rss_mb(),
                    "peak_gpu_mb": machine.peak_gpu_memory_mb(model.device) if isinstance(model, TorchModel) else None})
        elif cmd == "evaluate":
            texts = request["texts"]
            logits = [model.predict(model.tokenize(texts[i:i + EVAL_BATCH], None)).tolist()
                      for i in range(0, len(texts), EVAL_BATCH)]
            answer({"logits": [row for chunk in logits for row in chunk]})
        elif cmd == "exit":
            return


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # answers go here; stdout itself goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        serve(sys.argv[1], int(sys.argv[2]), answer, *sys.argv[3:4])
    except Exception as err:  # the parent shows it, with the model's name
        import traceback

        traceback.print_exc()
        answer({"error": f"{type(err).__name__}: {err}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
