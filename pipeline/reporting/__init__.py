"""Reports, one module per job; each report has one entry point.

sweep_report   a sweep's Pareto-frontier report (`report_sweep`): tables, frontiers, plots, pages, logged to MLflow
search         a search's report (`report_search`): its outcome (`pipeline.search.outcome`) as documents and plots
summaries      the console tables printed after `run` and `sweep`
columns        which metric columns a report reads, per runtime (torch eager and each registered runtime)
sweep_tables   a sweep's runs read back from MLflow as pandas tables, with the Pareto frontiers
plots          the accuracy-vs-latency / -size plots: PNG (matplotlib) and interactive (plotly)
search_plots   a search's frontier and hypervolume plots
pages          report.md and report.html, and writing the report's files
latency        the side-by-side latency re-measure of a sweep's models
"""
