// CPU kernels of kron_linear and its backward.
//
// Per token, y = x @ W.T with W = sum_r kron(A_r, B_r) is the bilinear map Y = A_r X B_r^T on
// the token viewed as a matrix X [n1, n2] (row-major, in = j1*n2 + j2). The two factors act on
// the two modes of X:
//   mode 2 (B): contiguous rows, one GEMM over all tokens: [nb*n1, n2] @ B^T -> [nb*n1, m2];
//   mode 1 (A): the strided mode, Out_n = A @ In_n for each token n.
// The kernel walks x once, in blocks of nb tokens that stay in L2: each block applies the
// cheaper mode first (by FLOPs), keeps the intermediate in a thread-local buffer and writes
// the output block once. The dense W is never formed and no full-size permuted copy of the
// activations is made (those copies are what makes the reshape+einsum composition slow).
// Inner GEMMs go to the BLAS torch was built with (MKL here) on views of the block buffers;
// inside at::parallel_for they run single-threaded, the parallelism being over blocks.
//
// Backward: dX is kron_linear of dY with the transposed factors. dA and dB contract over all
// tokens; they are accumulated per fixed slot of tokens (a partition that does not depend on
// the thread count) and the slots are summed in order, so gradients are deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "effnlp/checks.h"

namespace effnlp {
namespace {

constexpr const char* kOp = "kron_linear";

// ---------------------------------------------------------------------------------------------
// Small vector primitives (AVX2 through at::vec when built with CPU_CAPABILITY_AVX2).
template <typename T>
inline void axpy(int64_t n, T a, const T* x, T* y) {
  using Vec = at::vec::Vectorized<T>;
  const Vec va(a);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
    at::vec::fmadd(va, Vec::loadu(x + i + Vec::size()), Vec::loadu(y + i + Vec::size()))
        .store(y + i + Vec::size());
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
inline T dot(int64_t n, const T* x, const T* y) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(x + i + Vec::size()), Vec::loadu(y + i + Vec::size()), acc1);
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), acc0);
  }
  T s = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// Per-thread scratch buffers that live across calls. A block's intermediates are up to a few MB;
