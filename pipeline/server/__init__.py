"""The team server: a PostgreSQL cluster in a folder of the project's, MLflow's tracking server (with its artifact
proxy and, optionally, its basic-auth app) on it, and the databases Optuna's studies share. Nothing here runs a
stage; the pipeline reaches the server through `pipeline.tracking` (MLflow) and Optuna's RDB storage like any
other client."""
