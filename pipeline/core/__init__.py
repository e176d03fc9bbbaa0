"""The model core every stage builds on: configs, models and their structure, artifacts, fixed weights, the one
training loop (precision, checkpoints, distributed), data, and pure metric functions. Imports neither `stages` nor
MLflow.
"""
