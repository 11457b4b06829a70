// Input validation shared by the CPU and CUDA kernels: every message starts with the op name
// so that a user sees which call rejected the input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#define EFFNLP_CHECK(op, cond, ...) TORCH_CHECK((cond), op ": ", __VA_ARGS__)

namespace effnlp {

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const char* op, const at::Tensor& ref, const char* ref_name,
                       const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all inputs must be on one device");
}

// Shapes of a Kronecker-factored linear map W = sum_r kron(A[r], B[r]).
struct KronShape {
  int64_t R, m1, n1, m2, n2;
  int64_t in_features() const { return n1 * n2; }
  int64_t out_features() const { return m1 * m2; }
};

// Validates kron_linear(x, A, B, bias) and returns the factor shapes.
inline KronShape check_kron_linear(const char* op, const at::Tensor& x, const at::Tensor& A,
                                   const at::Tensor& B, const std::optional<at::Tensor>& bias,
                                   const char* x_name = "x") {
  TORCH_CHECK(A.dim() == 3, op, ": A must be 3-D [R, m1, n1], got ", A.dim(), "-D ", A.sizes());
  TORCH_CHECK(B.dim() == 3, op, ": B must be 3-D [R, m2, n2], got ", B.dim(), "-D ", B.sizes());
  TORCH_CHECK(A.size(0) == B.size(0), op, ": A and B must hold the same number of Kronecker terms R, got ",
              A.size(0), " and ", B.size(0));
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have at least one dimension");
  check_floating(op, x, x_name);
  check_same(op, x, x_name, A, "A");
  check_same(op, x, x_name, B, "B");
  KronShape s{A.size(0), A.size(1), A.size(2), B.size(1), B.size(2)};
  TORCH_CHECK(x.size(-1) == s.in_features(), op, ": ", x_name, ".shape[-1] = ", x.size(-1),
              " does not match the factors' in-features n1*n2 = ", s.n1, "*", s.n2, " = ",
              s.in_features());
  if (bias.has_value() && bias->defined()) {
    check_same(op, x, x_name, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_features(), op,
                ": bias must be 1-D of size m1*m2 = ", s.out_features(), ", got ", bias->sizes());
  }
  return s;
}

}  // namespace effnlp
