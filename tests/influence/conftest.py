import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The influence tests run tiny problems: intra-op threads only add synchronisation (and contention
    on a machine shared with other jobs), so each test runs on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
