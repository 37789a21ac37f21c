import os

# Triton's interpreter must be on before any @triton.jit is defined, i.e. before ckaad_fast is
# imported: it lets CI, which has no GPU, run the kernels themselves on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The runtime engines' exported graphs go to a folder of this test session, never the user's cache
# (subprocesses inherit it).
if "CKAAD_FAST_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CKAAD_FAST_CACHE"] = tempfile.mkdtemp(prefix="ckaad_fast_test_cache.")
    atexit.register(shutil.rmtree, os.environ["CKAAD_FAST_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=12,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionstart(session):
    # After pytest's faulthandler plugin gave the main thread its small alternate signal stack:
    # the DataLoader workers' SIGCHLD handler overflowed it (ckaad_fast.signal_stack).
    from ckaad_fast.signal_stack import ensure_signal_stack

    ensure_signal_stack()


def pytest_addoption(parser):
    parser.addoption("--shuffle", type=int, default=None, metavar="SEED",
                     help="run the test files in an order shuffled with SEED, and each file's tests too "
                          "(order-dependence checks; the reliability issue's crash appeared in one order only)")


def pytest_collection_modifyitems(config, items):
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    import random

    rng = random.Random(seed)
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module.__name__ if item.module else "", []).append(item)
    order = list(modules)
    rng.shuffle(order)
    items[:] = [it for name in order for it in rng.sample(modules[name], len(modules[name]))]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: starts subprocesses (torchrun, the CLI, benchmark scripts, examples, ptxas); "
        "python -m pytest tests -m 'not slow' runs the rest in under 3 minutes",
    )


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the CI machine has 2 cores shared with other jobs (two
    threads spin-wait on each other), and torchrun workers run with OMP_NUM_THREADS=1, so
    in-process references must match them. Modules that need it use
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _large_signal_stack_kept():
    """Every test leaves the process on a large alternate signal stack: a library that puts a
    small one back (OpenVINO's first compile did: ckaad_fast.runtimes) makes a later test crash
    when a DataLoader worker exits (ckaad_fast.signal_stack). The test that did it fails here,
    whatever order the tests run in, and the stack is made large again for the next."""
    from ckaad_fast.signal_stack import DEFAULT_BYTES, ensure_signal_stack, signal_stack_size

    yield
    size = signal_stack_size()
    if size is not None and 0 < size < DEFAULT_BYTES:
        ensure_signal_stack()
        pytest.fail(f"this test left a {size}-byte alternate signal stack (want {DEFAULT_BYTES}): whatever "
                    "shrank it must call ckaad_fast.signal_stack.ensure_signal_stack() after")