// allocating them per call means mmap'd memory whose first touch page-faults, which on VMs
// costs several times the kernel's own memory traffic. The pool's threads persist, so each
// keeps its buffers (they grow to the largest block seen and are never shrunk).
template <typename T, int Slot>
std::vector<T>& scratch() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// Grows a scratch buffer to at least n elements (never shrinks: no refill on the next call).
template <typename T>
inline void ensure(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// ---------------------------------------------------------------------------------------------
// GEMM on raw row-major buffers through ATen's BLAS binding.
template <typename T>
struct Mat {
  T* p;
  int64_t rows, cols, ld;
  bool trans = false;  // use the transpose of the stored [rows, cols] matrix
};

template <typename T>
inline at::Tensor as_tensor(const Mat<T>& m) {
  auto t = at::from_blob(m.p, {m.rows, m.cols}, {m.ld, 1},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return m.trans ? t.t() : t;
}

// C (+)= op(A) @ op(B)
template <typename T>
inline void gemm(const Mat<T>& a, const Mat<T>& b, const Mat<T>& c, bool accumulate) {
  at::Tensor tc = as_tensor(c);
  if (accumulate) {
    tc.addmm_(as_tensor(a), as_tensor(b));
  } else {
    at::mm_out(tc, as_tensor(a), as_tensor(b));
  }
}

// ---------------------------------------------------------------------------------------------
// Where the rows of one token's [rows, c] operand live. Rows come in groups of `group_rows`
// (one group per Kronecker term when R terms are stacked): row q of token n starts at
//   base + n * tok + (q % group_rows) * ld + (q / group_rows) * c.
// A single group with ld = c is the plain contiguous [rows, c] layout.
struct Rows {
  int64_t group_rows, ld, tok;
  int64_t groups(int64_t rows) const { return group_rows > 0 ? rows / group_rows : 0; }
  int64_t offset(int64_t n, int64_t q, int64_t c) const {
    return n * tok + (q % group_rows) * ld + (q / group_rows) * c;
  }
};
inline Rows contiguous_rows(int64_t rows, int64_t c) { return {std::max<int64_t>(rows, 1), c, rows * c}; }

// dst (+)= sum_j coef[j] * src[j] over c elements, k <= kMaxShortK: the sum stays in registers
// (four vectors at a time), so dst is read and written once whatever k is.
constexpr int64_t kMaxShortK = 8;
template <typename T>
inline void lincomb_row(const T* coef, int64_t k, const T* const* src, int64_t c, T* dst, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  int64_t p = 0;
  for (; p + 4 * V <= c; p += 4 * V) {
    Vec a0 = accumulate ? Vec::loadu(dst + p) : Vec(T(0));
    Vec a1 = accumulate ? Vec::loadu(dst + p + V) : Vec(T(0));
    Vec a2 = accumulate ? Vec::loadu(dst + p + 2 * V) : Vec(T(0));
    Vec a3 = accumulate ? Vec::loadu(dst + p + 3 * V) : Vec(T(0));
    for (int64_t j = 0; j < k; ++j) {
      const Vec cj(coef[j]);
      a0 = at::vec::fmadd(cj, Vec::loadu(src[j] + p), a0);
      a1 = at::vec::fmadd(cj, Vec::loadu(src[j] + p + V), a1);
      a2 = at::vec::fmadd(cj, Vec::loadu(src[j] + p + 2 * V), a2);
      a3 = at::vec::fmadd(cj, Vec::loadu(src[j] + p + 3 * V), a3);
    }
    a0.store(dst + p);
    a1.store(dst + p + V);
    a2.store(dst + p + 2 * V);
    a3.store(dst + p + 3 * V);
  }
  for (; p + V <= c; p += V) {
    Vec a = accumulate ? Vec::loadu(dst + p) : Vec(T(0));
    for (int64_t j = 0; j < k; ++j) a = at::vec::fmadd(Vec(coef[j]), Vec::loadu(src[j] + p), a);
    a.store(dst + p);
  }
  for (; p < c; ++p) {
    T a = accumulate ? dst[p] : T(0);
    for (int64_t j = 0; j < k; ++j) a += coef[j] * src[j][p];
    dst[p] = a;
  }
}

// Mode-1 product: Out_n [m, c] (+)= A [m, k] @ In_n [k, c] for n < nb, A row-major (lda = k),
// In_n and Out_n addressed by `ri` and `ro`. Three regimes: a short contraction as vectorised
// axpys; long rows (c large) as GEMMs per token (and per row group); otherwise the block is
// packed to [k, nb*c] so that one GEMM serves all tokens.
template <typename T>
void mode1(const T* A, int64_t m, int64_t k, const T* in, Rows ri, int64_t nb, int64_t c, T* out,
           Rows ro, bool accumulate, std::vector<T>& pack_in, std::vector<T>& pack_out) {
  if (m == 0 || c == 0 || nb == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t n = 0; n < nb; ++n)
        for (int64_t i = 0; i < m; ++i) std::fill_n(out + ro.offset(n, i, c), c, T(0));
    return;
  }
  if (k <= kMaxShortK) {
    const T* src[kMaxShortK];
    for (int64_t n = 0; n < nb; ++n) {
      for (int64_t j = 0; j < k; ++j) src[j] = in + ri.offset(n, j, c);
      for (int64_t i = 0; i < m; ++i) lincomb_row<T>(A + i * k, k, src, c, out + ro.offset(n, i, c), accumulate);
    }
    return;
  }
  if (c >= 96) {
    const int64_t gi = ri.groups(k), go = ro.groups(m);
    for (int64_t n = 0; n < nb; ++n)
      for (int64_t o = 0; o < go; ++o)
        for (int64_t g = 0; g < gi; ++g) {
          const T* a = A + o * ro.group_rows * k + g * ri.group_rows;
          gemm<T>({const_cast<T*>(a), ro.group_rows, ri.group_rows, k},
                  {const_cast<T*>(in + ri.offset(n, g * ri.group_rows, c)), ri.group_rows, c, ri.ld},
                  {out + ro.offset(n, o * ro.group_rows, c), ro.group_rows, c, ro.ld},
                  accumulate || g > 0);
        }
    return;
  }
  const int64_t w = nb * c;
  ensure(pack_in, k * w);
  ensure(pack_out, m * w);
  for (int64_t n = 0; n < nb; ++n)
    for (int64_t j = 0; j < k; ++j) std::copy_n(in + ri.offset(n, j, c), c, pack_in.data() + j * w + n * c);
  gemm<T>({const_cast<T*>(A), m, k, k}, {pack_in.data(), k, w, w}, {pack_out.data(), m, w, w},
          false);
  for (int64_t n = 0; n < nb; ++n)
    for (int64_t i = 0; i < m; ++i) {
      const T* src = pack_out.data() + i * w + n * c;
      T* dst = out + ro.offset(n, i, c);
      if (accumulate) {
        at::vec::map2<T>([](auto a, auto b) { return a + b; }, dst, dst, src, c);
      } else {
        std::copy_n(src, c, dst);
      }
    }
}

// Mode-2 product: Out[r, :] (+)= In[r, :] @ B^T, B: [m2, n2] row-major.
template <typename T>
inline void mode2(const T* B, int64_t m2, int64_t n2, const T* in, int64_t rows, T* out,
                  bool accumulate) {
  if (rows == 0 || m2 == 0) return;
  if (n2 == 0) {
    if (!accumulate) std::fill(out, out + rows * m2, T(0));
    return;
  }
  gemm<T>({const_cast<T*>(in), rows, n2, n2}, {const_cast<T*>(B), m2, n2, n2, /*trans=*/true},
          {out, rows, m2, m2}, accumulate);
}

// acc[a, b] += sum_{n, t} P[n, a, t] * Q[n, b, t]   (P: [nb, a, c] contiguous; Q's rows
// addressed by rq, e.g. one term's slice of a stacked intermediate)
template <typename T>
void contract_tokens(const T* P, int64_t a, const T* Q, Rows rq, int64_t b, int64_t nb, int64_t c,
                     T* acc, std::vector<T>& pack_p, std::vector<T>& pack_q) {
  if (a == 0 || b == 0 || nb == 0 || c == 0) return;
  if (a * b <= 64) {
    for (int64_t n = 0; n < nb; ++n)
      for (int64_t i = 0; i < a; ++i)
        for (int64_t j = 0; j < b; ++j)
          acc[i * b + j] += dot<T>(c, P + (n * a + i) * c, Q + rq.offset(n, j, c));
    return;
  }
  if (c >= 96) {
    for (int64_t n = 0; n < nb; ++n)
      gemm<T>({const_cast<T*>(P + n * a * c), a, c, c},
              {const_cast<T*>(Q + rq.offset(n, 0, c)), b, c, rq.ld, /*trans=*/true}, {acc, a, b, b}, true);
    return;
  }
  const int64_t w = nb * c;
  ensure(pack_p, a * w);
  ensure(pack_q, b * w);
  for (int64_t n = 0; n < nb; ++n) {
    for (int64_t i = 0; i < a; ++i) std::copy_n(P + (n * a + i) * c, c, pack_p.data() + i * w + n * c);
    for (int64_t j = 0; j < b; ++j) std::copy_n(Q + rq.offset(n, j, c), c, pack_q.data() + j * w + n * c);
  }
  gemm<T>({pack_p.data(), a, w, w}, {pack_q.data(), b, w, w, /*trans=*/true}, {acc, a, b, b}, true);
}

// Tokens per block: enough rows for efficient inner GEMMs, few enough that the block's input,
// intermediate and output stay near L2 (2^18 elements: 1 MB of fp32, a Zen4 core's L2).
inline bool b_first(const KronShape& s);
inline int64_t block_tokens(const KronShape& s, int64_t N) {
  const int64_t mid = s.R * (b_first(s) ? s.n1 * s.m2 : s.m1 * s.n2);
  const int64_t per_token = s.n1 * s.n2 + s.m1 * s.m2 + mid;
  int64_t nb = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(per_token, 1));
  const int64_t min_rows = std::min(s.n1, s.m1) > 0 ? (128 + std::min(s.n1, s.m1) - 1) / std::min(s.n1, s.m1) : 1;
  nb = std::max(nb, std::min<int64_t>(min_rows, 256));
  return std::min(nb, std::max<int64_t>(N, 1));
}

