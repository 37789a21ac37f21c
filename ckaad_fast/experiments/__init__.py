"""The paper's experiments, runnable: a whole table from one call, resumable run by run.

- :mod:`.plan`: :class:`Experiment` (one table on one data set) and the :class:`RunSpec` of each
  training run it takes, by the paper's protocols (per-class runs for k = 1, class draws for
  k > 1, seeds).
- :mod:`.single`: one run: the validation split and labelled anomalies of the medical protocol,
  training, test metrics with F1/ACC at both thresholds, the per-defect-type breakdown.
- :mod:`.runner`: :func:`run_experiment`, every unfinished run into one folder, with the results
  CSV and the Markdown table rewritten after each.
- :mod:`.tables`: the averaging (classes or categories within a seed, then mean ± std over seeds)
  and the tables in the paper's format.

Example (Table 3 on MVTec AD's bottle, three seeds)::

    from ckaad_fast.experiments import Experiment, run_experiment
    exp = Experiment("table3", "mvtec", "/data/mvtec", categories=("bottle",), seeds=(0, 1, 2))
    rows = run_experiment(exp, "experiments/table3-bottle")
"""
from .figures import figure2
from .paired import PairedDifference, paired_difference
from .plan import (
    CLASS_LAYOUTS,
    DEFAULT_SEEDS,
    INDUSTRIAL_LAYOUTS,
    SETTINGS,
    TABLE1_RATIOS,
    TABLES,
    Experiment,
    RunSpec,
    class_draw,
)
from .runner import plan_experiment, read_results, run_experiment, write_outputs
from .single import run_config, run_one
from .tables import INDUSTRIAL_COLUMNS, MEDICAL_COLUMNS, STRATEGY_NAMES, aggregate, markdown

__all__ = [
    "CLASS_LAYOUTS",
    "DEFAULT_SEEDS",
    "PairedDifference",
    "figure2",
    "paired_difference",
    "INDUSTRIAL_COLUMNS",
    "INDUSTRIAL_LAYOUTS",
    "MEDICAL_COLUMNS",
    "SETTINGS",
    "STRATEGY_NAMES",
    "TABLE1_RATIOS",
    "TABLES",
    "Experiment",
    "RunSpec",
    "aggregate",
    "class_draw",
    "markdown",
    "plan_experiment",
    "read_results",
    "run_config",
    "run_experiment",
    "run_one",
    "write_outputs",
]
