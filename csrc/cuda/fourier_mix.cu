// CUDA kernel of fourier_mix: y = Re(F_L X F_H) per sequence (see cpu/fourier_mix.cpp for the
// math). The two transforms are cuFFT through ATen on the current stream: a real FFT along H
// (half spectrum, K = H/2+1 columns), then a complex FFT along L of that half spectrum. One
// elementwise kernel then writes every output element once from it, real part and Hermitian
// mirror fused:
//   y[j, k] = Re Z[j, k] (k < K),    y[j, H-k] = Re Z[(n-j) mod n, k] (1 <= k <= H-K).
// With lengths, sequences of equal true length are gathered into one batched transform and the
// kernel scatters them back; padding rows stay zero. Half and bfloat16 inputs are transformed in
// float32 (cuFFT's half transforms only take power-of-two sizes) and rounded once on output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <type_traits>

#include "effnlp/fourier_mix.h"

namespace effnlp {
namespace {

constexpr const char* kOp = "fourier_mix";

// One thread per output element of the chunk's c sequences [c, n, H].
template <typename T, typename OutT>
__global__ void write_from_spectrum_kernel(const T* __restrict__ Z, OutT* __restrict__ y,
                                           const int64_t* __restrict__ seq, int64_t c, int64_t n,
                                           int64_t L, int64_t H, int64_t K) {
  const int64_t total = c * n * H;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = i % H;
    const int64_t j = (i / H) % n;
    const int64_t s = i / (H * n);
    const T* zs = Z + 2 * s * n * K;
    const T v = col < K ? zs[2 * (j * K + col)] : zs[2 * (((n - j) % n) * K + (H - col))];
    const int64_t b = seq == nullptr ? s : seq[s];
    y[(b * L + j) * H + col] = static_cast<OutT>(v);
  }
}

at::Tensor fourier_mix_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& lengths) {
  const FourierShape s = check_fourier_mix(kOp, x_in, lengths);
  TORCH_CHECK(x_in.is_cuda(), kOp, ": x must be a CUDA tensor here");
  const auto groups = group_by_length(kOp, s, lengths);  // reads lengths on the host
  const bool has_lengths = lengths.has_value() && lengths->defined();
  at::Tensor y = has_lengths ? at::zeros(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous))
                             : at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const bool half = x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16;
  at::Tensor x3 = (half ? x_in.to(at::kFloat) : x_in).contiguous().view({s.batch, s.L, s.H});
  const int64_t K = s.H / 2 + 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  for (const auto& g : groups) {
    if (g.n == 0) continue;
    at::Tensor seq_dev;
    at::Tensor xin;
    if (!has_lengths) {
      xin = x3;
    } else {
      seq_dev = at::tensor(g.index, at::TensorOptions().dtype(at::kLong)).to(x_in.device());
      xin = x3.narrow(1, 0, g.n).index_select(0, seq_dev);
    }
    // cuFFT plans are cached by ATen; one batched transform per group.
    at::Tensor R = at::_fft_r2c(xin, {2}, /*normalization=*/0, /*onesided=*/true);
    at::Tensor Z = at::_fft_c2c(R, {1}, /*normalization=*/0, /*forward=*/true).contiguous();
    const int64_t c = xin.size(0);
    const int64_t total = c * g.n * s.H;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
    const int64_t* seq = has_lengths ? seq_dev.data_ptr<int64_t>() : nullptr;
    // The spectrum is float64 for float64 inputs and float32 otherwise (half precisions are
    // transformed in float32).
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fourier_mix_cuda", [&] {
      using in_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      write_from_spectrum_kernel<in_t, scalar_t><<<blocks, threads, 0, stream>>>(
          reinterpret_cast<const in_t*>(Z.data_ptr()), y.data_ptr<scalar_t>(), seq, c, g.n, s.L,
          s.H, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CUDA, m) { m.impl("fourier_mix", &fourier_mix_cuda); }

}  // namespace effnlp
