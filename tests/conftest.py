import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on the CPU. This must be set before
# triton.jit decorates soulkit's kernels, i.e. before the first import of soulkit.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the 2-core CI machine responsive and results reproducible.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that calls a CLI with ``--threads`` must not change the thread count of the tests after it."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
