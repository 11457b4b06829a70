// The rational activation f(x) = P(x) / (1 + |S(x)|), its input validation and its per-element
// math, shared by the CPU and CUDA kernels (host and device).
//
//   P(x) = a_0 + a_1 x + ... + a_m x^m          numerator   a = [G, m+1] (or [m+1] when G = 1)
//   S(x) = b_0 x + b_1 x^2 + ... + b_{n-1} x^n  denominator b = [G, n]   (or [n])
//
// Coefficients are in ascending order. The last dim of x (C channels) is split into G
// contiguous groups of C/G channels; group g uses row g of both coefficient tensors.
//
// Gradients, with u = dL/dy / Q, y = P / Q and v = -u * y * sign(S):
//   dL/dx = u * P'(x) + v * S'(x)       dL/da_k = u * x^k        dL/db_k = v * x^(k+1)
// (sign(0) = 0, as torch's abs backward.) Q >= 1, so nothing here divides by a small number.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "effnlp/checks.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EFFNLP_HD __host__ __device__ __forceinline__
#else
#define EFFNLP_HD inline
#endif

namespace effnlp {

constexpr const char* kRational = "rational";
constexpr const char* kRationalBackward = "_rational_backward";
// Most coefficients per polynomial: the kernels keep one accumulator per coefficient in
// registers. Degrees beyond ~10 are numerically meaningless on activations anyway.
constexpr int64_t kRationalMaxCoeffs = 16;

struct RationalShape {
  int64_t groups;       // G
  int64_t num;          // m + 1 numerator coefficients
  int64_t den;          // n denominator coefficients
  int64_t channels;     // C = x.size(-1)
  int64_t group_size;   // C / G
};

// Validates rational(x, numerator, denominator) and returns its shape.
inline RationalShape check_rational(const char* op, const at::Tensor& x, const at::Tensor& numerator,
                                    const at::Tensor& denominator) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_floating(op, x, "x");
  check_same(op, x, "x", numerator, "numerator");
  check_same(op, x, "x", denominator, "denominator");
  TORCH_CHECK(numerator.dim() == denominator.dim() && (numerator.dim() == 1 || numerator.dim() == 2),
              op, ": numerator and denominator must both be 1-D [m+1] / [n] or both 2-D [G, m+1] / "
              "[G, n], got ", numerator.sizes(), " and ", denominator.sizes());
  const bool grouped = numerator.dim() == 2;
  const int64_t G = grouped ? numerator.size(0) : 1;
  TORCH_CHECK(!grouped || denominator.size(0) == G, op,
              ": numerator and denominator must have the same number of groups, got ",
              numerator.size(0), " and ", denominator.size(0));
  TORCH_CHECK(G >= 1, op, ": the coefficients must have at least one group");
  const int64_t num = numerator.size(-1), den = denominator.size(-1);
  TORCH_CHECK(num >= 1 && num <= kRationalMaxCoeffs, op, ": numerator must have 1..",
              kRationalMaxCoeffs, " coefficients (degree 0..", kRationalMaxCoeffs - 1, "), got ", num);
  TORCH_CHECK(den <= kRationalMaxCoeffs, op, ": denominator must have 0..", kRationalMaxCoeffs,
              " coefficients, got ", den);
  const int64_t C = x.size(-1);
  TORCH_CHECK(C % G == 0, op, ": x.shape[-1] = ", C, " is not divisible by the number of groups ", G);
  return RationalShape{G, num, den, C, C / G};
}

// P(x), P'(x), S(x), S'(x) by Horner. a: num coefficients, b: den coefficients (any stride 1).
template <typename T, typename C>
EFFNLP_HD void rational_horner(T x, const C* a, int64_t num, const C* b, int64_t den, T& p, T& dp,
                               T& s, T& ds) {
  p = static_cast<T>(a[num - 1]);
  dp = T(0);
  for (int64_t k = num - 2; k >= 0; --k) {
    dp = dp * x + p;
    p = p * x + static_cast<T>(a[k]);
  }
  // S = x * R(x), R = b_0 + b_1 x + ...: S' = R + x R'.
  T r = den > 0 ? static_cast<T>(b[den - 1]) : T(0), dr = T(0);
  for (int64_t k = den - 2; k >= 0; --k) {
    dr = dr * x + r;
    r = r * x + static_cast<T>(b[k]);
  }
  s = x * r;
  ds = r + x * dr;
}

template <typename T>
EFFNLP_HD T rational_sign(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

template <typename T, typename C>
EFFNLP_HD T rational_forward_one(T x, const C* a, int64_t num, const C* b, int64_t den) {
  T p = static_cast<T>(a[num - 1]);
  for (int64_t k = num - 2; k >= 0; --k) p = p * x + static_cast<T>(a[k]);
  T r = den > 0 ? static_cast<T>(b[den - 1]) : T(0);
  for (int64_t k = den - 2; k >= 0; --k) r = r * x + static_cast<T>(b[k]);
  const T s = x * r;
  return p / (T(1) + (s < T(0) ? -s : s));
}

// The per-element backward: returns dL/dx and writes u and v (see the top of the file); the
// coefficient gradients are u * x^k and v * x^(k+1), summed over the elements of a group.
template <typename T, typename C>
EFFNLP_HD T rational_backward_one(T x, T gy, const C* a, int64_t num, const C* b, int64_t den, T& u,
                                  T& v) {
  T p, dp, s, ds;
  rational_horner<T, C>(x, a, num, b, den, p, dp, s, ds);
  const T sg = rational_sign(s);
  const T q = T(1) + sg * s;
  u = gy / q;
  v = -u * (p / q) * sg;
  return u * dp + v * ds;
}

// _rational_backward's inputs: rational's, plus grad_y of x's dtype, device and shape.
inline RationalShape check_rational_backward(const char* op, const at::Tensor& grad_y,
                                             const at::Tensor& x, const at::Tensor& numerator,
                                             const at::Tensor& denominator) {
  const RationalShape s = check_rational(op, x, numerator, denominator);
  check_same(op, x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y has shape ", grad_y.sizes(),
              " but x has shape ", x.sizes());
  return s;
}

}  // namespace effnlp
