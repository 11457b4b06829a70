// CUDA kernels of kron_linear and its backward.
//
// Math (the conventions of cpu/kron_linear.cpp): token n of x, viewed row-major as X_n [n1, n2]
// (in = j1*n2 + j2), maps to Y_n [m1, m2] (out = i1*m2 + i2) by
//     Y_n = sum_r A_r X_n B_r^T (+ bias),        A: [R, m1, n1], B: [R, m2, n2].
// The factors act on the two modes of X:
//   mode 2 (B, the contiguous axis): one GEMM over all tokens at once,
//       Out [N*rows, m2] = In [N*rows, n2] @ B_r^T;
//   mode 1 (A, the strided axis): one strided-batched GEMM over the tokens whose A operand has
//       batch stride 0, Out_n [m1, c] = A_r [m1, n1] @ In_n [n1, c]; when the contraction is tiny
//       (n1 <= 8) or A_r has one or two rows, a hand-written kernel instead (memory-bound axpys).
// Per term r the cheaper mode goes first (FLOPs, as on CPU) into an intermediate of
// [N, n1, m2] or [N, m1, n2]; the second product adds into y with beta = 1 (bias prefilled, else
// beta = 0 for the first term). W is never formed and the activations are not permuted.
// When the mode-1 GEMMs would be thin (trailing dim m2 or n2 <= 16 with a large A, e.g. the 2x2
// right factors of KroneckerBERT), the term is computed in a transposed layout Q [m2, N, m1]
// instead, where both steps are plain GEMMs with the tokens inside the rows; y is interleaved
// from Q once (the A-first order also permutes x once).
//
// Backward: dX = kron_linear(dY, A^T, B^T). For the factor gradients
//     dA_r = sum_n dY_n B_r X_n^T [m1, n1],      dB_r = sum_n dY_n^T A_r X_n [m2, n2],
// x and dY are copied once, permuted to Xp [n1, N, n2] and Yp [m1, N, m2]. In that layout every
// step is a single plain GEMM whose contraction runs over (token, axis) as one index:
//   dA via G = dY B:     Gp [m1*N, n2] = Yp [m1*N, m2] @ B_r;     dA_r = Gp [m1, N*n2] @ Xp [n1, N*n2]^T
//   dA via T = X B^T:    Tp [n1*N, m2] = Xp [n1*N, n2] @ B_r^T;   dA_r = Yp [m1, N*m2] @ Tp [n1, N*m2]^T
//   dB via U = A X:      Up [m1, N*n2] = A_r @ Xp [n1, N*n2];     dB_r = Yp [m1*N, m2]^T @ Up [m1*N, n2]
//   dB via V = A^T dY:   Vp [n1, N*m2] = A_r^T @ Yp [m1, N*m2];   dB_r = Vp [n1*N, m2]^T @ Xp [n1*N, n2]
// choosing G/T and U/V by FLOPs like the CPU kernel. Only GEMMs and a torch sum (bias), no
// atomics: the gradients are deterministic.
//
// The GEMMs are ATen's CUDA mm/addmm_/bmm/baddbmm_ on views of contiguous buffers (torch's
// at::cuda::blas templates are not exported to extensions). Every view has a unit stride in one
// dim, so ATen hands it to cuBLAS as is (a transposed view becomes a transpose flag, an
// expanded A a batch stride of 0): no copies. Half and bfloat16 accumulate in float32 inside
// cuBLAS; intermediates and y are stored in the input dtype. Everything runs on the current
// stream. cuBLAS takes 32-bit sizes: tokens go in chunks small enough for each GEMM dimension to
// fit (one chunk below 2^31 elements per buffer); the factor gradients add up over chunks.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <optional>
#include <tuple>
#include <vector>

#include "effnlp/checks.h"

