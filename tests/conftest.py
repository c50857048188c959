import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("attnzoo", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnzoo"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: no oversubscription on small CI machines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
