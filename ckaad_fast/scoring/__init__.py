"""Scoring images with a trained detector: the engine, and the results folder of ``ckaad-fast score``.

- :mod:`.decoding`: decoding files on DataLoader worker processes.
- :mod:`.engine`: :class:`Scorer`, the forward (compile, CUDA graphs) and the streams of files.
- :mod:`.results`: OUT/scores.csv, OUT/maps/, OUT/parts/, and reading them back for a resume.
- :mod:`.runner`: :func:`score_to_folder`; :mod:`.local`: its work in one process; :mod:`.sharded`:
  over a process group.
"""
from .engine import ScoreResult, Scorer
from .results import (
    CSV_NAME,
    MAP_FORMATS,
    MAPS_DIR,
    PARTS_DIR,
    SCALE_NAME,
    ScoreSummary,
    check_out,
    map_names,
    part_name,
    read_scores_csv,
)
from .runner import adopt_results, score_to_folder

__all__ = [
    "adopt_results",
    "CSV_NAME",
    "MAP_FORMATS",
    "MAPS_DIR",
    "PARTS_DIR",
    "SCALE_NAME",
    "ScoreResult",
    "ScoreSummary",
    "check_out",
    "Scorer",
    "map_names",
    "part_name",
    "read_scores_csv",
    "score_to_folder",
]
