"""The reports behind `pipeline.reporting.report`, one module per job.

columns        which metric columns a report reads, per runtime (torch eager, ONNX Runtime, OpenVINO)
formatting     how numbers are written: bytes with units, a missing value as "–"
summaries      the console tables printed after `run` and `sweep`
sweep_tables   a sweep's runs read back from MLflow as pandas tables, with the Pareto frontiers
plots          the accuracy-vs-latency / -size plots: PNG (matplotlib) and interactive (plotly)
pages          report.md and report.html, and writing the report's files
latency        the side-by-side latency re-measure of a sweep's models
"""
