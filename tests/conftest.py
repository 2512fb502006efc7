"""Shared test setup.

* Without a CUDA device the Triton kernels run through Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is
  set here, before anything imports triton.
* Every test starts from a fixed seed.
* On CPU torch runs on one thread: the test models are tiny, and intra-op threads only add overhead (and make
  timings swing wildly on a shared 2-core machine); so do the subprocesses tests start (``OMP_NUM_THREADS``).
  ``VSPEC_TEST_THREADS`` overrides. The README's command runs the tests in parallel processes (pytest-xdist).
* ``poison`` fills a fresh output buffer with NaN (floats) or −1 (integers) so unwritten elements fail.
"""

import os


def _cuda_present() -> bool:
    # Importing torch does not import triton; checking CUDA here is safe before the env var is set.
    import torch

    return torch.cuda.is_available()


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("VSPEC_TEST_THREADS", "1")))
    # The same for the subprocesses some tests start (the CLI, bench/gpu_check.sh --smoke): under pytest-xdist
    # every worker's subprocess would otherwise take every core.
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("VSPEC_TEST_THREADS", "1"))


# The slowest test files (seconds of work on the 2-core CPU, 2026-12-03), collected first so that pytest-xdist
# (`--dist loadfile`, files handed out in collection order) starts them first and no worker is left running one of
# them alone at the end. Order inside a file is kept.
SLOW_FIRST = ("test_cli.py", "test_gpu_check.py", "runtime/test_parallel.py", "runtime/test_engine.py",
              "kernels/test_verify.py", "runtime/test_generation.py", "runtime/test_qwen3_5.py",
              "runtime/test_vocab.py", "runtime/test_static_state.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(SLOW_FIRST) if path.endswith(name)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order within a file is unchanged


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with a value no correct kernel writes: NaN for floats, −1 for integers."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-1)


@pytest.fixture
def poison():
    return poison_


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three H.264 clips of known length, ``(path, frames, fps)`` (the processor-path tests, in and out of their
    subprocess)."""
    from vspec.testing import write_video

    root = tmp_path_factory.mktemp("clips")
    out = []
    for i, (n, fps) in enumerate(((40, 8), (12, 4), (20, 10))):  # 5 s, 3 s, 2 s
        path = root / f"clip{i}.mp4"
        write_video(path, num_frames=n, fps=fps, seed=i)
        out.append((path, n, fps))
    return out
