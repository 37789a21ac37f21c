"""What an experiment is and which training runs it takes: :class:`Experiment` and :class:`RunSpec`.

One :class:`Experiment` is one table of the paper on one data set. Its :meth:`Experiment.plan`
lists the runs, each a :class:`RunSpec` with a stable ``run_id`` (the folder its checkpoint goes
to and the key that marks it finished), by the paper's protocols:

- **class-labelled data** (``folder``, ``isic2018``, ``br35h``; Table 1, Figure 2, Table 3's
  medical columns): for each r_l > 0 and k = 1, one run per anomaly class j, its labelled
  anomalies drawn from class j only (the mean over j is reported); for k > 1, ``draws`` runs,
  each on k classes drawn at random (draw d always draws the same classes, so every strategy and
  r_l sees the same draws). r_l = 0 needs no class: one run (strategies that use anomalies then
  train on elastic pseudo-anomalies, as ``ckaad-fast train`` does). A strategy that uses no anomalies
  (``recon``) runs once, at the first r_l, since the labelled anomalies cannot change it.
- **industrial data** (``mvtec``, ``visa``; Table 2, Table 3's MVTec columns): one run per
  category, with the elastic pseudo-anomalies of the paper (or ``anomaly_dir``).

Every run is repeated for each seed; tables report the mean and standard deviation over seeds.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.registry import LAYOUT_TABLE
from ..errors import ArgumentError
from ..strategies import STRATEGIES, get_strategy
from ..training import PROTOCOLS

__all__ = ["DEFAULT_SEEDS", "TABLES", "CLASS_LAYOUTS", "INDUSTRIAL_LAYOUTS", "TABLE1_RATIOS", "Experiment", "RunSpec"]

#: The seeds an experiment runs when told none (see Experiment).
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: The tables an experiment can make.
TABLES = ("table1", "table2", "table3")
# Views of the layout table (ckaad_fast.data.LAYOUT_TABLE): the class-labelled (medical
# protocol) layouts and the industrial ones.
CLASS_LAYOUTS = tuple(name for name, spec in LAYOUT_TABLE.items() if spec.class_labelled)
INDUSTRIAL_LAYOUTS = tuple(name for name, spec in LAYOUT_TABLE.items() if spec.domain == "industrial")
#: The r_l of the paper's Table 1.
TABLE1_RATIOS = (0.0, 0.01, 0.02, 0.05)
#: Table 3's r_l on class-labelled data (k = 1).
TABLE3_RATIO = 0.05
#: The rows of each table by default: Table 1 compares the method with its Recon baseline (the
#: paper's other rows are other methods), Table 2 is the method alone, Table 3 all five strategies.
TABLE_STRATEGIES = {"table1": ("recon", "cka_patch"), "table2": ("cka_patch",), "table3": STRATEGIES}
#: The training settings an experiment may set for all its runs (:class:`~ckaad_fast.training.TrainConfig` fields).
SETTINGS = ("backbone", "layers", "weights", "image_size", "tile_size", "tile_stride", "memory_candidates", "memory_norm_cell", "epochs", "batch_size", "ae_lr", "d_lr", "lam", "gamma",
            "alpha", "margin", "device", "amp", "compile", "num_workers")


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment."""

    category: str | None
    strategy: str
    ratio_labeled: float
    anomaly_classes: tuple[str, ...]
    seed: int
    draw: int | None = None

    @property
    def run_id(self) -> str:
        """A name unique within the experiment, safe as a folder name."""
        classes = "+".join(self.anomaly_classes) or "none"
        if self.draw is not None:
            classes = f"draw{self.draw}-{classes}"
        parts = [self.category or "data", self.strategy, f"rl{self.ratio_labeled:g}", classes, f"seed{self.seed}"]
        return "__".join(re.sub(r"[^A-Za-z0-9.+-]", "_", p) for p in parts)


