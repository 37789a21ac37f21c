"""Scoring images with a trained detector: the engine, and the results folder of ``ckaad-fast score``.

- :mod:`.decoding`: decoding files on DataLoader worker processes.
- :mod:`.engine`: :class:`Scorer`, the forward (compile, CUDA graphs) and the streams of files.
- :mod:`.results`: OUT/scores.csv, OUT/maps/, OUT/parts/, and reading them back for a resume.
- :mod:`.runner`: :func:`score_to_folder`; :mod:`.local`: its work in one process; :mod:`.sharded`:
  over a process group.

The names below are imported on first use (PEP 562): the results folder (results, runner, local,
manifest, monitor) needs no torch, so an exported model scored by :mod:`ckaad_fast.deployment`
writes the same folder in a process that has none.
"""
from ..lazy import exports

# Each public name, and the submodule that owns it.
__getattr__, __dir__, __all__ = exports(__name__, {
    "Scorer": "engine", "ScoreResult": "result",
    "CSV_NAME": "results", "MAP_FORMATS": "results", "MAPS_DIR": "results", "PARTS_DIR": "results",
    "SCALE_NAME": "results", "ScoreSummary": "results", "check_out": "results", "map_names": "results",
    "part_name": "results", "read_scores_csv": "results",
    "adopt_results": "runner", "score_to_folder": "runner",
})
