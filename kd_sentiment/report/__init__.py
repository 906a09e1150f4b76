"""The report: MLflow runs read back into the results page and its figures. Imports the core,
training, deploy and measure; the CLI, the pipeline and the study sit above it."""
