"""Deployment: ONNX export, INT8 recipes and the candidate search, runtimes, the served model, and
the quantize, promote and score steps. Imports the core and training."""
