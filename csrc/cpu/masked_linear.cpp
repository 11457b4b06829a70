// CPU kernels of masked_linear (y = x @ (W * 1[S > t]).T + bias) and its straight-through backward.
//
// Forward: in blocks of kBlock output rows (see below: one block), one vectorised pass writes
// the masked weight Wm = (S > t) ? W : 0 into a per-thread scratch buffer that lives across
// calls (it never page-faults again, and nothing is returned to autograd), then one BLAS call
// writes the block's columns of y = bias + x @ Wm.T.
// The torch composition F.linear(x, W * STE(S > t)) instead writes a bool mask, a float
// mask and the masked weight as fresh tensors, and keeps the float mask alive for backward.
//
// Backward, given dY:
//   G  = dY.T @ x                      (dL/dWm, one GEMM written straight into dS's buffer)
//   dS = G * W                         (straight through the step function, as TAMT does)
//   dW = G * 1[S > t]                  (only when W is trainable)
//   dX = dY @ Wm                       (Wm recomputed from S, kBlock input columns at a time)
// dS and dW come out of a single fused pass over G, W and S.
//
// Sparse path: when at most kSparseDensity of the weights are kept (TAMT at 85-95% sparsity),
// the forward and dX products skip the pruned weights: the kept entries of W are gathered into
// a CSR matrix (for the forward) or the CSR of its transpose (for dX), rebuilt from S on every
// call (one pass over S and W, parallel), and multiplied by the sparse kernel of sparse_linear
// (effnlp/sparse_cpu.h). G = dY.T @ x stays a dense GEMM: the straight-through estimator gives
// every score a gradient, pruned or not. Both paths compute the same sums; only the summation
// order differs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "effnlp/checks.h"
#include "effnlp/masked_linear.h"
#include "effnlp/sparse_cpu.h"

namespace effnlp {
namespace {

// Rows (forward) or columns (backward dX) of the masked weight formed per BLAS call. Measured
// (bench_mask.py, 2048x384->1536 and 4096x768->3072): blocks of 128 or 512 cut the op's peak
// memory by ~10% but made it ~10% slower than one GEMM on the whole masked weight, as MKL's
// large GEMMs beat many thin ones; so the whole matrix is one block. The code keeps the
// blocking so that a memory-bound caller can set it.
constexpr int64_t kBlock = int64_t{1} << 40;

// Density at or below which the forward and dX products take the sparse path. Measured with
// bench_mask.py (fp32, 2 threads, AVX-512): the CSR kernel beats MKL's GEMM on the masked
// weight below ~15% density at 2048-4096 tokens, by 2-2.5x at 10%.
constexpr double kSparseDensity = 0.15;

template <typename T>
bool sparse_path(const T* s, T t, int64_t n) {
  if (n == 0 || n > std::numeric_limits<int32_t>::max()) return false;
  return static_cast<double>(sparse_cpu::count_kept(s, t, n)) <= kSparseDensity * static_cast<double>(n);
}

template <typename T>
sparse_cpu::MaskedCsr<T>& csr_scratch() {
  thread_local sparse_cpu::MaskedCsr<T> csr;
  return csr;
}

bool needs_upcast(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Grow-only scratch of the calling thread: the masked weight, rebuilt on every call.
template <typename T>
T* scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// dst[i] = s[i] > t ? w[i] : 0 for i < n (one thread).
template <typename T>
inline void mask_row(const T* w, const T* s, T t, T* dst, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vt(t);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec m = Vec::loadu(s + i) > vt;  // all-ones lanes where kept
    (Vec::loadu(w + i) & m).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = s[i] > t ? w[i] : T(0);
}

// The same over n elements, in parallel.
template <typename T>
void mask_weight(const T* w, const T* s, T t, T* dst, int64_t n) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) { mask_row<T>(w + b, s + b, t, dst + b, e - b); });
}

