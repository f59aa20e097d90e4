"""LSTM ops: fake kernels and autograd (filled by the LSTM work)."""