// FLOPs per token of the two orders: apply B first (mode 2, then mode 1) or A first.
inline bool b_first(const KronShape& s) {
  const int64_t cost_b = s.n1 * s.n2 * s.m2 + s.m1 * s.n1 * s.m2;
  const int64_t cost_a = s.m1 * s.n1 * s.n2 + s.m1 * s.n2 * s.m2;
  return cost_b <= cost_a;
}

// A small right factor (KroneckerBERT attention's 2x2, or the 24x3 a shape search may pick)
// leaves the natural layout with rows of a few elements, which no GEMM handles well. Such
// blocks are computed in a transposed layout instead, with the tokens inside the rows:
//   Xd[j2, n, j1] = X[n, j1, j2]                      (one transpose of the block)
//   B first:  P[i2] = sum_j2 B[i2, j2] Xd[j2]          (axpys over rows of cnt*n1)
//             Q[(i2, n), :] (+)= P[(i2, n), :] @ A^T   (one GEMM per term, inner dim n1)
//   A first:  U[(j2, n), :] = Xd[(j2, n), :] @ A^T     (one GEMM per term, inner dim n1)
//             Q[i2] (+)= sum_j2 B[i2, j2] U[j2]        (axpys over rows of cnt*m1)
//   Y[n, i1, i2] = Q[i2, n, i1] (+ bias)               (one interleaving pass)
// Both orders keep the large factor A as the GEMM's weight operand.
inline bool small_b(const KronShape& s) {
  return std::min(s.m2, s.n2) <= 8 && s.m2 * s.n2 <= 512 && s.m1 >= 8 && s.n1 >= 8;
}

// Elements per token of the natural layout's intermediate: X B^T [n1, R*m2] when B goes first,
// A X [m1, R*n2] otherwise. The forward hands it to the backward when asked to (keep_mid);
// the transposed layout keeps none.
inline int64_t mid_numel_per_token(const KronShape& s) {
  return s.R * (b_first(s) ? s.n1 * s.m2 : s.m1 * s.n2);
}
inline bool keeps_mid(const KronShape& s) { return !small_b(s) && s.R > 0; }

// Xd[j2, n, j1] = X[n, j1, j2] for a block of cnt tokens.
template <typename T>
void transpose_block(const T* xb, int64_t cnt, int64_t rows, int64_t cols, T* out) {
  for (int64_t n = 0; n < cnt; ++n) {
    const T* xn = xb + n * rows * cols;
    for (int64_t j1 = 0; j1 < rows; ++j1)
      for (int64_t j2 = 0; j2 < cols; ++j2) out[(j2 * cnt + n) * rows + j1] = xn[j1 * cols + j2];
  }
}

// dst[i] = sum_j coef[i, j] * src[j] over rows of length len: dst rows (accumulate or not).
template <typename T>
void combine_rows(const T* coef, int64_t n_dst, int64_t n_src, bool coef_transposed, const T* src,
                  int64_t len, T* dst, bool accumulate) {
  for (int64_t i = 0; i < n_dst; ++i) {
    T* row = dst + i * len;
    if (!accumulate) std::fill(row, row + len, T(0));
    for (int64_t j = 0; j < n_src; ++j) {
      const T c = coef_transposed ? coef[j * n_dst + i] : coef[i * n_src + j];
      axpy<T>(len, c, src + j * len, row);
    }
  }
}

