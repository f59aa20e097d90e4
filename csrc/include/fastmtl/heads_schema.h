// Schemas of the multi-task heads ops, written once: registered for `fastmtl` by csrc/fastmtl.cpp and for the host
// emulation of the CUDA kernels (tests/cuda_emulation/heads_emu.cpp, namespace `fastmtl_emu`), so the emulator
// always takes exactly the arguments the real ops take. Contract: the comment in csrc/fastmtl.cpp.
#pragma once

namespace fastmtl {

constexpr const char* kMultitaskLossSchema =
    "multitask_loss(Tensor hidden, Tensor? lengths, Tensor[] weights, Tensor?[] biases, Tensor[] targets, "
    "Tensor?[] class_weights, Tensor task_weights, int[] levels, int[] poolings, int[] ignore_indices, "
    "float[] label_smoothings, bool compute_grad) "
    "-> (Tensor total, Tensor losses, Tensor grad_hidden, Tensor[] grad_weights, Tensor[] grad_biases)";

constexpr const char* kMultitaskPredictSchema =
    "multitask_predict(Tensor hidden, Tensor? lengths, Tensor[] weights, Tensor?[] biases, int[] levels, "
    "int[] poolings) -> Tensor[]";

}  // namespace fastmtl
