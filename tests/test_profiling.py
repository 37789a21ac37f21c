"""NVTX ranges: emitted through whichever bindings exist, balanced, and silent when off or traced."""
import torch

from ckaad_fast import profiling


class _Recorder:
    """Stands in for the nvtx package or torch.cuda.nvtx and logs what it is asked to do."""

    def __init__(self):
        self.calls = []

    def start_range(self, message, domain):
        self.calls.append(("start", message, domain))
        return len(self.calls)

    def end_range(self, rng):
        self.calls.append(("end", rng))

    def range_push(self, name):
        self.calls.append(("push", name))

    def range_pop(self):
        self.calls.append(("pop",))


def test_ranges_use_the_nvtx_package_in_its_domain(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    monkeypatch.setattr(profiling, "_enabled", True)
    assert profiling.nvtx_backend() == "nvtx"
    with profiling.nvtx_range("forward"):
        with profiling.nvtx_range("backbone"):
            pass
    assert rec.calls == [("start", "forward", "ckaad_fast"), ("start", "backbone", "ckaad_fast"), ("end", 2), ("end", 1)]


def test_without_the_package_cuda_builds_fall_back_to_torch_bindings(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(profiling, "_nvtx", None)
    monkeypatch.setattr(profiling, "_enabled", True)
    if not hasattr(torch._C, "_nvtx"):
        assert profiling.nvtx_backend() is None and not profiling.nvtx_enabled()
        return
    monkeypatch.setattr(torch.cuda, "nvtx", rec)
    assert profiling.nvtx_backend() == "torch.cuda.nvtx"
    try:
        with profiling.nvtx_range("decode"):
            raise KeyError("a failing stage still closes its range")
    except KeyError:
        pass
    assert rec.calls == [("push", "decode"), ("pop",)]


def test_off_by_default_and_switchable_by_environment(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    monkeypatch.setattr(profiling, "_enabled", None)
    monkeypatch.delenv("CKAAD_FAST_NVTX", raising=False)
    with profiling.nvtx_range("copy"):
        pass
    assert rec.calls == []
    monkeypatch.setenv("CKAAD_FAST_NVTX", "1")
    with profiling.nvtx_range("copy"):
        pass
    assert [c[0] for c in rec.calls] == ["start", "end"]


def test_ranges_step_aside_while_compiling(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    monkeypatch.setattr(profiling, "_enabled", True)

    def f(x):
        with profiling.nvtx_range("inside"):
            return x * 2

    out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert rec.calls == []
