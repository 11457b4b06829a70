// Shared by the CPU and CUDA kernels of fourier_mix: input checks and the grouping of
// sequences by their true length.
//
//   y[b] = Re(F_n X_b[:n] F_H) on the first n = lengths[b] rows, 0 on the rest,
// with F_N[j, k] = exp(-2 pi i j k / N). The map is linear and both DFT matrices are symmetric,
// so it is self-adjoint: the backward is the same op applied to the output gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <map>
#include <optional>
#include <vector>

#include "effnlp/checks.h"

namespace effnlp {

struct FourierShape {
  int64_t batch;  // product of the leading dims (one sequence each)
  int64_t L, H;
};

inline FourierShape check_fourier_mix(const char* op, const at::Tensor& x,
                                      const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dims [..., L, H], got ", x.dim(),
              "-D ", x.sizes());
  check_floating(op, x, "x");
  FourierShape s{1, x.size(-2), x.size(-1)};
  for (int64_t d = 0; d < x.dim() - 2; ++d) s.batch *= x.size(d);
  if (lengths.has_value() && lengths->defined()) {
    const auto& len = *lengths;
    TORCH_CHECK(len.scalar_type() == at::kLong || len.scalar_type() == at::kInt, op,
                ": lengths must be an int64 or int32 tensor, got ", len.scalar_type());
    TORCH_CHECK(x.dim() >= 3, op, ": lengths needs a batch dim: x must be [..., B, L, H]");
    TORCH_CHECK(len.dim() == x.dim() - 2 && len.sizes() == x.sizes().slice(0, x.dim() - 2), op,
                ": lengths must have the batch shape of x ", x.sizes().slice(0, x.dim() - 2),
                ", got ", len.sizes());
    TORCH_CHECK(len.device().is_cpu() || len.device() == x.device(), op, ": lengths is on ",
                len.device(), " but x is on ", x.device());
  }
  return s;
}

// Sequences grouped by length: every group is one batched transform. Without lengths there is
// one group holding all sequences at full length. Lengths outside [0, L] are rejected.
struct LengthGroup {
  int64_t n;
  std::vector<int64_t> index;  // sequence indices into the flattened batch
};

inline std::vector<LengthGroup> group_by_length(const char* op, const FourierShape& s,
                                                const std::optional<at::Tensor>& lengths) {
  std::vector<LengthGroup> groups;
  if (!(lengths.has_value() && lengths->defined())) {
    LengthGroup g{s.L, {}};
    g.index.resize(s.batch);
    for (int64_t b = 0; b < s.batch; ++b) g.index[b] = b;
    groups.push_back(std::move(g));
    return groups;
  }
  const at::Tensor len = lengths->to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = len.data_ptr<int64_t>();
  std::map<int64_t, std::vector<int64_t>> by_n;
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= s.L, op, ": lengths[", b, "] = ", p[b],
                " is outside [0, L] with L = ", s.L);
    by_n[p[b]].push_back(b);
  }
  for (auto& [n, idx] : by_n) groups.push_back(LengthGroup{n, std::move(idx)});
  return groups;
}

}  // namespace effnlp
