"""Measurement: the benchmark and its worker process, and the load test of a served model. Imports
the core, training and deploy."""
