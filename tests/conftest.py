import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _deterministic_threads():
    # One intra-op thread: identical reduction order run to run, so 1e-5 comparisons are stable.
    torch.set_num_threads(1)
    yield
