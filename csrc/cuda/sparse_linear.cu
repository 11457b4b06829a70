// CUDA kernel of sparse_linear: y = x @ W.T + bias, W [out, in] in CSR with int32 indices.
//
// One warp per output element (token n, row o), warps of a block walking consecutive rows of
// the same token: the lanes stride over row o's nonzeros (coalesced index/value loads), gather
// x[n, col] from the token's row (shared by the block's warps, so it stays in L1) and reduce
// with shuffles. Accumulates in float32 for half types. This is the plain, always-correct CUDA
// path; export() keeps dense cuBLAS on GPUs, where unstructured sparsity at these densities
// does not beat tensor-core GEMMs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "effnlp/masked_linear.h"

namespace effnlp {
namespace {

constexpr int kWarps = 8;

template <typename T>
__global__ void sparse_linear_kernel(const T* __restrict__ x, const int32_t* __restrict__ crow,
                                     const int32_t* __restrict__ col, const T* __restrict__ val,
                                     const T* __restrict__ bias, T* __restrict__ y, int64_t N,
                                     int64_t in, int64_t out) {
  using Op = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  const int64_t pair = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5);
  if (pair >= N * out) return;
  const int64_t n = pair / out, o = pair % out;
  const T* xr = x + n * in;
  Op acc = 0;
  for (int32_t p = crow[o] + lane; p < crow[o + 1]; p += 32) {
    acc += static_cast<Op>(val[p]) * static_cast<Op>(xr[col[p]]);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    if (bias != nullptr) acc += static_cast<Op>(bias[o]);
    y[n * out + o] = static_cast<T>(acc);
  }
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, int64_t in_features,
                              const std::optional<at::Tensor>& bias) {
  check_sparse_linear(x, crow, col, values, in_features, bias);
  c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t out = crow.numel() - 1;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (y.numel() == 0) return y;
  const int64_t N = y.numel() / out;
  const at::Tensor xc = x.contiguous(), crc = crow.contiguous(), cc = col.contiguous(),
                   vc = values.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t blocks = (N * out + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks < (int64_t{1} << 31), kSparseLinear, ": too many outputs for one launch (",
              N * out, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear_cuda", [&] {
    sparse_linear_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWarps * 32, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), crc.data_ptr<int32_t>(), cc.data_ptr<int32_t>(),
        vc.data_ptr<scalar_t>(), has_bias ? bc.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), N, in_features, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CUDA, m) { m.impl("sparse_linear", &sparse_linear_cuda); }

}  // namespace effnlp
