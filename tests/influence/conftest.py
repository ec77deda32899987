import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The influence tests run tiny problems: intra-op threads only add synchronisation, and on a loaded
    2-core machine two OpenMP threads made one 40x3 cross-entropy 270x slower (4.3 ms vs 16 us)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