@dataclass
class Experiment:
    """One table on one data set. ``settings`` are TrainConfig fields applied to every run on top
    of the layout's (and category's) defaults; see the module for the runs each table takes.

    Attributes:
        table: ``"table1"``, ``"table2"`` or ``"table3"``.
        layout, root: the data set (:func:`ckaad_fast.data.open_dataset`).
        categories: industrial layouts: the categories (None: every one found); class folders:
            at most one, a sub-folder of ``root``.
        normal_class: the normal class of ``layout="folder"``.
        strategies: the rows (None: :data:`TABLE_STRATEGIES`).
        ratios: the r_l of table1 (None: 0, 1%, 2%, 5%); table3 uses 5%.
        num_classes: k, the number of anomaly classes the labelled anomalies come from.
        draws: with k > 1, the number of random class draws averaged.
        seeds: one run per seed; mean ± std over them, and each strategy's paired difference to
            Recon with its 95% interval (:mod:`.paired`). Default :data:`DEFAULT_SEEDS`: five,
            the fewest whose interval (Student's t with 4 degrees of freedom, 2.78 standard
            errors) is narrow enough to tell apart strategies a couple of points apart on the
            synthetic sets (docs/REPRODUCING.md).
        protocol: ``"ours"`` or ``"reference"`` (the authors' loader, loss averaging and masks).
        anomaly_dir: industrial layouts: a folder of labelled anomalies instead of the
            pseudo-anomalies; ``{category}`` in it is replaced by each category.
    """

    table: str
    layout: str
    root: str
    categories: tuple[str, ...] | None = None
    normal_class: str | None = None
    strategies: tuple[str, ...] | None = None
    ratios: tuple[float, ...] | None = None
    num_classes: int = 1
    draws: int = 5
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    protocol: str = "ours"
    anomaly_dir: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from ..data import LAYOUTS

        if self.table not in TABLES:
            raise ArgumentError("table", f"must be one of {TABLES}, got {self.table!r}")
        if self.layout not in LAYOUTS:
            raise ArgumentError("layout", f"must be one of {LAYOUTS}, got {self.layout!r}")
        if self.table == "table1" and self.layout not in CLASS_LAYOUTS:
            raise ArgumentError("layout", f"table1 is the medical protocol: it needs a class-labelled layout "
                                f"{CLASS_LAYOUTS}, got {self.layout!r}")
        if self.table == "table2" and self.layout not in INDUSTRIAL_LAYOUTS:
            raise ArgumentError("layout", f"table2 is the industrial table: it needs layout mvtec or visa, "
                                f"got {self.layout!r}")
        self.root = os.fspath(self.root)
        self.categories = None if self.categories is None else tuple(self.categories)
        if self.categories is not None and self.layout in CLASS_LAYOUTS and len(self.categories) > 1:
            raise ArgumentError("categories", "a class-labelled data set takes at most one category (a sub-folder)")
        default = TABLE_STRATEGIES.get(self.table, STRATEGIES)
        self.strategies = tuple(self.strategies or default)
        for s in self.strategies:
            get_strategy(s)
        ratios = TABLE1_RATIOS if self.ratios is None else tuple(float(r) for r in self.ratios)
        if self.table == "table1":
            if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
                raise ArgumentError("ratios", f"each r_l must lie in [0, 1), got {ratios}")
            self.ratios = tuple(sorted(set(ratios)))
        else:
            self.ratios = (TABLE3_RATIO,) if self.layout in CLASS_LAYOUTS else (0.0,)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ArgumentError("num_classes", f"must be an int >= 1, got {self.num_classes!r}")
        if not isinstance(self.draws, int) or self.draws < 1:
            raise ArgumentError("draws", f"must be an int >= 1, got {self.draws!r}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ArgumentError("seeds", f"must be distinct ints, got {self.seeds}")
        if self.protocol not in PROTOCOLS:
            raise ArgumentError("protocol", f"must be one of {PROTOCOLS}, got {self.protocol!r}")
        unknown = [k for k in self.settings if k not in SETTINGS]
        if unknown:
            raise ArgumentError("settings", f"unknown training settings {unknown}; allowed: {SETTINGS}")

    @property
    def class_labelled(self) -> bool:
        return self.layout in CLASS_LAYOUTS

    def describe(self) -> dict:
        """What must stay the same for a resumed experiment to add to the same results."""
        return {"table": self.table, "layout": self.layout, "root": os.path.abspath(self.root),
                "normal_class": self.normal_class, "num_classes": self.num_classes, "protocol": self.protocol,
                "anomaly_dir": self.anomaly_dir, "settings": {k: _plain(v) for k, v in sorted(self.settings.items())}}

    # -- the runs ---------------------------------------------------------------------------------
    def plan(self, anomaly_classes: tuple[str, ...] | None = None,
             categories: tuple[str, ...] | None = None) -> list[RunSpec]:
        """The runs, in the order they are made (seed outermost, so that a partial experiment
        has whole seeds). ``anomaly_classes`` (class-labelled data) and ``categories`` (industrial
        data) are what the data set holds; :func:`~.runner.plan_experiment` reads them."""
        runs: list[RunSpec] = []
        for seed in self.seeds:
            if self.class_labelled:
                runs += self._class_runs(seed, tuple(anomaly_classes or ()))
            else:
                runs += [RunSpec(c, s, 0.0, (), seed) for c in (categories or ()) for s in self.strategies]
        return runs

    def _class_runs(self, seed: int, classes: tuple[str, ...]) -> list[RunSpec]:
        category = self.categories[0] if self.categories else None
        k = self.num_classes
        if not classes:
            raise ArgumentError("root", "the training split holds no anomalous class to draw labelled anomalies from")
        if k > len(classes):
            raise ArgumentError("num_classes", f"k = {k} but the data set has {len(classes)} anomaly classes {classes}")
        if k == 1:
            groups = [((c,), None) for c in classes]
        else:
            groups = [(class_draw(classes, k, d), d) for d in range(self.draws)]
        runs = []
        for strategy in self.strategies:
            uses = get_strategy(strategy).uses_anomalies
            for r in (self.ratios if uses else self.ratios[:1]):
                if r == 0.0 or not uses:
                    runs.append(RunSpec(category, strategy, r, (), seed))
                else:
                    runs += [RunSpec(category, strategy, r, g, seed, d) for g, d in groups]
        return runs


def class_draw(classes: tuple[str, ...], k: int, draw: int) -> tuple[str, ...]:
    """The k classes of random draw ``draw``: the same for every seed, strategy and r_l, so that
    their means compare the same draws (sorted)."""
    order = np.random.default_rng([7919, int(draw)]).permutation(len(classes))
    return tuple(sorted(classes[i] for i in order[:k]))


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
