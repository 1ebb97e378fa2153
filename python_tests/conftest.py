"""Shared fixtures of the ater_ext test suite.

Helpers that parametrisation needs at import time (devices, dtypes,
tolerances, data makers) live in ``_ops_common.py`` beside this file.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def dynamo_reset():
    """A clean torch.compile cache before and after a compile test, so that
    one test's graphs and guards never leak into another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny training runs spend more on thread hand-offs than on work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
