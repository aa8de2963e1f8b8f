"""Test setup. ``TRITON_INTERPRET=1`` is set before anything imports triton so the Triton kernels run
on CPU tensors through the interpreter (correctness only) on machines without a GPU."""
import os

if not __import__("shutil").which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# self-check verdicts (sparsefast.backends.selfcheck) go to a per-run directory, not the user's
# ~/.cache: every run checks the kernel families it uses afresh and leaves nothing behind
if "SPARSEFAST_CACHE_DIR" not in os.environ:
    os.environ["SPARSEFAST_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="sparsefast-tests-")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_warnings():
    """Forget which fallback warnings were already emitted (they are warn-once)."""
    from sparsefast import backends
    backends._warned.clear()
    yield
    backends._warned.clear()
