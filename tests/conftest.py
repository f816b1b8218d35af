import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name (reproducible, independent)."""
    seed = (
        abs(hash(request.node.nodeid)) % (2**32)
        if os.environ.get("MIXLLM_RANDOM_SEED")
        else sum(map(ord, request.node.nodeid))
    )
    return np.random.default_rng(seed)
