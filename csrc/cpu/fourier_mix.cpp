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
// Measured (bench_fnet's crossover, 2 threads, B=8, H=96..768): the FFT path is 1.5-3.4x faster
// at every L from 4 to 128, so the GEMM path is off by default (kGemmMaxL = 0); it stays
// reachable through EFFNLP_FOURIER_GEMM_MAX_L for that measurement and the tests.
//
// FFT path, with oneMKL (the x86_64 torch builds export it): one committed single-threaded 2-D
// real-to-complex plan per thread and length, kept across calls; in parallel over sequences,
// each thread transforms a sequence into its own cache-resident spectrum and writes that
// sequence's output rows from it, so the half spectrum never makes a round trip to memory.
// With fewer sequences than threads (one long document), sequences go one at a time through a
// cached plan that threads inside MKL, then a parallel pass writes their rows: ATen's FFT would
// build a new plan on every call (bench_fnet, 1x4096x384, 2 threads: fwd+bwd 1.42x -> 1.66x
// the best torch composition).
// Without MKL, the same math through ATen's FFT, one batched transform per group of equal
// lengths, then one parallel pass writing y.
// With lengths, padding rows are written as zeros and never read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "effnlp/fourier_mix.h"

// oneMKL's DFT interface, which the x86_64 builds of torch link statically and export. The
// declarations are weak: on a torch without MKL they resolve to null and the kernel takes the
// ATen path instead. Values of the configuration enums as in mkl_dfti.h.
extern "C" {
struct DFTI_DESCRIPTOR;
typedef DFTI_DESCRIPTOR* DFTI_DESCRIPTOR_HANDLE;
long DftiCreateDescriptor_s_md(DFTI_DESCRIPTOR_HANDLE*, int, long, ...) __attribute__((weak));
long DftiCreateDescriptor_d_md(DFTI_DESCRIPTOR_HANDLE*, int, long, ...) __attribute__((weak));
long DftiSetValue(DFTI_DESCRIPTOR_HANDLE, int, ...) __attribute__((weak));
long DftiCommitDescriptor(DFTI_DESCRIPTOR_HANDLE) __attribute__((weak));
long DftiComputeForward(DFTI_DESCRIPTOR_HANDLE, void*, ...) __attribute__((weak));
long DftiFreeDescriptor(DFTI_DESCRIPTOR_HANDLE*) __attribute__((weak));
char* DftiErrorMessage(long) __attribute__((weak));
}