template <typename T>
void forward_block_small_b(const T* xb, const T* A, const T* B, const T* bias, T* yb, int64_t cnt,
                           const KronShape& s, bool bfirst, std::vector<T>& Xd,
                           std::vector<T>& PU, std::vector<T>& Q) {
  ensure(Xd, s.n2 * cnt * s.n1);
  ensure(Q, s.m2 * cnt * s.m1);
  transpose_block<T>(xb, cnt, s.n1, s.n2, Xd.data());
  for (int64_t r = 0; r < s.R; ++r) {
    const T* Ar = A + r * s.m1 * s.n1;
    const T* Br = B + r * s.m2 * s.n2;
    const Mat<T> At{const_cast<T*>(Ar), s.m1, s.n1, s.n1, /*trans=*/true};
    if (bfirst) {
      ensure(PU, s.m2 * cnt * s.n1);
      combine_rows<T>(Br, s.m2, s.n2, false, Xd.data(), cnt * s.n1, PU.data(), false);
      gemm<T>({PU.data(), s.m2 * cnt, s.n1, s.n1}, At, {Q.data(), s.m2 * cnt, s.m1, s.m1}, r > 0);
    } else {
      ensure(PU, s.n2 * cnt * s.m1);
      gemm<T>({Xd.data(), s.n2 * cnt, s.n1, s.n1}, At, {PU.data(), s.n2 * cnt, s.m1, s.m1}, false);
      combine_rows<T>(Br, s.m2, s.n2, false, PU.data(), cnt * s.m1, Q.data(), r > 0);
    }
  }
  for (int64_t n = 0; n < cnt; ++n) {
    T* yn = yb + n * s.m1 * s.m2;
    for (int64_t i1 = 0; i1 < s.m1; ++i1)
      for (int64_t i2 = 0; i2 < s.m2; ++i2)
        yn[i1 * s.m2 + i2] = Q[(i2 * cnt + n) * s.m1 + i1] + (bias ? bias[i1 * s.m2 + i2] : T(0));
  }
}

// Acat[i1, r*n1 + j1] = A[r, i1, j1] and Bp[i2, r*n2 + j2] = B[r, i2, j2]: the R terms side by
// side, so that the contraction over terms joins the GEMM's inner dimension.
template <typename T>
void forward_impl(const T* x, const T* A, const T* B, const T* Acat, const T* Bp, const T* bias,
                  T* y, T* mid_out, int64_t N, const KronShape& s) {
  const int64_t in = s.in_features(), out = s.out_features();
  const int64_t nb = block_tokens(s, N);
  const int64_t nblocks = (N + nb - 1) / nb;
  const bool bfirst = b_first(s);
  const bool transposed = small_b(s);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T>& mid = scratch<T, 0>();
    std::vector<T>& pin = scratch<T, 1>();
    std::vector<T>& pout = scratch<T, 2>();
    if (mid_out == nullptr) ensure(mid, nb * mid_numel_per_token(s));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * nb, cnt = std::min(nb, N - t0);
      const T* xb = x + t0 * in;
      T* yb = y + t0 * out;
      if (transposed && s.R > 0) {
        forward_block_small_b<T>(xb, A, B, bias, yb, cnt, s, bfirst, pin, pout, mid);
        continue;
      }
      // All R terms at once: B first stacks the terms along mid's columns and contracts them
      // with Acat [m1, R*n1]; A first stacks them along U's rows and contracts with Bp [m2, R*n2].
      // The intermediate goes to the caller's buffer when the backward will reuse it.
      T* midb = mid_out != nullptr ? mid_out + t0 * mid_numel_per_token(s) : mid.data();
      if (bfirst) {
        mode2<T>(B, s.R * s.m2, s.n2, xb, cnt * s.n1, midb, false);  // [cnt, n1, R*m2]
        mode1<T>(Acat, s.m1, s.R * s.n1, midb, {s.n1, s.R * s.m2, s.n1 * s.R * s.m2}, cnt,
                 s.m2, yb, contiguous_rows(s.m1, s.m2), false, pin, pout);
      } else {
        mode1<T>(A, s.R * s.m1, s.n1, xb, contiguous_rows(s.n1, s.n2), cnt, s.n2, midb,
                 {s.m1, s.R * s.n2, s.m1 * s.R * s.n2}, false, pin, pout);  // [cnt, m1, R*n2]
        mode2<T>(Bp, s.m2, s.R * s.n2, midb, cnt * s.m1, yb, false);
      }
      if (s.R == 0) std::fill(yb, yb + cnt * out, T(0));
      if (bias != nullptr) {
        for (int64_t t = 0; t < cnt; ++t)
          at::vec::map2<T>([](auto a, auto b) { return a + b; }, yb + t * out, yb + t * out, bias, out);
      }
    }
  });
}

