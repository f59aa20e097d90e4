"""Multi-task heads ops: fake kernels and autograd (filled by the heads work)."""
