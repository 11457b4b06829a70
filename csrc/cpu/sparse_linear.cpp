// CPU kernel of sparse_linear: y = x @ W.T + bias with W [out, in] in CSR (int32 indices), the
// inference path of an exported TAMT subnetwork. The product itself lives in
// effnlp/sparse_cpu.h (masked_linear's sparse path uses it too).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "effnlp/masked_linear.h"
#include "effnlp/sparse_cpu.h"

namespace effnlp {
namespace {

using sparse_cpu::sparse_linear_impl;

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& values, int64_t in_features,
                             const std::optional<at::Tensor>& bias) {
  check_sparse_linear(x, crow, col, values, in_features, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t out = crow.numel() - 1;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    std::optional<at::Tensor> b32;
    if (has_bias) b32 = bias->to(at::kFloat);
    return sparse_linear_cpu(x.to(at::kFloat), crow, col, values.to(at::kFloat), in_features, b32)
        .to(x.scalar_type());
  }
  at::Tensor y = at::empty(shape, x.options());
  if (y.numel() == 0) return y;
  const int64_t N = y.numel() / out;
  const at::Tensor xc = x.contiguous(), crc = crow.contiguous(), cc = col.contiguous(),
                   vc = values.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int32_t* cr = crc.data_ptr<int32_t>();
  TORCH_CHECK(cr[0] == 0 && cr[out] == col.numel(), kSparseLinear,
              ": crow_indices must start at 0 and end at nnz = ", col.numel(), ", got ", cr[0],
              " and ", cr[out]);
  for (int64_t o = 0; o < out; ++o) {
    TORCH_CHECK(cr[o] <= cr[o + 1], kSparseLinear, ": crow_indices must be non-decreasing");
  }
  const int32_t* ci = cc.data_ptr<int32_t>();
  for (int64_t p = 0; p < col.numel(); ++p) {
    TORCH_CHECK(ci[p] >= 0 && ci[p] < in_features, kSparseLinear, ": col_indices[", p, "] = ", ci[p],
                " is out of range [0, ", in_features, ")");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear_cpu", [&] {
    sparse_linear_impl<scalar_t>(xc.data_ptr<scalar_t>(), cr, ci, vc.data_ptr<scalar_t>(),
                                 has_bias ? bc.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                                 N, in_features, out);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) { m.impl("sparse_linear", &sparse_linear_cpu); }

}  // namespace effnlp