// Gradients of a sub-block in the transposed layout of forward_block_small_b. With
//   D[i2, n, i1] = dY[n, i1, i2] and Xd[j2, n, j1] = X[n, j1, j2],
// each gradient is one GEMM (or a few dots) plus axpys:
//   V = D [m2*cnt, m1] @ A (the large product):  dXd[j2] += sum_i2 B[i2, j2] V[i2]   (when gx)
//                                               dB[i2, j2] += <V[i2], Xd[j2]>
//   dA via T:  P[i2] = sum_j2 B[i2, j2] Xd[j2];   dA += D^T [m1, m2*cnt] @ P [m2*cnt, n1]
//   dA via G:  G[j2] = sum_i2 B[i2, j2] D[i2];    dA += G^T [m1, n2*cnt] @ Xd [n2*cnt, n1]
// so dX and dB share V and the block costs two large GEMMs, as the composition's autograd.
// Without dX, dB may instead use U = Xd @ A^T, dB[i2, j2] += <D[i2], U[j2]>, if cheaper.
// That is for B-first shapes; A-first ones (see below) share G = B^T-combined D instead, so
// that no GEMM has the expensive order's size.
template <typename T>
void grads_block_small_b(const T* gb, const T* xb, const T* A, const T* B, T* dA, T* dB, T* gxb,
                         int64_t cnt, const KronShape& s, bool need_a, bool need_b,
                         std::vector<T>& D, std::vector<T>& Xd, std::vector<T>& W,
                         std::vector<T>& V, std::vector<T>& GX) {
  ensure(D, s.m2 * cnt * s.m1);
  ensure(Xd, s.n2 * cnt * s.n1);
  transpose_block<T>(gb, cnt, s.m1, s.m2, D.data());
  transpose_block<T>(xb, cnt, s.n1, s.n2, Xd.data());
  const bool a_via_t = s.m2 * s.n2 * s.n1 + s.m1 * s.n1 * s.m2 <= s.n2 * s.m2 * s.m1 + s.m1 * s.n1 * s.n2;
  if (gxb != nullptr) ensure(GX, s.n2 * cnt * s.n1);
  if (!b_first(s)) {
    // A-first shapes (A's contraction is the cheap side): G[j2] = sum_i2 B[i2, j2] D[i2] serves
    // dX (G @ A) and dA (G^T Xd); dB uses U = Xd @ A^T. Every GEMM has the cheap order's size.
    ensure(W, s.n2 * cnt * s.m1);
    ensure(V, s.n2 * cnt * s.m1);
    for (int64_t r = 0; r < s.R; ++r) {
      const T* Ar = A + r * s.m1 * s.n1;
      const T* Br = B + r * s.m2 * s.n2;
      combine_rows<T>(Br, s.n2, s.m2, true, D.data(), cnt * s.m1, W.data(), false);  // G
      if (gxb != nullptr)
        gemm<T>({W.data(), s.n2 * cnt, s.m1, s.m1}, {const_cast<T*>(Ar), s.m1, s.n1, s.n1},
                {GX.data(), s.n2 * cnt, s.n1, s.n1}, r > 0);
      if (need_a)
        gemm<T>({W.data(), s.n2 * cnt, s.m1, s.m1, /*trans=*/true}, {Xd.data(), s.n2 * cnt, s.n1, s.n1},
                {dA + r * s.m1 * s.n1, s.m1, s.n1, s.n1}, true);
      if (need_b) {
        gemm<T>({Xd.data(), s.n2 * cnt, s.n1, s.n1}, {const_cast<T*>(Ar), s.m1, s.n1, s.n1, /*trans=*/true},
                {V.data(), s.n2 * cnt, s.m1, s.m1}, false);  // U
        T* dBr = dB + r * s.m2 * s.n2;
        for (int64_t i2 = 0; i2 < s.m2; ++i2)
          for (int64_t j2 = 0; j2 < s.n2; ++j2)
            dBr[i2 * s.n2 + j2] += dot<T>(cnt * s.m1, D.data() + i2 * cnt * s.m1, V.data() + j2 * cnt * s.m1);
      }
    }
  }
  const bool b_via_u = gxb == nullptr &&
      s.n2 * s.n1 * s.m1 + s.m2 * s.n2 * s.m1 <= s.m2 * s.m1 * s.n1 + s.m2 * s.n2 * s.n1;
  for (int64_t r = 0; r < s.R && b_first(s); ++r) {
    const T* Ar = A + r * s.m1 * s.n1;
    const T* Br = B + r * s.m2 * s.n2;
    if (gxb != nullptr || (need_b && !b_via_u)) {
      ensure(V, s.m2 * cnt * s.n1);
      gemm<T>({D.data(), s.m2 * cnt, s.m1, s.m1}, {const_cast<T*>(Ar), s.m1, s.n1, s.n1},
              {V.data(), s.m2 * cnt, s.n1, s.n1}, false);
      if (gxb != nullptr)
        combine_rows<T>(Br, s.n2, s.m2, true, V.data(), cnt * s.n1, GX.data(), r > 0);
    }
    if (need_a) {
      const Mat<T> dAr{dA + r * s.m1 * s.n1, s.m1, s.n1, s.n1};
      if (a_via_t) {
        ensure(W, s.m2 * cnt * s.n1);
        combine_rows<T>(Br, s.m2, s.n2, false, Xd.data(), cnt * s.n1, W.data(), false);
        gemm<T>({D.data(), s.m2 * cnt, s.m1, s.m1, /*trans=*/true}, {W.data(), s.m2 * cnt, s.n1, s.n1},
                dAr, true);
      } else {
        ensure(W, s.n2 * cnt * s.m1);
        combine_rows<T>(Br, s.n2, s.m2, true, D.data(), cnt * s.m1, W.data(), false);
        gemm<T>({W.data(), s.n2 * cnt, s.m1, s.m1, /*trans=*/true}, {Xd.data(), s.n2 * cnt, s.n1, s.n1},
                dAr, true);
      }
    }
    if (need_b) {
      T* dBr = dB + r * s.m2 * s.n2;
      if (b_via_u) {
        ensure(W, s.n2 * cnt * s.m1);
        gemm<T>({Xd.data(), s.n2 * cnt, s.n1, s.n1}, {const_cast<T*>(Ar), s.m1, s.n1, s.n1, /*trans=*/true},
                {W.data(), s.n2 * cnt, s.m1, s.m1}, false);
        for (int64_t i2 = 0; i2 < s.m2; ++i2)
          for (int64_t j2 = 0; j2 < s.n2; ++j2)
            dBr[i2 * s.n2 + j2] += dot<T>(cnt * s.m1, D.data() + i2 * cnt * s.m1, W.data() + j2 * cnt * s.m1);
      } else {
        for (int64_t i2 = 0; i2 < s.m2; ++i2)
          for (int64_t j2 = 0; j2 < s.n2; ++j2)
            dBr[i2 * s.n2 + j2] += dot<T>(cnt * s.n1, V.data() + i2 * cnt * s.n1, Xd.data() + j2 * cnt * s.n1);
      }
    }
  }
  if (gxb != nullptr) {
    if (s.R == 0) std::fill(GX.begin(), GX.begin() + s.n2 * cnt * s.n1, T(0));
    for (int64_t n = 0; n < cnt; ++n) {  // dX[n, j1, j2] = dXd[j2, n, j1]
      T* gn = gxb + n * s.n1 * s.n2;
      for (int64_t j1 = 0; j1 < s.n1; ++j1)
        for (int64_t j2 = 0; j2 < s.n2; ++j2) gn[j1 * s.n2 + j2] = GX[(j2 * cnt + n) * s.n1 + j1];
    }
  }
}

