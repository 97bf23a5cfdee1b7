"""The run report: ``report.md`` and PNG plots in the run folder, from a run's results.json.

    from cl_core.continual.report import write_report
    write_report(results, out_dir)      # results: the dict of results.json

analysis   comparisons against the seeds' spread, conclusions, whether each task was learned, the
           regime each EMA method ran in
plots      the PNG plots (matplotlib, Agg backend)
markdown   report.md
"""
from cl_core.continual.methods import COMPARISONS
from cl_core.continual.report.analysis import (COMPARED_METRICS, LEARNED_AT, comparisons, conclusions, learned,
                                               out_of_regime, regime_lines, regime_report, shortfalls, summary)
from cl_core.continual.report.markdown import write_report
from cl_core.continual.report.plots import (alpha_series, plot_alpha, plot_alpha_hist, plot_heatmap,
                                            plot_per_task)

__all__ = ["COMPARED_METRICS", "COMPARISONS", "LEARNED_AT", "alpha_series", "comparisons", "conclusions", "learned",
           "out_of_regime", "plot_alpha", "plot_alpha_hist", "plot_heatmap", "plot_per_task", "regime_lines",
           "regime_report", "shortfalls", "summary",
           "write_report"]
