"""The shared core: data, models and the catalog, MLflow tracking and the registry, every step's
parameters and configs, metrics, statistics, timing and machine facts. Imports nothing else of kd_sentiment."""