// Gradients over tokens in one pass. dA [R, m1, n1] and dB [R, m2, n2] are accumulated per
// slot and reduced in slot order; dX (when gx is given) is written block by block. In the
// natural layout the large product is shared as in the forward's order:
//   A first (Y = (A X) B^T):  G = dY B     ->  dX = A^T G,   dA += sum_n G_n X_n^T,   dB += dY^T U
//   B first (Y = A (X B^T)):  V = A^T dY   ->  dX = V B,     dB += V^T X,             dA += sum_n dY_n T_n^T
// with U = A X or T = X B^T taken from the forward (mid) when it kept them, else recomputed.
// With mid, that is two large GEMMs per block, the work of the torch composition's autograd.
// The transposed layout (small B) has its own block routine (grads_block_small_b).
template <typename T>
void grads_impl(const T* gy, const T* x, const T* A, const T* At, const T* B, const T* mid_saved,
                T* dA, T* dB, T* gx, int64_t N, const KronShape& s, bool need_a, bool need_b) {
  const int64_t in = s.in_features(), out = s.out_features();
  // Sub-blocks as large as a ~4 MB intermediate allows: the contractions over tokens are GEMMs
  // whose inner dimension is the sub-block's rows, and the [m, n] accumulators are touched rarely.
  const int64_t mid_per_token = std::max<int64_t>(1, std::max(s.m1 * s.n2, s.n1 * s.m2));
  const int64_t nb = std::max(block_tokens(s, N), std::min<int64_t>(N, (int64_t(1) << 20) / mid_per_token));
  // Slots of at least 256 tokens (a partition fixed by N alone, so results do not depend on the
  // thread count): fewer, longer contractions and fewer [m, n] partials to reduce.
  const int64_t nslots = std::clamp<int64_t>(N / 256, 1, 16);
  const int64_t sa = s.R * s.m1 * s.n1, sb = s.R * s.m2 * s.n2;
  std::vector<T> partial(nslots * (sa + sb), T(0));
  const int64_t mid_size = nb * mid_per_token;
  const bool transposed = small_b(s);
  const bool bfirst = b_first(s);
  const int64_t mid_tok = mid_numel_per_token(s);
  at::parallel_for(0, nslots, 1, [&](int64_t s0, int64_t s1) {
    std::vector<T>& mid = scratch<T, 0>();
    std::vector<T>& mid2 = scratch<T, 1>();
    std::vector<T>& p1 = scratch<T, 2>();
    std::vector<T>& p2 = scratch<T, 3>();
    ensure(mid, mid_size);
    ensure(mid2, mid_size);
    for (int64_t slot = s0; slot < s1; ++slot) {
      T* pa = partial.data() + slot * (sa + sb);
      T* pb = pa + sa;
      const int64_t tb = N * slot / nslots, te = N * (slot + 1) / nslots;
      for (int64_t t0 = tb; t0 < te; t0 += nb) {
        const int64_t cnt = std::min(nb, te - t0);
        const T* xb = x + t0 * in;
        const T* gb = gy + t0 * out;
        T* gxb = gx != nullptr ? gx + t0 * in : nullptr;
        if (transposed) {
          grads_block_small_b<T>(gb, xb, A, B, pa, pb, gxb, cnt, s, need_a, need_b, mid, p1, p2, mid2,
                                 scratch<T, 4>());
          continue;
        }
        const T* saved = mid_saved != nullptr ? mid_saved + t0 * mid_tok : nullptr;
        for (int64_t r = 0; r < s.R; ++r) {
          const T* Ar = A + r * s.m1 * s.n1;
          const T* Atr = At + r * s.m1 * s.n1;
          const T* Br = B + r * s.m2 * s.n2;
          T* dAr = pa + r * s.m1 * s.n1;
          T* dBr = pb + r * s.m2 * s.n2;
          if (!bfirst) {
            if (gxb != nullptr || need_a) {
              gemm<T>({const_cast<T*>(gb), cnt * s.m1, s.m2, s.m2}, {const_cast<T*>(Br), s.m2, s.n2, s.n2},
                      {mid.data(), cnt * s.m1, s.n2, s.n2}, false);  // G: [cnt, m1, n2]
              if (gxb != nullptr)
                mode1<T>(Atr, s.n1, s.m1, mid.data(), contiguous_rows(s.m1, s.n2), cnt, s.n2, gxb,
                         contiguous_rows(s.n1, s.n2), r > 0, p1, p2);
              if (need_a)
                contract_tokens<T>(mid.data(), s.m1, xb, contiguous_rows(s.n1, s.n2), s.n1, cnt, s.n2,
                                   dAr, p1, p2);
            }
            if (need_b) {
              // U_r = A_r X: row (n, i1) of the saved [cnt, m1, R*n2] at stride R*n2.
              Mat<T> U{nullptr, cnt * s.m1, s.n2, s.R * s.n2};
              if (saved != nullptr) {
                U.p = const_cast<T*>(saved + r * s.n2);
              } else {
                mode1<T>(Ar, s.m1, s.n1, xb, contiguous_rows(s.n1, s.n2), cnt, s.n2, mid2.data(),
                         contiguous_rows(s.m1, s.n2), false, p1, p2);
                U = {mid2.data(), cnt * s.m1, s.n2, s.n2};
              }
              gemm<T>({const_cast<T*>(gb), cnt * s.m1, s.m2, s.m2, /*trans=*/true}, U,
                      {dBr, s.m2, s.n2, s.n2}, true);
            }
          } else {
            if (gxb != nullptr || need_b) {
              mode1<T>(Atr, s.n1, s.m1, gb, contiguous_rows(s.m1, s.m2), cnt, s.m2, mid.data(),
                       contiguous_rows(s.n1, s.m2), false, p1, p2);  // V: [cnt, n1, m2]
              if (gxb != nullptr)
                gemm<T>({mid.data(), cnt * s.n1, s.m2, s.m2}, {const_cast<T*>(Br), s.m2, s.n2, s.n2},
                        {gxb, cnt * s.n1, s.n2, s.n2}, r > 0);
              if (need_b)
                gemm<T>({mid.data(), cnt * s.n1, s.m2, s.m2, /*trans=*/true},
                        {const_cast<T*>(xb), cnt * s.n1, s.n2, s.n2}, {dBr, s.m2, s.n2, s.n2}, true);
            }
            if (need_a) {
              // T_r = X B_r^T: row (n, j1) of the saved [cnt, n1, R*m2] at stride R*m2.
              const T* Tr = saved != nullptr ? saved + r * s.m2 : mid2.data();
              Rows rt = saved != nullptr ? Rows{s.n1, s.R * s.m2, s.n1 * s.R * s.m2}
                                         : contiguous_rows(s.n1, s.m2);
              if (saved == nullptr) mode2<T>(Br, s.m2, s.n2, xb, cnt * s.n1, mid2.data(), false);
              contract_tokens<T>(gb, s.m1, Tr, rt, s.n1, cnt, s.m2, dAr, p1, p2);
            }
          }
        }
        if (gxb != nullptr && s.R == 0) std::fill(gxb, gxb + cnt * in, T(0));
      }
    }
  });
  // Ordered reduction over slots.
  for (int64_t slot = 0; slot < nslots; ++slot) {
    const T* pa = partial.data() + slot * (sa + sb);
    if (need_a) {
      if (slot == 0) std::copy_n(pa, sa, dA); else axpy<T>(sa, T(1), pa, dA);
    }
    if (need_b) {
      if (slot == 0) std::copy_n(pa + sa, sb, dB); else axpy<T>(sb, T(1), pa + sa, dB);
    }
  }
}