namespace effnlp {
namespace {

constexpr const char* kOp = "kron_linear";

// ---------------------------------------------------------------------------------------------
// Building blocks.

// The first rows*cols elements of a flat buffer as a contiguous [rows, cols] matrix.
at::Tensor mat(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// C = A @ B, or C += A @ B when accumulate (beta = 1). C is a view into a buffer.
void gemm(at::Tensor C, const at::Tensor& A, const at::Tensor& B, bool accumulate) {
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

// Mode-1 product with a short contraction: one thread per output element,
//   out[n, i, p] = sum_{j < k} A[i, j] * in[n, j, p]  (+ out[n, i, p] when accumulate)
// A: [m, k], in: [nb, k, c], out: [nb, m, c], all contiguous. Neighbouring threads read
// neighbouring p, so the loads of `in` are coalesced; A is tiny and stays in cache.
template <typename T>
__global__ void mode1_small_kernel(const T* __restrict__ A, const T* __restrict__ in,
                                   T* __restrict__ out, int64_t nb, int64_t m, int64_t k,
                                   int64_t c, bool accumulate) {
  using acc_t = at::opmath_type<T>;
  const int64_t total = nb * m * c;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t p = idx % c;
    const int64_t row = idx / c;  // n * m + i
    const int64_t i = row % m;
    const int64_t n = row / m;
    const T* a = A + i * k;
    const T* src = in + n * k * c + p;
    acc_t s = accumulate ? static_cast<acc_t>(out[idx]) : acc_t(0);
    for (int64_t j = 0; j < k; ++j) s += static_cast<acc_t>(a[j]) * static_cast<acc_t>(src[j * c]);
    out[idx] = static_cast<T>(s);
  }
}

void mode1_small(const at::Tensor& A, const at::Tensor& in, const at::Tensor& out,
                 bool accumulate) {
  const int64_t nb = in.size(0), k = in.size(1), c = in.size(2), m = A.size(0);
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 1 << 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "kron_mode1", [&] {
    mode1_small_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            A.const_data_ptr<scalar_t>(), in.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), nb, m, k, c, accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Whether mode 1 goes to the hand-written kernel: a contraction of at most 8, or at most two
// output rows, is a memory-bound axpy that a GEMM would run poorly.
inline bool mode1_is_small(int64_t m, int64_t k) { return k <= 8 || m <= 2; }

// Mode-1 product: Out_n [m, c] (+)= A [m, k] @ In_n [k, c] for every token n
// (in: [nb, k, c], out: [nb, m, c], contiguous). One batched GEMM with A at batch stride 0.
void mode1(const at::Tensor& A, const at::Tensor& in, at::Tensor out, bool accumulate) {
  if (mode1_is_small(A.size(0), A.size(1))) {
    mode1_small(A, in, out, accumulate);
    return;
  }
  const at::Tensor A_all = A.expand({in.size(0), A.size(0), A.size(1)});  // stride 0 over tokens
  if (accumulate) {
    out.baddbmm_(A_all, in);
  } else {
    at::bmm_out(out, A_all, in);
  }
}

// FLOPs per token of the two orders: apply B first (mode 2, then mode 1) or A first.
inline bool b_first(const KronShape& s) {
  const int64_t cost_b = s.n1 * s.n2 * s.m2 + s.m1 * s.n1 * s.m2;
  const int64_t cost_a = s.m1 * s.n1 * s.n2 + s.m1 * s.n2 * s.m2;
  return cost_b <= cost_a;
}

// A mode-1 GEMM with a narrow trailing dim (c = m2 when B goes first, n2 when A does) is a batch
// of thin GEMMs that re-reads A_r for every token; such terms use forward_chunk_transposed.
inline bool use_transposed(const KronShape& s, bool bfirst) {
  return (bfirst ? s.m2 : s.n2) <= 16 && !mode1_is_small(s.m1, s.n1);
}

// Tokens per chunk such that every GEMM dimension and buffer fits cuBLAS' 32-bit int.
inline int64_t tokens_per_chunk(const KronShape& s) {
  const int64_t per_token =
      std::max({s.n1 * s.n2, s.m1 * s.m2, s.n1 * s.m2, s.m1 * s.n2, int64_t(1)});
  return std::max<int64_t>(1, INT_MAX / per_token);
}

inline int64_t num_tokens(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return shape;
}

// ---------------------------------------------------------------------------------------------
// Forward on a chunk of cnt tokens: x [cnt, n1*n2] and y [cnt, m1*m2], contiguous.

// Natural layout: y (+)= sum_r A_r X_n B_r^T through mid; y holds the bias when accumulate_first.
void forward_chunk(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, at::Tensor& y,
                   const KronShape& s, bool bfirst, bool accumulate_first, const at::Tensor& mid_buf) {
  const int64_t m1 = s.m1, n1 = s.n1, m2 = s.m2, n2 = s.n2, cnt = x.size(0);
  for (int64_t r = 0; r < s.R; ++r) {
    const bool acc = accumulate_first || r > 0;
    if (bfirst) {
      at::Tensor mid = mat(mid_buf, cnt * n1, m2);                     // mid_n [n1, m2]
      gemm(mid, x.view({cnt * n1, n2}), B[r].t(), false);              //   = X_n B_r^T
      mode1(A[r], mid.view({cnt, n1, m2}), y.view({cnt, m1, m2}), acc);  // Y_n (+)= A_r mid_n
    } else {
      at::Tensor mid = mat(mid_buf, cnt * m1, n2);                     // mid_n [m1, n2]
      mode1(A[r], x.view({cnt, n1, n2}), mid.view({cnt, m1, n2}), false);  // = A_r X_n
      gemm(y.view({cnt * m1, m2}), mid, B[r].t(), acc);                // Y_n (+)= mid_n B_r^T
    }
  }
}

// Transposed layout Q [m2, cnt, m1], Q[i2, n, i1] = Y_n[i1, i2], with the tokens inside the
// rows of every operand so that each step is one plain GEMM:
//   B first:  P [m2, cnt*n1] = B_r @ X [cnt*n1, n2]^T        P[i2, n, j1] = (X_n B_r^T)[j1, i2]
//             Q [m2*cnt, m1] (+)= P [m2*cnt, n1] @ A_r^T
//   A first:  Xt [n2*cnt, n1] = X permuted to [n2, cnt, n1] (one copy)
//             U [n2*cnt, m1] = Xt @ A_r^T                     U[j2, n, i1] = (A_r X_n)[i1, j2]
//             Q [m2, cnt*m1] (+)= B_r [m2, n2] @ U [n2, cnt*m1]
// Q starts as the bias (or the first term uses beta = 0) and is interleaved into y at the end.
void forward_chunk_transposed(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                              const std::optional<at::Tensor>& bias, at::Tensor& y,
                              const KronShape& s, bool bfirst, const at::Tensor& mid_buf,
                              const at::Tensor& xt_buf, const at::Tensor& q_buf) {
  const int64_t m1 = s.m1, n1 = s.n1, m2 = s.m2, n2 = s.n2, cnt = x.size(0);
  at::Tensor q = mat(q_buf, m2, cnt * m1);
  if (bias.has_value()) {
    q.view({m2, cnt, m1}).copy_(bias->view({m1, m2}).t().unsqueeze(1));  // q[i2, n, i1] = b[i1, i2]
  }
  at::Tensor xt;
  if (!bfirst) {
    xt = mat(xt_buf, n2 * cnt, n1);
    xt.view({n2, cnt, n1}).copy_(x.view({cnt, n1, n2}).permute({2, 0, 1}));
  }
  for (int64_t r = 0; r < s.R; ++r) {
    const bool acc = bias.has_value() || r > 0;
    if (bfirst) {
      at::Tensor P = mat(mid_buf, m2, cnt * n1);
      gemm(P, B[r], x.view({cnt * n1, n2}).t(), false);
      gemm(q.view({m2 * cnt, m1}), P.view({m2 * cnt, n1}), A[r].t(), acc);
    } else {
      at::Tensor U = mat(mid_buf, n2 * cnt, m1);
      gemm(U, xt, A[r].t(), false);
      gemm(q, B[r], U.view({n2, cnt * m1}), acc);
    }
  }
  y.view({cnt, m1, m2}).copy_(q.view({m2, cnt, m1}).permute({1, 2, 0}));  // y[n, i1, i2] = q[i2, n, i1]
}

// y [N, m1*m2] = x [N, n1*n2] mapped by the factors (+ bias); N, R and every dim > 0.
void forward_impl(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                  const std::optional<at::Tensor>& bias, at::Tensor& y, const KronShape& s) {
  const int64_t N = x.size(0);
  const bool bfirst = b_first(s);
  const bool transposed = use_transposed(s, bfirst);
  const int64_t chunk = std::min(N, tokens_per_chunk(s));
  const at::TensorOptions opts = x.options();
  const at::Tensor mid_buf = at::empty({chunk * (bfirst ? s.n1 * s.m2 : s.m1 * s.n2)}, opts);
  at::Tensor xt_buf, q_buf;
  if (transposed) {
    q_buf = at::empty({chunk * s.m1 * s.m2}, opts);
    if (!bfirst) xt_buf = at::empty({chunk * s.n1 * s.n2}, opts);
  } else if (bias.has_value()) {
    y.copy_(*bias);  // broadcast over the tokens; the products then add with beta = 1
  }
  for (int64_t t0 = 0; t0 < N; t0 += chunk) {
    const int64_t cnt = std::min(chunk, N - t0);
    const at::Tensor xc = x.narrow(0, t0, cnt);
    at::Tensor yc = y.narrow(0, t0, cnt);
    if (transposed) {
      forward_chunk_transposed(xc, A, B, bias, yc, s, bfirst, mid_buf, xt_buf, q_buf);
    } else {
      forward_chunk(xc, A, B, yc, s, bfirst, bias.has_value(), mid_buf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dA [R, m1, n1] and dB [R, m2, n2] from gy [N, m1*m2] and x [N, n1*n2] (all contiguous); see
// the header for the formulation. N, R and every dim > 0.
void factor_grads_impl(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                       const at::Tensor& B, at::Tensor& dA, at::Tensor& dB, const KronShape& s,
                       bool need_a, bool need_b) {
  const int64_t N = x.size(0), m1 = s.m1, n1 = s.n1, m2 = s.m2, n2 = s.n2;
  // dA via G = dY B (cost m1*m2*n2 + m1*n1*n2) or T = X B^T (n1*n2*m2 + m1*n1*m2).
  const bool a_via_g = m1 * m2 * n2 + m1 * n1 * n2 <= n1 * n2 * m2 + m1 * n1 * m2;
  // dB via U = A X (m1*n1*n2 + m1*m2*n2) or V = A^T dY (n1*m1*m2 + n1*m2*n2).
  const bool b_via_u = m1 * n1 * n2 + m1 * m2 * n2 <= n1 * m1 * m2 + n1 * m2 * n2;

  const int64_t chunk = std::min(N, tokens_per_chunk(s));
  const at::TensorOptions opts = x.options();
  const at::Tensor xp_buf = at::empty({chunk * n1 * n2}, opts);
  const at::Tensor yp_buf = at::empty({chunk * m1 * m2}, opts);
  const at::Tensor mid_buf = at::empty({chunk * std::max(m1 * n2, n1 * m2)}, opts);

  for (int64_t t0 = 0; t0 < N; t0 += chunk) {
    const int64_t cnt = std::min(chunk, N - t0);
    const bool acc = t0 > 0;  // add the chunks up
    // Xp [n1, cnt*n2], Xp[j1, (n, j2)] = X_n[j1, j2];  Yp [m1, cnt*m2], Yp[i1, (n, i2)] = dY_n[i1, i2]
    const at::Tensor Xp = mat(xp_buf, n1, cnt * n2);
    const at::Tensor Yp = mat(yp_buf, m1, cnt * m2);
    Xp.view({n1, cnt, n2}).copy_(x.narrow(0, t0, cnt).view({cnt, n1, n2}).permute({1, 0, 2}));
    Yp.view({m1, cnt, m2}).copy_(gy.narrow(0, t0, cnt).view({cnt, m1, m2}).permute({1, 0, 2}));
    for (int64_t r = 0; r < s.R; ++r) {
      if (need_a) {
        if (a_via_g) {
          const at::Tensor Gp = mat(mid_buf, m1 * cnt, n2);
          gemm(Gp, Yp.view({m1 * cnt, m2}), B[r], false);
          gemm(dA[r], Gp.view({m1, cnt * n2}), Xp.t(), acc);
        } else {
          const at::Tensor Tp = mat(mid_buf, n1 * cnt, m2);
          gemm(Tp, Xp.view({n1 * cnt, n2}), B[r].t(), false);
          gemm(dA[r], Yp, Tp.view({n1, cnt * m2}).t(), acc);
        }
      }
      if (need_b) {
        if (b_via_u) {
          const at::Tensor Up = mat(mid_buf, m1, cnt * n2);
          gemm(Up, A[r], Xp, false);
          gemm(dB[r], Yp.view({m1 * cnt, m2}).t(), Up.view({m1 * cnt, n2}), acc);
        } else {
          const at::Tensor Vp = mat(mid_buf, n1, cnt * m2);
          gemm(Vp, A[r].t(), Yp, false);
          gemm(dB[r], Vp.view({n1 * cnt, m2}).t(), Xp.view({n1 * cnt, n2}), acc);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
at::Tensor kron_linear_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& bias) {
  const KronShape s = check_kron_linear(kOp, x, A, B, bias);
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor like the factors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t N = num_tokens(x), in = s.in_features(), out = s.out_features();

  at::Tensor y = at::empty(out_shape(x, out), x.options());
  if (N == 0 || out == 0) return y;
  at::Tensor y2 = y.view({N, out});
  if (s.R == 0 || in == 0) {  // an empty sum: y is the bias, or zero
    if (has_bias) {
      y2.copy_(*bias);
    } else {
      y2.zero_();
    }
    return y;
  }
  std::optional<at::Tensor> bc;
  if (has_bias) bc = bias->contiguous();
  forward_impl(x.contiguous().view({N, in}), A.contiguous(), B.contiguous(), bc, y2, s);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    std::array<bool, 4> mask) {
  const char* op = "_kron_linear_backward";
  const KronShape s = check_kron_linear(op, x, A, B, std::nullopt);
  check_same(op, x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == c10::IntArrayRef(out_shape(x, s.out_features())), op,
              ": grad_y has shape ", grad_y.sizes(), " but the output of kron_linear has shape ",
              c10::IntArrayRef(out_shape(x, s.out_features())));
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor like the factors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = num_tokens(x), in = s.in_features(), out = s.out_features();
  // Masked-off gradients are distinct empty tensors (the outputs of an op must not alias).
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = empty(), gA = empty(), gB = empty(), gbias = empty();
  const at::Tensor gyc = grad_y.contiguous();  // also materialises expanded (stride-0) grads
  const at::Tensor g2 = gyc.view({N, out});

  if (mask[0]) {
    gx = kron_linear_cuda(gyc, A.transpose(1, 2), B.transpose(1, 2), std::nullopt);
  }
  if (mask[3]) {
    gbias = g2.sum(0);
  }
  if (mask[1] || mask[2]) {
    gA = at::empty(A.sizes(), x.options());
    gB = at::empty(B.sizes(), x.options());
    if (N == 0 || in == 0 || out == 0) {
      gA.zero_();
      gB.zero_();
    } else if (s.R > 0) {
      factor_grads_impl(g2, x.contiguous().view({N, in}), A.contiguous(), B.contiguous(), gA, gB,
                        s, mask[1], mask[2]);
    }
    if (!mask[1]) gA = empty();
    if (!mask[2]) gB = empty();
  }
  return {gx, gA, gB, gbias};
}

// The CUDA kernels keep no forward intermediate (cuBLAS makes the recomputation cheap next to
// the memory it would hold): mid is always empty, and the backward ignores the one it is given.
std::tuple<at::Tensor, at::Tensor> kron_linear_forward_cuda(const at::Tensor& x, const at::Tensor& A,
                                                            const at::Tensor& B,
                                                            const std::optional<at::Tensor>& bias,
                                                            bool /*keep_mid*/) {
  at::Tensor y = kron_linear_cuda(x, A, B, bias);
  return {y, at::empty({0, 0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_linear_backward_mid_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& mid, std::array<bool, 4> mask) {
  check_same("_kron_linear_backward", x, "x", mid, "mid");
  return kron_linear_backward_cuda(grad_y, x, A, B, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CUDA, m) {
  m.impl("_kron_linear_forward", &kron_linear_forward_cuda);
  m.impl("_kron_linear_backward", &kron_linear_backward_mid_cuda);
}

}  // namespace effnlp
