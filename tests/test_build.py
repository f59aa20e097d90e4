"""Build truth: the extension reports how it was built, and that matches what this environment expects."""
import os

import torch

import fastmtl
from fastmtl._torch_private import has_kernel


def test_build_info_fields():
    info = fastmtl.build_info()
    for key in ("torch_version", "cuda", "cuda_version", "flags", "compiler", "openmp"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__


def test_cuda_kernels_match_expectation():
    # CI sets FASTMTL_EXPECT_CUDA=0 (no GPU machine); a CUDA machine sets 1. Without it: a CUDA build exactly
    # when this torch has CUDA (the setup.py default when nvcc exists).
    expect = os.environ.get("FASTMTL_EXPECT_CUDA")
    info = fastmtl.build_info()
    if expect is not None:
        assert info["cuda"] == (expect == "1")
    elif torch.version.cuda is None:
        assert info["cuda"] is False
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda


OPS = ("lstm_layer_forward", "lstm_layer_backward", "lstm_layer_backward_multi", "multitask_loss", "multitask_predict")


def test_ops_registered():
    for name in OPS:
        assert hasattr(torch.ops.fastmtl, name), name
        assert has_kernel("fastmtl::" + name, "CPU"), name
        if fastmtl.build_info()["cuda"]:  # a CUDA build has a CUDA kernel for every op
            assert has_kernel("fastmtl::" + name, "CUDA"), name


def test_torch_mismatch_gives_clear_error(monkeypatch):
    import importlib

    import pytest

    from fastmtl import _build_meta, _native

    monkeypatch.setattr(_build_meta, "TORCH_VERSION", "0.0.0+other")
    try:
        with pytest.raises(ImportError, match=r"built against torch 0\.0\.0\+other.*Rebuild fastmtl"):
            importlib.reload(_native)
    finally:
        monkeypatch.undo()
        importlib.reload(_native)
    assert fastmtl.build_info()["torch_version"] == torch.__version__