bool needs_upcast(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return shape;
}

int64_t num_tokens(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

std::tuple<at::Tensor, at::Tensor> kron_linear_forward_cpu(const at::Tensor& x, const at::Tensor& A,
                                                           const at::Tensor& B,
                                                           const std::optional<at::Tensor>& bias,
                                                           bool keep_mid) {
  const KronShape s = check_kron_linear(kOp, x, A, B, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  if (needs_upcast(x.scalar_type())) {
    // Half precision on CPU computes in float32 (BLAS has no fast fp16 path here).
    std::optional<at::Tensor> b32;
    if (has_bias) b32 = bias->to(at::kFloat);
    auto [y, mid] = kron_linear_forward_cpu(x.to(at::kFloat), A.to(at::kFloat), B.to(at::kFloat), b32, keep_mid);
    return {y.to(x.scalar_type()), mid.to(x.scalar_type())};
  }
  const at::Tensor xc = x.contiguous(), Ac = A.contiguous(), Bc = B.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t N = num_tokens(x);
  at::Tensor y = at::empty(out_shape(x, s.out_features()), x.options());
  const bool keep = keep_mid && keeps_mid(s) && N > 0 && s.out_features() > 0;
  at::Tensor mid = at::empty({keep ? N : 0, keep ? mid_numel_per_token(s) : 0}, x.options());
  if (N == 0 || s.out_features() == 0) return {y, mid};
  const at::Tensor Acat = Ac.permute({1, 0, 2}).reshape({s.m1, s.R * s.n1}).contiguous();
  const at::Tensor Bp = Bc.permute({1, 0, 2}).reshape({s.m2, s.R * s.n2}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_linear_cpu", [&] {
    forward_impl<scalar_t>(xc.data_ptr<scalar_t>(), Ac.data_ptr<scalar_t>(), Bc.data_ptr<scalar_t>(),
                           Acat.data_ptr<scalar_t>(), Bp.data_ptr<scalar_t>(),
                           has_bias ? bc.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           keep ? mid.data_ptr<scalar_t>() : nullptr, N, s);
  });
  return {y, mid};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& mid, std::array<bool, 4> mask) {
  const char* op = "_kron_linear_backward";
  const KronShape s = check_kron_linear(op, x, A, B, std::nullopt);
  check_same(op, x, "x", grad_y, "grad_y");
  check_same(op, x, "x", mid, "mid");
  TORCH_CHECK(grad_y.sizes() == c10::IntArrayRef(out_shape(x, s.out_features())), op,
              ": grad_y has shape ", grad_y.sizes(), " but the output of kron_linear has shape ",
              c10::IntArrayRef(out_shape(x, s.out_features())));
  const int64_t N = num_tokens(x);
  const bool use_mid = mid.numel() > 0;
  TORCH_CHECK(!use_mid || (keeps_mid(s) && mid.dim() == 2 && mid.size(0) == N &&
                           mid.size(1) == mid_numel_per_token(s)),
              op, ": mid has shape ", mid.sizes(), ", which is not the intermediate that "
              "_kron_linear_forward keeps for these factors; pass an empty tensor to recompute it");
  if (needs_upcast(x.scalar_type())) {
    auto g = kron_linear_backward_cpu(grad_y.to(at::kFloat), x.to(at::kFloat), A.to(at::kFloat),
                                      B.to(at::kFloat), mid.to(at::kFloat), mask);
    auto down = [&](const at::Tensor& t) { return t.to(x.scalar_type()); };
    return {down(std::get<0>(g)), down(std::get<1>(g)), down(std::get<2>(g)), down(std::get<3>(g))};
  }
  // Masked-off gradients are distinct empty tensors (outputs of an op must not alias).
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = empty(), gA = empty(), gB = empty(), gbias = empty();
  const at::Tensor g2 = grad_y.contiguous();
  const bool need_factors = mask[1] || mask[2];
  const bool fused_x = mask[0] && need_factors;
  if (mask[0] && !fused_x) {
    gx = std::get<0>(kron_linear_forward_cpu(g2, A.transpose(1, 2), B.transpose(1, 2), std::nullopt, false));
  }
  if (mask[3]) {
    gbias = g2.reshape({-1, s.out_features()}).sum(0);
  }
  if (need_factors) {
    gA = at::empty(A.sizes(), x.options());
    gB = at::empty(B.sizes(), x.options());
    if (fused_x) gx = at::empty(x.sizes(), x.options());
    if (N == 0 || s.in_features() == 0 || s.out_features() == 0) {
      gA.zero_();
      gB.zero_();
      if (fused_x) gx.zero_();
    } else {
      const at::Tensor xc = x.contiguous(), Ac = A.contiguous(), Bc = B.contiguous();
      const at::Tensor Atc = A.transpose(1, 2).contiguous();
      const at::Tensor midc = use_mid ? mid.contiguous() : mid;
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_linear_backward_cpu", [&] {
        grads_impl<scalar_t>(g2.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), Ac.data_ptr<scalar_t>(),
                             Atc.data_ptr<scalar_t>(), Bc.data_ptr<scalar_t>(),
                             use_mid ? midc.data_ptr<scalar_t>() : nullptr, gA.data_ptr<scalar_t>(),
                             gB.data_ptr<scalar_t>(), fused_x ? gx.data_ptr<scalar_t>() : nullptr, N, s,
                             mask[1], mask[2]);
      });
    }
    if (!mask[1]) gA = empty();
    if (!mask[2]) gB = empty();
  }
  return {gx, gA, gB, gbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) {
  m.impl("_kron_linear_forward", &kron_linear_forward_cpu);
  m.impl("_kron_linear_backward", &kron_linear_backward_cpu);
}

}  // namespace effnlp
