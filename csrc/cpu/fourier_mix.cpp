// CPU kernel of fourier_mix: y = Re(F_L X F_H) per sequence X [L, H] (FNet's token mixing).
//
// The input is real, so the transform along H is a real FFT: R = rfft_H(X) [L, K], K = H/2+1,
// holds every column k <= H/2 of X F_H, and column H-k is conj(R[:, k]). Only the real part of
// the second transform is wanted, and it follows from the half spectrum alone:
//   columns k < K:          y[j, k]   = Re Z[j, k],              Z = F_L R
//   mirrored columns:       y[j, H-k] = Re Z[(L-j) mod L, k],     1 <= k <= H-K
// (Re(F_L conj(r))[j] = Re(conj(Z[-j]))). That is half the work of a complex fft2, and the
// output is written once from Z, real part and mirror fused, with no full-size permuted copy.
//
// The second transform has two implementations:
//   FFT  (long L): Z = fft_L(R) by the FFT torch was built with (MKL here), through ATen.
//   GEMM (short L): with C = cos(2 pi j m / L), S = sin(...) (cached per L and dtype),
//        P = C Re(R), Q = S Im(R)  ->  y[j, k] = P + Q,  y[j, H-k] = P - Q
//        (cos is even and sin odd in j); two real GEMMs per sequence on de-interleaved halves.
// The crossover is a measured length (kGemmMaxL).
//
// Sequences are processed in chunks sized to stay in cache, through per-thread scratch buffers
// that persist across calls (fresh large allocations page-fault at a fraction of memcpy speed
// on these VMs). With lengths, sequences of equal true length form one batched transform;
// padding rows are written as zeros and never read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "effnlp/fourier_mix.h"

namespace effnlp {
namespace {

constexpr const char* kOp = "fourier_mix";
// Sequence lengths up to this use the DFT-as-GEMM path (measured crossover, see bench_fnet;
// EFFNLP_FOURIER_GEMM_MAX_L overrides it, for that measurement).
constexpr int64_t kGemmMaxL = 32;

int64_t gemm_max_len() {
  const char* env = std::getenv("EFFNLP_FOURIER_GEMM_MAX_L");
  return env != nullptr ? std::atoll(env) : kGemmMaxL;
}
// Elements of x per chunk: the chunk, its half spectrum and the transformed spectrum together
// stay within the last-level cache.
constexpr int64_t kChunkElems = int64_t(1) << 19;

at::Tensor& scratch(int slot, int64_t numel, const at::TensorOptions& opts) {
  thread_local std::map<std::pair<int, at::ScalarType>, at::Tensor> buffers;
  auto& t = buffers[{slot, opts.dtype().toScalarType()}];
  if (!t.defined() || t.numel() < numel) t = at::empty({numel}, opts);
  return t;
}

// cos and sin tables [n, n] of the length-n DFT, computed in double and cached.
std::pair<at::Tensor, at::Tensor> dft_tables(int64_t n, at::ScalarType dtype) {
  static std::mutex mu;
  static std::map<std::pair<int64_t, at::ScalarType>, std::pair<at::Tensor, at::Tensor>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({n, dtype});
  if (it != cache.end()) return it->second;
  auto c = at::empty({n, n}, at::kDouble), s = at::empty({n, n}, at::kDouble);
  double* pc = c.data_ptr<double>();
  double* ps = s.data_ptr<double>();
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t m = 0; m < n; ++m) {
      const double a = 2.0 * M_PI * double((j * m) % n) / double(n);  // exact phase index
      pc[j * n + m] = std::cos(a);
      ps[j * n + m] = std::sin(a);
    }
  }
  auto entry = std::make_pair(c.to(dtype), s.to(dtype));
  cache.emplace(std::make_pair(n, dtype), entry);
  return entry;
}

// y rows of one sequence from its transformed spectrum Z [n, K] (complex, interleaved).
template <typename T>
void write_from_spectrum(const T* Z, T* y, int64_t n, int64_t H, int64_t K, int64_t j0,
                         int64_t j1) {
  const int64_t mirror = H - K;
  for (int64_t j = j0; j < j1; ++j) {
    const T* zr = Z + 2 * j * K;
    const T* zm = Z + 2 * ((n - j) % n) * K;
    T* yr = y + j * H;
    for (int64_t k = 0; k < K; ++k) yr[k] = zr[2 * k];
    for (int64_t k = 1; k <= mirror; ++k) yr[H - k] = zm[2 * k];
  }
}

// y rows of one sequence from P = C Re(R) and Q = S Im(R), both [n, K].
template <typename T>
void write_from_pq(const T* P, const T* Q, T* y, int64_t H, int64_t K, int64_t j0, int64_t j1) {
  const int64_t mirror = H - K;
  for (int64_t j = j0; j < j1; ++j) {
    const T* p = P + j * K;
    const T* q = Q + j * K;
    T* yr = y + j * H;
    for (int64_t k = 0; k < K; ++k) yr[k] = p[k] + q[k];
    for (int64_t k = 1; k <= mirror; ++k) yr[H - k] = p[k] - q[k];
  }
}

