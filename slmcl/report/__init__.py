"""What researchers look at: the study's tables and figures of a results directory, and one HTML page.

``build_report(results_dir, out_dir)`` writes::

    OUT/index.html                 self-contained page (PNGs inline, no network), the spec and the environment
    OUT/tables/<name>.{md,csv,tex} task_acquisition, cl_metrics, stability, order_robustness
    OUT/figures/<name>.{png,svg}   kl_vs_accuracy, avg_accuracy_by_step, stability_trajectories,
                                   matrix_<model>_<strategy>_<order>, train_loss_<model>_<strategy>

Importing this package is cheap: matplotlib is imported only when a report is built.
"""

from __future__ import annotations

from slmcl.report.build import build_report
from slmcl.report.study import Study, load_study

__all__ = ["Study", "build_report", "load_study"]
