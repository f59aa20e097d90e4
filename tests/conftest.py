"""Shared test fixtures: devices (CUDA when present), fresh seeds."""
import os
import random

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    # `fastmtl train` without --output-dir saves the run in a new runs/<date>-<time>: in the tests (and the
    # commands they start) under a temporary folder, never in the checkout
    import tempfile

    os.environ["FASTMTL_RUNS_DIR"] = os.path.join(tempfile.mkdtemp(prefix="fastmtl-test-runs-"), "runs")


# The core suite (`pytest -m core`), what .ci/torch_window.sh runs on the oldest and the newest supported torch: op
# parity of the LSTM and the heads, the drop-in LSTM with torch's own nn.LSTM tests, the transforms (torch.func,
# vmap, double backward, compile), the private-torch-API checks, the build truth, the whole-model inference op (its
# autograd kernel redispatches in C++, its fake kernel meets opcheck) and a short train/evaluate/predict.
CORE_MODULES = {"test_lstm.py", "test_heads.py", "test_lstm_dropin.py", "test_lstm_torch_port.py",
                "test_transforms.py", "test_lstm_multi.py", "test_build.py", "test_torch_support.py", "test_crf.py",
                "test_tagger.py"}
CORE_TESTS = {"test_train.py::test_cli_train_evaluate_predict"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.path))
        if name in CORE_MODULES or "%s::%s" % (name, item.originalname) in CORE_TESTS:
            item.add_marker(pytest.mark.core)


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