namespace effnlp {
namespace {

namespace dfti {
constexpr int kReal = 33, kPlacement = 11, kNotInplace = 44, kConjEvenStorage = 10,
              kComplexComplex = 39, kInputStrides = 12, kOutputStrides = 13, kThreadLimit = 27;
}  // namespace dfti

bool have_mkl_dft() {
  return DftiCreateDescriptor_s_md != nullptr && DftiCreateDescriptor_d_md != nullptr &&
         DftiSetValue != nullptr && DftiCommitDescriptor != nullptr &&
         DftiComputeForward != nullptr && DftiFreeDescriptor != nullptr &&
         std::getenv("EFFNLP_FOURIER_NO_MKL") == nullptr;
}

void dfti_check(long status, const char* what) {
  TORCH_CHECK(status == 0, "fourier_mix: MKL DFT ", what, " failed: ",
              DftiErrorMessage != nullptr ? DftiErrorMessage(status) : "(no message)");
}

// A committed 2-D real-to-complex plan [n, H] -> [n, H/2+1] (CCE storage) that uses at most
// `threads` MKL threads, one per calling thread, length, precision and thread limit, kept for the
// life of the calling thread.
struct Plan {
  DFTI_DESCRIPTOR_HANDLE handle = nullptr;
  ~Plan() {
    if (handle != nullptr) DftiFreeDescriptor(&handle);
  }
};

DFTI_DESCRIPTOR_HANDLE plan_2d_r2c(int64_t n, int64_t H, bool dbl, long threads) {
  thread_local std::map<std::tuple<int64_t, int64_t, bool, long>, Plan> plans;
  Plan& p = plans[{n, H, dbl, threads}];
  if (p.handle == nullptr) {
    long lengths[2] = {long(n), long(H)};
    const long K = long(H / 2 + 1);
    long in_strides[3] = {0, long(H), 1};
    long out_strides[3] = {0, K, 1};
    DFTI_DESCRIPTOR_HANDLE h = nullptr;
    dfti_check(dbl ? DftiCreateDescriptor_d_md(&h, dfti::kReal, 2L, lengths)
                   : DftiCreateDescriptor_s_md(&h, dfti::kReal, 2L, lengths), "create");
    p.handle = h;
    dfti_check(DftiSetValue(h, dfti::kPlacement, dfti::kNotInplace), "placement");
    dfti_check(DftiSetValue(h, dfti::kConjEvenStorage, dfti::kComplexComplex), "storage");
    dfti_check(DftiSetValue(h, dfti::kInputStrides, in_strides), "input strides");
    dfti_check(DftiSetValue(h, dfti::kOutputStrides, out_strides), "output strides");
    dfti_check(DftiSetValue(h, dfti::kThreadLimit, threads), "thread limit");
    dfti_check(DftiCommitDescriptor(h), "commit");
  }
  return p.handle;
}

constexpr const char* kOp = "fourier_mix";
// Sequence lengths up to this use the DFT-as-GEMM path. 0: never (the FFT path won at every
// measured length, see the header); EFFNLP_FOURIER_GEMM_MAX_L overrides it.
constexpr int64_t kGemmMaxL = 0;

int64_t gemm_max_len() {
  const char* env = std::getenv("EFFNLP_FOURIER_GEMM_MAX_L");
  return env != nullptr ? std::atoll(env) : kGemmMaxL;
}
// Elements of x per ATen FFT call (ATen builds a plan per call, so the chunks are large).
int64_t chunk_elems() {
  const char* env = std::getenv("EFFNLP_FOURIER_CHUNK");
  return env != nullptr ? std::atoll(env) : (int64_t(1) << 26);
}

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

// y rows of one sequence from its transformed spectrum Z [n, K] (complex, interleaved):
// real parts de-interleaved with AVX2, the mirrored half written with the lanes reversed.
template <typename T>
void write_from_spectrum(const T* Z, T* y, int64_t n, int64_t H, int64_t K, int64_t j0,
                         int64_t j1) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t mirror = H - K;
  for (int64_t j = j0; j < j1; ++j) {
    const T* zr = Z + 2 * j * K;
    const T* zm = Z + 2 * ((n - j) % n) * K;
    T* yr = y + j * H;
    int64_t k = 0;
    for (; k + V <= K; k += V) {  // y[k .. k+V) = Re zr[k .. k+V)
      auto re_im = at::vec::deinterleave2(Vec::loadu(zr + 2 * k), Vec::loadu(zr + 2 * k + V));
      std::get<0>(re_im).store(yr + k);
    }
    for (; k < K; ++k) yr[k] = zr[2 * k];
    // y[H-k] = Re zm[k] for k = 1..mirror: a block k .. k+V-1 lands reversed at H-k-V+1 .. H-k.
    k = 1;
    for (; k + V - 1 <= mirror; k += V) {
      auto re_im = at::vec::deinterleave2(Vec::loadu(zm + 2 * k), Vec::loadu(zm + 2 * k + V));
      at::vec::flip(std::get<0>(re_im)).store(yr + H - k - V + 1);
    }
    for (; k <= mirror; ++k) yr[H - k] = zm[2 * k];
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

// The FFT path with MKL plans of our own: in parallel over sequences, each thread transforms one
// sequence into its own cache-resident spectrum and writes that sequence's output rows from it
// at once, so the spectrum never goes back to memory.
template <typename T>
void mix_sequences_mkl(const at::Tensor& x3, at::Tensor& y3, const std::vector<LengthGroup>& groups,
                       int64_t L, int64_t H, int64_t gemm_max) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (sequence, true length)
  for (const auto& g : groups) {
    if (g.n > gemm_max) {
      for (int64_t b : g.index) work.emplace_back(b, g.n);
    }
  }
  const int64_t K = H / 2 + 1;
  const T* x = x3.data_ptr<T>();
  T* y = y3.data_ptr<T>();
  // Sequence b (true length n) into this thread's spectrum buffer, by a cached plan that may
  // thread inside MKL; returns the spectrum [n, K] (complex, interleaved).
  auto transform = [&](int64_t b, int64_t n, long plan_threads) -> const T* {
    thread_local std::vector<T> spectrum;
    if (spectrum.size() < size_t(2 * n * K)) spectrum.resize(2 * n * K);
    DFTI_DESCRIPTOR_HANDLE h = plan_2d_r2c(n, H, std::is_same_v<T, double>, plan_threads);
    dfti_check(DftiComputeForward(h, const_cast<T*>(x + b * L * H), spectrum.data()), "compute");
    return spectrum.data();
  };
  const int threads = at::get_num_threads();
  if (static_cast<int64_t>(work.size()) < threads) {
    // Fewer sequences than threads (e.g. one long document): one at a time, each transformed by
    // a plan threaded inside MKL, its output rows then written in parallel.
    for (const auto& [b, n] : work) {
      const T* z = transform(b, n, long(threads));
      at::parallel_for(0, n, 64, [&, b = b, n = n](int64_t j0, int64_t j1) {
        write_from_spectrum(z, y + b * L * H, n, H, K, j0, j1);
      });
    }
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const auto [b, n] = work[w];
      write_from_spectrum(transform(b, n, 1L), y + b * L * H, n, H, K, 0, n);
    }
  });
}

