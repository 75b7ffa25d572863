"""Fixtures of the op tests (the shared references and tolerances are in utils.py)."""

import pytest
import torch

from .utils import device_for


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # The problems here are small; one intra-op thread avoids the large slow-downs that OpenMP
    # spin-waiting causes when the machine's cores are shared with other work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend via PACOFR_OPS and return the device its tensors live on."""

    def _use(backend):
        monkeypatch.setenv("PACOFR_OPS", backend)
        return device_for(backend)

    return _use
