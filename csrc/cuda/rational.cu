// CUDA kernels of the rational activation y = P(x) / (1 + |S(x)|) and its backward (math:
// include/effnlp/rational.h, the same per-element code the CPU kernel's scalar path runs).
//
// Both kernels run on a grid (blocks_x, G): block row g handles the elements of channel group
// g, whose coefficients it first copies into shared memory in the compute type (float for
// half, bfloat16 and float; double for double).
//
// Forward: elementwise, grid-stride.
// Backward: each thread writes dL/dx for its elements and keeps one partial sum per
// coefficient in registers (compute type; blocks_x grows with the input up to kMaxBlocksX, so
// a thread sums ~kPerThread elements for inputs up to ~2^31 per group); the block adds them in
// double with warp shuffles and one pass over its warps into a per-block partial, and a
// second kernel adds the blocks' partials, again in a fixed tree. blocks_x depends on the
// shape only (never on the device), so the coefficient gradients are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "effnlp/rational.h"

namespace effnlp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocksX = 1 << 20;
constexpr int64_t kPerThread = 8;  // elements per thread before another block is added
constexpr int kMaxK = 2 * kRationalMaxCoeffs;
// Degrees up to 7 (the default 5/4 included) use 8 + 8 per-thread sums, higher ones 16 + 16.
constexpr int kSmallK = 8;

