// CUDA kernels of masked_linear and its straight-through backward (math: cpu/masked_linear.cpp).
//
// Forward: one elementwise kernel writes the masked weight Wm = (S > t) ? W : 0 into a transient
// buffer from the caching allocator, then cuBLAS: y = bias + x @ Wm.T (ATen addmm/mm on the
// current stream). Backward: G = dY.T @ x is written straight into dS's buffer and one fused
// kernel turns it into dS = G * W and dW = G * 1[S > t]; dX = dY @ Wm with Wm recomputed from
// S. Half and bfloat16 compare and multiply in float32; cuBLAS accumulates in float32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "effnlp/masked_linear.h"

namespace effnlp {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename T>
__global__ void mask_weight_kernel(const T* __restrict__ w, const T* __restrict__ s, float t,
                                   T* __restrict__ dst, int64_t n) {
  using Op = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    dst[i] = static_cast<Op>(s[i]) > static_cast<Op>(t) ? w[i] : T(0);
  }
}

template <typename T>
__global__ void score_weight_grads_kernel(T* __restrict__ g, const T* __restrict__ w,
                                          const T* __restrict__ s, float t, T* __restrict__ dw,
                                          int64_t n) {
  using Op = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const Op gv = static_cast<Op>(g[i]);
    if (dw != nullptr) dw[i] = static_cast<Op>(s[i]) > static_cast<Op>(t) ? g[i] : T(0);
    g[i] = static_cast<T>(gv * static_cast<Op>(w[i]));
  }
}

// double scores compare against the double threshold (float32 and half types against its
// float32 rounding, as the CPU kernel does).
template <typename T>
__global__ void mask_weight_kernel_d(const T* __restrict__ w, const T* __restrict__ s, double t,
                                     T* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    dst[i] = s[i] > t ? w[i] : T(0);
  }
}

template <typename T>
__global__ void score_weight_grads_kernel_d(T* __restrict__ g, const T* __restrict__ w,
                                            const T* __restrict__ s, double t, T* __restrict__ dw,
                                            int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (dw != nullptr) dw[i] = s[i] > t ? g[i] : T(0);
    g[i] = g[i] * w[i];
  }
}

template <typename T>
void launch_mask(const T* w, const T* s, double t, T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  if constexpr (std::is_same_v<T, double>) {
    mask_weight_kernel_d<T><<<blocks_for(n), kThreads, 0, stream>>>(w, s, t, dst, n);
  } else {
    mask_weight_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(w, s, static_cast<float>(t), dst, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_grads(T* g, const T* w, const T* s, double t, T* dw, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  if constexpr (std::is_same_v<T, double>) {
    score_weight_grads_kernel_d<T><<<blocks_for(n), kThreads, 0, stream>>>(g, w, s, t, dw, n);
  } else {
    score_weight_grads_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(g, w, s, static_cast<float>(t), dw, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  return shape;
}

at::Tensor masked_weight(const at::Tensor& wc, const at::Tensor& sc, double t) {
  at::Tensor wm = at::empty(wc.sizes(), wc.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "masked_weight_cuda", [&] {
    launch_mask<scalar_t>(wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), t, wm.data_ptr<scalar_t>(),
                          wc.numel(), stream);
  });
  return wm;
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
                              double threshold, const std::optional<at::Tensor>& bias) {
  check_masked_linear(kMaskedLinear, x, weight, scores, bias);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  if (y.numel() == 0) return y;
  const int64_t N = y.numel() / out;
  at::Tensor y2 = y.view({N, out});
  const at::Tensor x2 = x.reshape({N, in});
  const at::Tensor wm = masked_weight(weight.contiguous(), scores.contiguous(), threshold);
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y2, *bias, x2, wm.t());
  } else {
    at::mm_out(y2, x2, wm.t());
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores,
    double threshold, std::array<bool, 4> mask) {
  const char* op = kMaskedLinearBackward;
  check_masked_linear(op, x, weight, scores, std::nullopt);
  check_same(op, x, "x", grad_y, "grad_y");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_y.sizes() == c10::IntArrayRef(out_shape(x, out)), op, ": grad_y has shape ",
              grad_y.sizes(), " but the output of masked_linear has shape ",
              c10::IntArrayRef(out_shape(x, out)));
  c10::cuda::CUDAGuard guard(x.device());
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = empty(), gw = empty(), gs = empty(), gb = empty();
  const int64_t N = out > 0 ? grad_y.numel() / out : x.numel() / std::max<int64_t>(in, 1);
  const at::Tensor g2 = grad_y.reshape({N, out});
  const at::Tensor x2 = x.reshape({N, in});
  const at::Tensor wc = weight.contiguous(), sc = scores.contiguous();
  if (mask[3]) gb = g2.sum(0);
  if (mask[0]) {
    gx = at::empty(x.sizes(), x.options());
    if (gx.numel() > 0) {
      at::Tensor gx2 = gx.view({N, in});
      if (out == 0) {
        gx2.zero_();
      } else {
        at::mm_out(gx2, g2, masked_weight(wc, sc, threshold));
      }
    }
  }
  if (mask[1] || mask[2]) {
    gs = at::empty({out, in}, x.options());
    if (N == 0) {
      gs.zero_();
    } else {
      at::mm_out(gs, g2.t(), x2);
    }
    if (mask[1]) gw = at::empty({out, in}, x.options());
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_linear_grads_cuda", [&] {
      launch_grads<scalar_t>(gs.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                             threshold, mask[1] ? gw.data_ptr<scalar_t>() : nullptr, out * in, stream);
    });
    if (!mask[2]) gs = empty();
  }
  return {gx, gw, gs, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("_masked_linear_backward", &masked_linear_backward_cuda);
}

}  // namespace effnlp
