"""Shared test fixtures: devices (CUDA when present), fresh seeds."""
import os
import random

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    # Any test taking a `device` argument runs on every available device.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh random seed per test (printed on failure via the test id's report), never a fixed zero input."""
    seed = int(os.environ.get("FASTMTL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                print("\n[fastmtl] reproduce with FASTMTL_TEST_SEED=%d" % v)