// Blocks per group: a function of the group's element count alone.
int64_t blocks_x_for(int64_t per_group) {
  const int64_t want = (per_group + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  return std::max<int64_t>(1, std::min(kMaxBlocksX, want));
}

// Index of the t-th element of group g in x viewed as [N, G, L] (C = G * L).
__device__ __forceinline__ int64_t element_index(int64_t t, int64_t g, int64_t L, int64_t C, bool one_group) {
  return one_group ? t : (t / L) * C + g * L + (t % L);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_coeffs(acc_t* sc, const scalar_t* __restrict__ a,
                                            const scalar_t* __restrict__ b, int64_t g, int num, int den) {
  for (int k = threadIdx.x; k < num + den; k += blockDim.x) {
    sc[k] = k < num ? static_cast<acc_t>(a[g * num + k]) : static_cast<acc_t>(b[g * den + (k - num)]);
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void rational_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                        const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                        int num, int den, int64_t L, int64_t C, int64_t per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sc[kMaxK];
  const int64_t g = blockIdx.y;
  load_coeffs<scalar_t, acc_t>(sc, a, b, g, num, den);
  const bool one_group = gridDim.y == 1;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < per_group;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = element_index(t, g, L, C, one_group);
    y[i] = static_cast<scalar_t>(
        rational_forward_one<acc_t, acc_t>(static_cast<acc_t>(x[i]), sc, num, sc + num, den));
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// The block's sum of v over its threads, in a fixed order (warp trees, then the warps in
// order); valid in thread 0. scratch: kWarps doubles of shared memory.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) s += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return s;
}

// dx (when given) and, when partial is given, partial[(g * blocks_x + block) * K + k]: the
// block's sum of the k-th coefficient gradient (k < num: numerator, else denominator).
// KB >= max(num, den): the per-thread sums are arrays indexed by compile-time constants only
// (after unrolling), so they live in registers.
template <typename scalar_t, int KB>
__global__ void rational_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                         scalar_t* __restrict__ dx, const scalar_t* __restrict__ a,
                                         const scalar_t* __restrict__ b, int num, int den, int64_t L,
                                         int64_t C, int64_t per_group, double* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sc[kMaxK];
  __shared__ double scratch[kWarps];
  const int64_t g = blockIdx.y;
  load_coeffs<scalar_t, acc_t>(sc, a, b, g, num, den);
  const bool one_group = gridDim.y == 1;
  const bool coef = partial != nullptr;

  acc_t pa[KB], pb[KB];  // sums of u x^k (numerator) and v x^(k+1) (denominator)
#pragma unroll
  for (int k = 0; k < KB; ++k) pa[k] = pb[k] = acc_t(0);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < per_group;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = element_index(t, g, L, C, one_group);
    const acc_t xv = static_cast<acc_t>(x[i]);
    acc_t u, v;
    const acc_t d = rational_backward_one<acc_t, acc_t>(xv, static_cast<acc_t>(gy[i]), sc, num,
                                                        sc + num, den, u, v);
    if (dx != nullptr) dx[i] = static_cast<scalar_t>(d);
    if (coef) {
      pa[0] += u;
      acc_t xp = xv;
#pragma unroll
      for (int k = 1; k <= KB; ++k) {
        if (k < KB && k < num) pa[k] += u * xp;
        if (k <= den) pb[k - 1] += v * xp;
        xp *= xv;
      }
    }
  }
  if (!coef) return;
  const int64_t K = num + den;
  double* out = partial + (g * gridDim.x + blockIdx.x) * K;
#pragma unroll
  for (int k = 0; k < KB; ++k) {
    if (k < num) {  // uniform across the block: every thread takes part in block_sum
      const double s = block_sum(static_cast<double>(pa[k]), scratch);
      if (threadIdx.x == 0) out[k] = s;
    }
    if (k < den) {
      const double s = block_sum(static_cast<double>(pb[k]), scratch);
      if (threadIdx.x == 0) out[num + k] = s;
    }
  }
}

// One block per (g, k): ga[g, k] / gb[g, k] = the sum of the blocks' partials, each thread
// summing a fixed strided subset, then block_sum.
template <typename scalar_t>
__global__ void rational_finish_kernel(const double* __restrict__ partial, int64_t blocks_x, int num,
                                       int den, scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  __shared__ double scratch[kWarps];
  const int K = num + den;
  const int64_t g = blockIdx.x / K;
  const int k = static_cast<int>(blockIdx.x % K);
  double s = 0.0;
  for (int64_t blk = threadIdx.x; blk < blocks_x; blk += blockDim.x) {
    s += partial[(g * blocks_x + blk) * K + k];
  }
  s = block_sum(s, scratch);
  if (threadIdx.x != 0) return;
  if (k < num) {
    if (ga != nullptr) ga[g * num + k] = static_cast<scalar_t>(s);
  } else if (gb != nullptr) {
    gb[g * den + (k - num)] = static_cast<scalar_t>(s);
  }
}

void check_cuda_grid(const char* op, const RationalShape& s) {
  TORCH_CHECK(s.groups <= 65535, op, ": the CUDA kernel supports at most 65535 groups, got ", s.groups);
}

at::Tensor rational_cuda(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  const RationalShape s = check_rational(kRational, x, numerator, denominator);
  check_cuda_grid(kRational, s);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor ac = numerator.contiguous(), bc = denominator.contiguous();
  const int64_t per_group = x.numel() / s.groups;
  const dim3 grid(static_cast<unsigned>(blocks_x_for(per_group)), static_cast<unsigned>(s.groups));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_cuda", [&] {
    rational_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
        static_cast<int>(s.num), static_cast<int>(s.den), s.group_size, s.channels, per_group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& numerator,
    const at::Tensor& denominator, std::array<bool, 3> mask) {
  const char* op = kRationalBackward;
  const RationalShape s = check_rational_backward(op, grad_y, x, numerator, denominator);
  check_cuda_grid(op, s);
  c10::cuda::CUDAGuard guard(x.device());
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = mask[0] ? at::empty(x.sizes(), x.options()) : empty();
  at::Tensor ga = mask[1] ? at::empty(numerator.sizes(), numerator.options()) : empty();
  at::Tensor gb = mask[2] ? at::empty(denominator.sizes(), denominator.options()) : empty();
  const bool coef = mask[1] || mask[2];
  const int64_t per_group = x.numel() / s.groups;
  if (per_group == 0) {
    if (mask[1]) ga.zero_();
    if (mask[2]) gb.zero_();
    return {gx, ga, gb};
  }
  if (!mask[0] && !coef) return {gx, ga, gb};
  const at::Tensor xc = x.contiguous(), gc = grad_y.contiguous();
  const at::Tensor ac = numerator.contiguous(), bc = denominator.contiguous();
  const int64_t blocks_x = blocks_x_for(per_group);
  const int64_t K = s.num + s.den;
  at::Tensor partial = coef ? at::empty({s.groups, blocks_x, K}, x.options().dtype(at::kDouble))
                            : at::Tensor();
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(s.groups));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_backward_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), mask[0] ? gx.data_ptr<scalar_t>() : nullptr,
          ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), static_cast<int>(s.num),
          static_cast<int>(s.den), s.group_size, s.channels, per_group,
          coef ? partial.data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (std::max(s.num, s.den) <= kSmallK) {
      launch(rational_backward_kernel<scalar_t, kSmallK>);
    } else {
      launch(rational_backward_kernel<scalar_t, kRationalMaxCoeffs>);
    }
    if (coef) {
      rational_finish_kernel<scalar_t><<<static_cast<unsigned>(s.groups * K), kThreads, 0, stream>>>(
          partial.data_ptr<double>(), blocks_x, static_cast<int>(s.num), static_cast<int>(s.den),
          mask[1] ? ga.data_ptr<scalar_t>() : nullptr, mask[2] ? gb.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CUDA, m) {
  m.impl("rational", &rational_cuda);
  m.impl("_rational_backward", &rational_backward_cuda);
}

}  // namespace effnlp