// In place: g[i] -> g[i] * w[i] (dS); and dw[i] = s[i] > t ? g[i] : 0 when dw is given.
template <typename T>
void score_and_weight_grads(T* g, const T* w, const T* s, T t, T* dw, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vt(t);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + Vec::size() <= e; i += Vec::size()) {
      const Vec gv = Vec::loadu(g + i);
      if (dw) (gv & (Vec::loadu(s + i) > vt)).store(dw + i);
      (gv * Vec::loadu(w + i)).store(g + i);
    }
    for (; i < e; ++i) {
      if (dw) dw[i] = s[i] > t ? g[i] : T(0);
      g[i] = g[i] * w[i];
    }
  });
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return shape;
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                             double threshold, const std::optional<at::Tensor>& bias) {
  check_masked_linear(kMaskedLinear, x, weight, scores, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  if (needs_upcast(x.scalar_type())) {
    std::optional<at::Tensor> b32;
    if (has_bias) b32 = bias->to(at::kFloat);
    return masked_linear_cpu(x.to(at::kFloat), weight.to(at::kFloat), scores.to(at::kFloat),
                             threshold, b32).to(x.scalar_type());
  }
  const int64_t out = weight.size(0), in = weight.size(1);
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  const int64_t N = y.numel() / std::max<int64_t>(out, 1);
  if (y.numel() == 0) return y;
  at::Tensor y2 = y.view({N, out});
  const at::Tensor x2 = x.reshape({N, in});
  const at::Tensor wc = weight.contiguous(), sc = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_linear_cpu", [&] {
    const scalar_t t = static_cast<scalar_t>(threshold);
    if (sparse_path<scalar_t>(sc.data_ptr<scalar_t>(), t, out * in)) {
      auto& csr = csr_scratch<scalar_t>();
      sparse_cpu::build_masked_csr<scalar_t>(wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), t, out,
                                             in, /*transposed=*/false, csr);
      const at::Tensor xc = x2.contiguous();
      const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
      sparse_cpu::sparse_linear_impl<scalar_t>(xc.data_ptr<scalar_t>(), csr.crow.data(), csr.col.data(),
                                               csr.val.data(), has_bias ? bc.data_ptr<scalar_t>() : nullptr,
                                               y.data_ptr<scalar_t>(), N, in, out);
      return;
    }
    scalar_t* wm = scratch<scalar_t>(std::min(out, kBlock) * in);
    for (int64_t o0 = 0; o0 < out; o0 += kBlock) {
      const int64_t oc = std::min(kBlock, out - o0);
      // Rows o0..o0+oc of W and S are contiguous: one masked block [oc, in].
      mask_weight<scalar_t>(wc.data_ptr<scalar_t>() + o0 * in, sc.data_ptr<scalar_t>() + o0 * in, t,
                            wm, oc * in);
      const at::Tensor Wm = at::from_blob(wm, {oc, in}, x.options());
      at::Tensor yb = y2.narrow(1, o0, oc);
      if (has_bias) {
        at::addmm_out(yb, bias->narrow(0, o0, oc), x2, Wm.t());
      } else {
        at::mm_out(yb, x2, Wm.t());
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
    double threshold, std::array<bool, 4> mask) {
  const char* op = kMaskedLinearBackward;
  check_masked_linear(op, x, weight, scores, std::nullopt);
  check_same(op, x, "x", grad_y, "grad_y");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_y.sizes() == c10::IntArrayRef(out_shape(x, out)), op, ": grad_y has shape ",
              grad_y.sizes(), " but the output of masked_linear has shape ",
              c10::IntArrayRef(out_shape(x, out)));
  if (needs_upcast(x.scalar_type())) {
    auto g = masked_linear_backward_cpu(grad_y.to(at::kFloat), x.to(at::kFloat), weight.to(at::kFloat),
                                        scores.to(at::kFloat), threshold, mask);
    auto down = [&](const at::Tensor& t) { return t.to(x.scalar_type()); };
    return {down(std::get<0>(g)), down(std::get<1>(g)), down(std::get<2>(g)), down(std::get<3>(g))};
  }
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = empty(), gw = empty(), gs = empty(), gb = empty();
  const int64_t N = out > 0 ? grad_y.numel() / out : x.numel() / std::max<int64_t>(in, 1);
  const at::Tensor g2 = grad_y.reshape({N, out});
  const at::Tensor x2 = x.reshape({N, in});
  const at::Tensor wc = weight.contiguous(), sc = scores.contiguous();
  if (mask[3]) gb = g2.sum(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_linear_backward_cpu", [&] {
    const scalar_t t = static_cast<scalar_t>(threshold);
    if (mask[0]) {
      gx = at::empty(x.sizes(), x.options());
      if (gx.numel() > 0) {
        at::Tensor gx2 = gx.view({N, in});
        if (out == 0) gx2.zero_();
        const bool sparse = out > 0 && sparse_path<scalar_t>(sc.data_ptr<scalar_t>(), t, out * in);
        if (sparse) {
          // dX = dY @ Wm = dY @ (Wm.T).T: the sparse kernel with the CSR of Wm.T [in, out].
          auto& csr = csr_scratch<scalar_t>();
          sparse_cpu::build_masked_csr<scalar_t>(wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), t,
                                                 out, in, /*transposed=*/true, csr);
          const at::Tensor gc = g2.contiguous();
          sparse_cpu::sparse_linear_impl<scalar_t>(gc.data_ptr<scalar_t>(), csr.crow.data(),
                                                   csr.col.data(), csr.val.data(), nullptr,
                                                   gx.data_ptr<scalar_t>(), N, out, in);
        }
        scalar_t* wm = sparse ? nullptr : scratch<scalar_t>(out * std::min(in, kBlock));
        for (int64_t c0 = 0; c0 < in && out > 0 && !sparse; c0 += kBlock) {
          const int64_t cc = std::min(kBlock, in - c0);
          // Columns c0..c0+cc of the masked weight: a [out, cc] block, row by row.
          const scalar_t* w0 = wc.data_ptr<scalar_t>() + c0;
          const scalar_t* s0 = sc.data_ptr<scalar_t>() + c0;
          at::parallel_for(0, out, std::max<int64_t>(1, (1 << 15) / cc), [&](int64_t b, int64_t e) {
            for (int64_t o = b; o < e; ++o) {
              mask_row<scalar_t>(w0 + o * in, s0 + o * in, t, wm + o * cc, cc);
            }
          });
          at::Tensor gxb = gx2.narrow(1, c0, cc);
          at::mm_out(gxb, g2, at::from_blob(wm, {out, cc}, x.options()));
        }
      }
    }
    if (mask[1] || mask[2]) {
      // G = dY.T @ x lands in dS's buffer; the fused pass turns it into dS (and writes dW).
      gs = at::empty({out, in}, x.options());
      at::mm_out(gs, g2.t(), x2);
      if (mask[1]) gw = at::empty({out, in}, x.options());
      score_and_weight_grads<scalar_t>(gs.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                       sc.data_ptr<scalar_t>(), t,
                                       mask[1] ? gw.data_ptr<scalar_t>() : nullptr, out * in);
      if (!mask[2]) gs = empty();
    }
  });
  return {gx, gw, gs, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("_masked_linear_backward", &masked_linear_backward_cpu);
}

}  // namespace effnlp
