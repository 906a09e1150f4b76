"""An ONNX graph opened on the CPU, safe to call from many threads at once.

The scoring server of `mlflow models serve` runs `predict` in a thread pool, so one server process
runs several predictions at the same time. ONNX Runtime's `InferenceSession.run` is safe to call
concurrently. An OpenVINO `InferRequest` is not: two threads inferring on one request get "busy"
errors or each other's outputs. So every call takes an idle request from a pool, or creates one when
none is idle, and hands it back when done: requests are reused (their buffers stay allocated), and
there are never more of them than calls were in flight at the busiest moment. The README's serving
part (Step 3) has the per-call cost of this pool against a request per call and a request per thread.

This file imports numpy and the runtime it opens, nothing of kd_sentiment: the served model carries
it beside served_model.py (MLflow `code_paths`), and the benchmark's ONNX worker opens graphs with it
without importing torch or MLflow.
"""
from __future__ import annotations

import os
import queue

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")  # what a runtime computes in; an INT8 graph's precision is in the graph


class Session:
    """One ONNX graph opened by `runtime`: ONNX Runtime, or OpenVINO (which reads the same ONNX file
    and computes in `precision`, bf16 on CPUs with AVX512_BF16 or AMX). `threads` 0 leaves the
    runtime's default (a thread per core). `run` may be called from any number of threads at once.
    A bad runtime or precision is a ValueError, a missing file a FileNotFoundError."""

    def __init__(self, model_path, runtime: str = "onnxruntime", precision: str = "f32", threads: int = 0):
        if runtime not in RUNTIMES or precision not in PRECISIONS:
            raise ValueError(f"runtime={runtime!r}, precision={precision!r}: use one of {RUNTIMES} and {PRECISIONS}.")
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: ONNX model not found.")
        self.runtime = runtime
        if runtime == "openvino":
            import openvino as ov

            # No pinning: OpenVINO pins its inference threads to cores as if it owned the machine, and the
            # processes that share these cores (Spark tasks, server workers) then all land on the same core.
            config = {"INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": False,
                      **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
            self.compiled = ov.Core().compile_model(model_path, "CPU", config)
            self.idle = queue.SimpleQueue()  # InferRequests no call is using
            self.input_names = [port.get_any_name() for port in self.compiled.inputs]
            self.num_labels = self.compiled.outputs[0].get_partial_shape()[-1].get_length()
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.num_labels = self.session.get_outputs()[0].shape[-1]

    def run(self, feed: dict) -> np.ndarray:
        """Logits of one tokenized batch (int64 arrays by input name; names the graph lacks are ignored)."""
        inputs = {name: np.asarray(feed[name], dtype=np.int64) for name in self.input_names}
        if self.runtime != "openvino":
            return self.session.run(None, inputs)[0]
        try:
            request = self.idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # a copy: the request's output buffer is overwritten by the next call that takes it
            return np.array(request.infer(inputs)[self.compiled.outputs[0]])
        finally:
            self.idle.put(request)
