// Input validation of masked_linear and sparse_linear, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "effnlp/checks.h"

namespace effnlp {

constexpr const char* kMaskedLinear = "masked_linear";
constexpr const char* kMaskedLinearBackward = "_masked_linear_backward";
constexpr const char* kSparseLinear = "sparse_linear";

// masked_linear(x [..., in], weight [out, in], scores [out, in], bias [out]?)
inline void check_masked_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& scores, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.dim(), "-D ",
              weight.sizes());
  TORCH_CHECK(scores.sizes() == weight.sizes(), op, ": scores must have the weight's shape ",
              weight.sizes(), ", got ", scores.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_floating(op, x, "x");
  check_same(op, x, "x", weight, "weight");
  check_same(op, x, "x", scores, "scores");
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x.shape[-1] = ", x.size(-1),
              " does not match the weight's in-features ", weight.size(1));
  if (bias.has_value() && bias->defined()) {
    check_same(op, x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be 1-D of size out-features = ", weight.size(0), ", got ", bias->sizes());
  }
}

// sparse_linear(x [..., in], crow [out+1] int32, col [nnz] int32, values [nnz], bias [out]?)
inline void check_sparse_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                const at::Tensor& values, int64_t in_features,
                                const std::optional<at::Tensor>& bias) {
  const char* op = kSparseLinear;
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && crow.scalar_type() == at::kInt, op,
              ": crow_indices must be a 1-D int32 tensor of size out+1, got ", crow.scalar_type(),
              " ", crow.sizes());
  TORCH_CHECK(col.dim() == 1 && col.scalar_type() == at::kInt, op,
              ": col_indices must be a 1-D int32 tensor, got ", col.scalar_type(), " ", col.sizes());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), op,
              ": values must be 1-D with one entry per column index (", col.numel(), "), got ",
              values.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_floating(op, x, "x");
  check_same(op, x, "x", values, "values");
  TORCH_CHECK(crow.device() == x.device() && col.device() == x.device(), op,
              ": crow_indices and col_indices must be on x's device ", x.device());
  TORCH_CHECK(in_features >= 0 && x.size(-1) == in_features, op, ": x.shape[-1] = ", x.size(-1),
              " does not match in_features = ", in_features);
  if (bias.has_value() && bias->defined()) {
    check_same(op, x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == crow.numel() - 1, op,
                ": bias must be 1-D of size out-features = ", crow.numel() - 1, ", got ", bias->sizes());
  }
}

}  // namespace effnlp
