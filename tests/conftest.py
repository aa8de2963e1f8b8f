"""Test setup. ``TRITON_INTERPRET=1`` is set before anything imports triton so the Triton kernels run
on CPU tensors through the interpreter (correctness only) on machines without a GPU."""
import os

if not __import__("shutil").which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