template <typename T>
void mix_group(const at::Tensor& x3, at::Tensor& y3, const LengthGroup& g, int64_t L, int64_t H) {
  const int64_t n = g.n;
  const int64_t K = H / 2 + 1;
  const auto ropts = x3.options();
  const bool contiguous_run =
      n == L && (g.index.empty() || g.index.back() - g.index.front() + 1 ==
                                        static_cast<int64_t>(g.index.size()));
  const bool gemm = n <= gemm_max_len();
  const int64_t per_chunk = std::max<int64_t>(1, chunk_elems() / std::max<int64_t>(1, n * H));
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
    // The functional FFT ops: their out= variants transform into a temporary and copy it. The
    // GEMM path needs only the rfft along H; the FFT path takes both transforms in one 2-D
    // real-input plan (no intermediate spectrum round trip).
    at::Tensor R = at::_fft_r2c(xin, gemm ? at::IntArrayRef{2} : at::IntArrayRef{1, 2},
                                /*normalization=*/0, /*onesided=*/true);
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
      const at::Tensor& Z = R;
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
  const int64_t gemm_max = gemm_max_len();
  // Own cached MKL plans: single-threaded in parallel over sequences, or threaded inside MKL
  // when there are fewer sequences than threads (ATen would build a new plan every call).
  const bool own_plans = have_mkl_dft();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fourier_mix_cpu", [&] {
    for (const auto& g : groups) {
      if (g.n < s.L) {  // padding rows (all rows when n == 0) are zero
        for (int64_t b : g.index) y3[b].narrow(0, g.n, s.L - g.n).zero_();
      }
      if (g.n > 0 && (g.n <= gemm_max || !own_plans)) mix_group<scalar_t>(x3, y3, g, s.L, s.H);
    }
    if (own_plans) mix_sequences_mkl<scalar_t>(x3, y3, groups, s.L, s.H, gemm_max);
  });
  return half ? y.to(x_in.scalar_type()) : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) { m.impl("fourier_mix", &fourier_mix_cpu); }

}  // namespace effnlp