template <typename T>
void mix_group(const at::Tensor& x3, at::Tensor& y3, const LengthGroup& g, int64_t L, int64_t H) {
  const int64_t n = g.n;
  const int64_t K = H / 2 + 1;
  const auto ropts = x3.options();
  const auto copts = ropts.dtype(c10::toComplexType(x3.scalar_type()));
  const bool contiguous_run =
      n == L && (g.index.empty() || g.index.back() - g.index.front() + 1 ==
                                        static_cast<int64_t>(g.index.size()));
  const bool gemm = n <= gemm_max_len();
  const int64_t per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, n * H));
  const int64_t count = static_cast<int64_t>(g.index.size());
  at::Tensor cos_t, sin_t;
  if (gemm) std::tie(cos_t, sin_t) = dft_tables(n, x3.scalar_type());
  for (int64_t c0 = 0; c0 < count; c0 += per_chunk) {
    const int64_t c = std::min(per_chunk, count - c0);
    // The chunk's sequences [c, n, H]: a view when they are adjacent and full length.
    at::Tensor xin;
    if (contiguous_run) {
      xin = x3.narrow(0, g.index[c0], c);
    } else {
      auto idx = at::from_blob(const_cast<int64_t*>(g.index.data() + c0), {c}, at::kLong);
      xin = scratch(0, c * n * H, ropts).narrow(0, 0, c * n * H).view({c, n, H});
      at::index_select_out(xin, x3.narrow(1, 0, n), 0, idx);
    }
    at::Tensor R = scratch(1, c * n * K, copts).narrow(0, 0, c * n * K).view({c, n, K});
    at::_fft_r2c_out(R, xin, {2}, /*normalization=*/0, /*onesided=*/true);
    if (gemm) {
      // De-interleave R into Re/Im halves, then P = C Re(R), Q = S Im(R) per sequence.
      at::Tensor ri = scratch(2, 2 * c * n * K, ropts).narrow(0, 0, 2 * c * n * K).view({2, c, n, K});
      at::Tensor rv = at::view_as_real(R);  // [c, n, K, 2]
      ri.select(0, 0).copy_(rv.select(3, 0));
      ri.select(0, 1).copy_(rv.select(3, 1));
      at::Tensor pq = scratch(3, 2 * c * n * K, ropts).narrow(0, 0, 2 * c * n * K).view({2, c, n, K});
      for (int64_t q = 0; q < c; ++q) {
        auto out_p = pq[0][q], out_q = pq[1][q];
        at::mm_out(out_p, cos_t, ri[0][q]);
        at::mm_out(out_q, sin_t, ri[1][q]);
      }
      const T* P = pq.select(0, 0).data_ptr<T>();
      const T* Q = pq.select(0, 1).data_ptr<T>();
      T* y = y3.data_ptr<T>();
      const int64_t* idx = g.index.data() + c0;
      at::parallel_for(0, c * n, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1;) {
          const int64_t s = r / n, j = r % n, j1 = std::min(n, j + (r1 - r));
          write_from_pq(P + s * n * K, Q + s * n * K, y + idx[s] * L * H, H, K, j, j1);
          r += j1 - j;
        }
      });
    } else {
      at::Tensor Z = scratch(4, c * n * K, copts).narrow(0, 0, c * n * K).view({c, n, K});
      at::_fft_c2c_out(Z, R, {1}, /*normalization=*/0, /*forward=*/true);
      const T* z = reinterpret_cast<const T*>(Z.data_ptr());
      T* y = y3.data_ptr<T>();
      const int64_t* idx = g.index.data() + c0;
      at::parallel_for(0, c * n, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1;) {
          const int64_t s = r / n, j = r % n, j1 = std::min(n, j + (r1 - r));
          write_from_spectrum(z + 2 * s * n * K, y + idx[s] * L * H, n, H, K, j, j1);
          r += j1 - j;
        }
      });
    }
  }
}

at::Tensor fourier_mix_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& lengths) {
  const FourierShape s = check_fourier_mix(kOp, x_in, lengths);
  TORCH_CHECK(x_in.device().is_cpu(), kOp, ": x must be a CPU tensor here");
  const auto groups = group_by_length(kOp, s, lengths);
  // Half precision is computed in float32 (no half FFT on CPU) and rounded once at the end.
  const bool half = x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16;
  at::Tensor x = (half ? x_in.to(at::kFloat) : x_in).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return half ? y.to(x_in.scalar_type()) : y;
  at::Tensor x3 = x.view({s.batch, s.L, s.H});
  at::Tensor y3 = y.view({s.batch, s.L, s.H});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fourier_mix_cpu", [&] {
    for (const auto& g : groups) {
      if (g.n < s.L) {  // padding rows (all rows when n == 0) are zero
        for (int64_t b : g.index) y3[b].narrow(0, g.n, s.L - g.n).zero_();
      }
      if (g.n > 0) mix_group<scalar_t>(x3, y3, g, s.L, s.H);
    }
  });
  return half ? y.to(x_in.scalar_type()) : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) { m.impl("fourier_mix", &fourier_mix_cpu); }

}  // namespace effnlp
