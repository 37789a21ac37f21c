"""Training CKAAD and the ablation strategies of the paper's Table 3.

- :mod:`.config`: :class:`TrainConfig`, the paper's per-domain defaults and the resume rule
  (:func:`resolve_config`).
- :mod:`.module`: :class:`CKAAD`, the scoring detector plus its strategy's discriminator.
- :mod:`.trainer`: :class:`Trainer`, one D step and one G step; what each strategy computes is
  in :mod:`ckaad_fast.strategies`.
- :mod:`.loaders`: the loaders of every epoch, their seeds, the RNG states of a checkpoint.
- :mod:`.loop`: :func:`train`, the epochs, the checkpoint and the log.
"""
from ..model import CHECKPOINT_NAME
from ..strategies import STRATEGIES, FusedLosses
from .config import (
    AMP_MODES,
    CATEGORY_DEFAULTS,
    DOMAIN_DEFAULTS,
    LAYOUT_DEFAULTS,
    LAYOUT_DOMAINS,
    LOG_NAME,
    PROTOCOLS,
    RUN_FIELDS,
    TrainConfig,
    resolve_config,
)
from .loop import TrainResult, train
from .module import CKAAD, ckaad_from_checkpoint
from .trainer import Trainer

__all__ = [
    "AMP_MODES",
    "CATEGORY_DEFAULTS",
    "CHECKPOINT_NAME",
    "CKAAD",
    "ckaad_from_checkpoint",
    "DOMAIN_DEFAULTS",
    "LAYOUT_DEFAULTS",
    "LAYOUT_DOMAINS",
    "LOG_NAME",
    "PROTOCOLS",
    "RUN_FIELDS",
    "STRATEGIES",
    "FusedLosses",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "resolve_config",
    "train",
]
