"""The main thread's alternate signal stack is large enough for the handlers that run on it
(ckaad_fast.signal_stack), here and in the CLI; and a soak of the runtimes' life cycle in one
process ends normally."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ckaad_fast.signal_stack import DEFAULT_BYTES, ensure_signal_stack, signal_stack_size

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack is asked through glibc")


@linux
def test_the_test_process_runs_on_a_large_alternate_stack():
    # pytest's faulthandler plugin installed its own (about 10 KB); conftest replaced it.
    assert signal_stack_size() >= DEFAULT_BYTES
    assert ensure_signal_stack() is False  # large enough already: nothing done


@linux
def test_faulthandlers_small_stack_is_replaced_and_signals_still_reach_python():
    code = textwrap.dedent("""
        import faulthandler, os, signal
        from ckaad_fast.signal_stack import DEFAULT_BYTES, ensure_signal_stack, signal_stack_size
        faulthandler.enable()
        small = signal_stack_size()
        assert 0 < small < DEFAULT_BYTES, small
        assert ensure_signal_stack() and signal_stack_size() == DEFAULT_BYTES
        seen = []
        signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [1]
        print("ok", small)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


@linux
def test_the_cli_process_gets_the_large_stack(monkeypatch):
    import ckaad_fast.cli as cli

    called = []
    monkeypatch.setattr(cli, "ensure_signal_stack", lambda: called.append(1))
    with pytest.raises(SystemExit):  # --version exits through argparse, after the set-up
        cli.main(["--version"])
    assert called  # faulthandler on, then its stack replaced, before the arguments are read


SOAK = """
import gc, sys, tempfile, warnings
from pathlib import Path
sys.path.insert(0, "tests")
warnings.simplefilter("ignore")
from helpers import tiny_checkpoint, write_pngs
from ckaad_fast.calibration import calibrate, normal_folder_set, write_calibration
from ckaad_fast.export import export
from ckaad_fast.model import model_from_checkpoint
from ckaad_fast.scoring import Scorer

tmp = Path(tempfile.mkdtemp())
ckpt = tiny_checkpoint(tmp / "m.pt", 32)
folder = write_pngs(tmp / "in", 24, 0, 32)
for round in range(2):
    for engine in ("torch", "onnxruntime", "openvino"):
        scorer = Scorer.from_checkpoint(ckpt, dtype="float32", engine=engine, num_workers=2, batch_size=4)
        assert sum(r.ok for r in scorer.score_folder(folder)) == 24
        del scorer
        gc.collect()
    model = model_from_checkpoint(ckpt)
    cal = calibrate(model, normal_folder_set(folder, 32, model.config.mean, model.config.std), target_fpr=0.1,
                    precision="int8")
    write_calibration(ckpt, cal)
    export(ckpt, tmp / f"x{round}", "openvino", overwrite=True)
    int8 = Scorer.from_checkpoint(ckpt, num_workers=2, batch_size=4)
    assert int8.precision == "int8" and sum(r.ok for r in int8.score_folder(folder)) == 24
    del model, cal, int8
    gc.collect()
print("soak done")
"""


@pytest.mark.slow
def test_soak_every_engine_int8_and_export_in_one_process_under_faulthandler(tmp_path):
    # What a scoring process lives through, twice over, with worker processes (SIGCHLD) and the
    # runtimes' objects collected between rounds, faulthandler on as in the CLI: it ends by itself.
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env_cache = {"CKAAD_FAST_CACHE": str(tmp_path / "cache")}
    import os

    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                          "from ckaad_fast.signal_stack import ensure_signal_stack; ensure_signal_stack()\n" + SOAK],
                         cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, **env_cache})
    assert out.returncode == 0 and "soak done" in out.stdout, out.stderr[-3000:]
