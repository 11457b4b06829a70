// CPU kernel of sparse_linear: y = x @ W.T + bias with W [out, in] in CSR (int32 indices), the
// inference path of an exported TAMT subnetwork.
//
// Layout: tokens go in blocks of B = 8 vectors (64 floats, 32 doubles). A block of x is
// transposed once into a thread-local panel xT [in, B] (contiguous rows of B, in L2); each
// output row o is then sum_p W[o, col_p] * xT[col_p, :], eight register accumulators fed
// by one broadcast value and eight contiguous loads per nonzero. So every nonzero costs B
// FMAs at full vector width with no gather, the ideal for an unstructured mask. Accumulators
// start at the bias; rows are done in chunks whose results (a [chunk, B] tile) are transposed
// back into y. Both transposes go through 8x8 register tiles (at::vec::transpose_mxn).
// The work is split over (token block, row chunk) tiles in block-major order, so a thread
// re-transposes only when its block changes and small batches still use every core.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "effnlp/masked_linear.h"

namespace effnlp {
namespace {

template <typename T>
struct Panel {
  std::vector<T> xt, tile;
  int64_t block = -1;
};

template <typename T>
Panel<T>& panel() {
  thread_local Panel<T> p;
  return p;
}

// dst[j, i] = src[i, j] for a [rows, cols] src (leading dims ld_src, ld_dst), 8x8 tiles.
template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  for (int64_t i0 = 0; i0 < rows; i0 += 8) {
    const int64_t mi = std::min<int64_t>(8, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += 8) {
      const int64_t mj = std::min<int64_t>(8, cols - j0);
      const T* s = src + i0 * ld_src + j0;
      T* d = dst + j0 * ld_dst + i0;
      if (mi == 8 && mj == 8) {
        at::vec::transpose_mxn<T, 8, 8>(s, ld_src, d, ld_dst);
      } else {
        at::vec::transpose_mxn<T>(s, ld_src, d, ld_dst, static_cast<int>(mi), static_cast<int>(mj));
      }
    }
  }
}

template <typename T>
void sparse_linear_impl(const T* x, const int32_t* crow, const int32_t* col, const T* val,
                        const T* bias, T* y, int64_t N, int64_t in, int64_t out) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t B = 8 * V;
  constexpr int64_t kChunk = 128;
  const int64_t nblocks = (N + B - 1) / B;
  const int64_t nchunks = (out + kChunk - 1) / kChunk;
  at::parallel_for(0, nblocks * nchunks, 1, [&](int64_t t0, int64_t t1) {
    Panel<T>& P = panel<T>();
    if (static_cast<int64_t>(P.xt.size()) < in * B) P.xt.resize(in * B);
    if (static_cast<int64_t>(P.tile.size()) < kChunk * B) P.tile.resize(kChunk * B);
    P.block = -1;  // a fresh range: the panel of a previous call is stale
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / nchunks, chunk = t % nchunks;
      const int64_t n0 = blk * B, nb = std::min<int64_t>(B, N - n0);
      T* xt = P.xt.data();
      if (P.block != blk) {
        // xT[k, j] = x[n0 + j, k]; lanes past the last token are zero.
        // x block [nb, in] -> xT [in, B] in 8x8 tiles (AVX2 shuffles for float).
        transpose(x + n0 * in, in, xt, B, nb, in);
        if (nb < B) {
          for (int64_t k = 0; k < in; ++k) std::fill(xt + k * B + nb, xt + (k + 1) * B, T(0));
        }
        P.block = blk;
      }
      const int64_t o0 = chunk * kChunk, o1 = std::min<int64_t>(out, o0 + kChunk);
      T* tile = P.tile.data();
      for (int64_t o = o0; o < o1; ++o) {
        const Vec init(bias ? bias[o] : T(0));
        Vec a0 = init, a1 = init, a2 = init, a3 = init, a4 = init, a5 = init, a6 = init, a7 = init;
        for (int32_t p = crow[o]; p < crow[o + 1]; ++p) {
          const Vec v(val[p]);
          const T* r = xt + static_cast<int64_t>(col[p]) * B;
          a0 = at::vec::fmadd(v, Vec::loadu(r), a0);
          a1 = at::vec::fmadd(v, Vec::loadu(r + V), a1);
          a2 = at::vec::fmadd(v, Vec::loadu(r + 2 * V), a2);
          a3 = at::vec::fmadd(v, Vec::loadu(r + 3 * V), a3);
          a4 = at::vec::fmadd(v, Vec::loadu(r + 4 * V), a4);
          a5 = at::vec::fmadd(v, Vec::loadu(r + 5 * V), a5);
          a6 = at::vec::fmadd(v, Vec::loadu(r + 6 * V), a6);
          a7 = at::vec::fmadd(v, Vec::loadu(r + 7 * V), a7);
        }
        T* dst = tile + (o - o0) * B;
        a0.store(dst); a1.store(dst + V); a2.store(dst + 2 * V); a3.store(dst + 3 * V);
        a4.store(dst + 4 * V); a5.store(dst + 5 * V); a6.store(dst + 6 * V); a7.store(dst + 7 * V);
      }
      // tile [rows, B] (bias already in) -> y[n0.., o0..] [nb, rows], 8x8 tiles.
      transpose(tile, B, y + n0 * out + o0, out, o1 - o0, nb);
    }
  });
}

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
