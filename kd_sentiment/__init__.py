"""kd_sentiment: distil large sentiment classifiers into small, fast INT8 students, tracked with MLflow."""

__version__ = "0.1.0"
