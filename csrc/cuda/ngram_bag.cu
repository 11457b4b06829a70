// CUDA kernels of ngram_bag, ngram_ids and the coalesced sparse backward (hash and row layout:
// include/effnlp/ngram_hash.h; the CPU kernels in cpu/ngram_bag.cpp).
//
// Forward: a warp per document. The document's n-grams, in the CPU kernel's order (by position,
// then increasing order), are taken 32 at a time: each lane hashes one and finds its row, a
// ballot says which are kept, and the warp then walks the kept rows in lane order, every row
// broadcast with a shuffle while the lanes stride over D (coalesced loads), accumulating in
// registers (float for half types). D beyond 32 * 8 is done in further chunks, re-hashing.
//
// ngram_ids: a warp per document counts (a vocabulary may drop n-grams), an exclusive cumsum
// places the documents, and a second pass writes each chunk of 32 with a ballot prefix.
//
// Backward: every valid n-gram writes the key row << doc_bits | doc at its document's slot
// (INT64_MAX when a vocabulary drops it), at::sort (cub radix sort) orders them, and
// unique_consecutive cuts the runs of one row; a warp per distinct row then sums grad[doc]
// (/ count for the mean) over its run in key order, so every value is summed in one fixed order:
// deterministic, with rows unique and ascending as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "effnlp/ngram_bag.h"

namespace effnlp {
namespace {

using namespace ngram;

constexpr int kWarps = 4;  // warps (documents or rows) per block
constexpr unsigned kFull = 0xffffffffu;

// The validated layout, by value in kernel parameter space.
struct DevSpec {
  int64_t orders[kMaxOrder];
  int nj = 0;
  int64_t U = 0;
  Modulo mod;
  bool direct = false, raw = false, vocab = false;
  const int64_t* vkeys = nullptr;
  const int64_t* vrows = nullptr;
  uint64_t vmask = 0;
};

DevSpec make_spec(const NgramSpec& s, const std::optional<at::Tensor>& vk, const std::optional<at::Tensor>& vr) {
  DevSpec d;
  d.nj = static_cast<int>(s.orders.size());
  for (int j = 0; j < d.nj; ++j) d.orders[j] = s.orders[j];
  d.U = s.U;
  d.mod = Modulo(static_cast<uint64_t>(s.K));
  d.direct = s.direct_unigrams;
  d.raw = s.raw;
  d.vocab = s.vocab;
  if (s.vocab) {
    d.vkeys = vk->data_ptr<int64_t>();
    d.vrows = vr->data_ptr<int64_t>();
    d.vmask = static_cast<uint64_t>(s.table_size - 1);
  }
  return d;
}

// The row (or raw hash) of the n-gram tok[0..n); false when a vocabulary drops it.
__device__ inline bool ngram_row(const DevSpec& s, const int64_t* tok, int64_t n, int64_t* row) {
  if (n == 1 && s.direct) {
    *row = tok[0];
    return true;
  }
  const uint64_t h = ngram::hash(tok, n);
  if (s.raw) {
    *row = static_cast<int64_t>(h);
    return true;
  }
  if (s.vocab) {
    *row = vocab_find(s.vkeys, s.vrows, s.vmask, h);
    return *row >= 0;
  }
  *row = s.U + static_cast<int64_t>(s.mod.of_top63(h));
  return true;
}

struct Doc {
  const int64_t* tok;
  int64_t len, total;  // tokens, candidate n-grams (len * |orders|, position-major)
};

__device__ inline Doc doc_of(const int64_t* tok, const int64_t* off, int64_t N, int64_t B, int64_t b, int nj) {
  const int64_t start = off[b];
  const int64_t len = (b + 1 < B ? off[b + 1] : N) - start;
  return {tok + start, len, len * nj};
}

// Candidate i of a document (position i / nj, order orders[i % nj]): whether it exists
// (stays in the document) and whether it is kept, with its row.
__device__ inline bool candidate(const DevSpec& s, const Doc& d, int64_t i, bool* valid, int64_t* row) {
  *valid = false;
  if (i >= d.total) return false;
  const int64_t p = i / s.nj, n = s.orders[i % s.nj];
  if (p + n > d.len) return false;
  *valid = true;
  return ngram_row(s, d.tok + p, n, row);
}

template <typename T, int VPL>
__global__ void __launch_bounds__(32 * kWarps)
    ngram_bag_kernel(const int64_t* __restrict__ tok, const int64_t* __restrict__ off, int64_t N, int64_t B,
                     const T* __restrict__ W, int64_t D, int64_t ld, const DevSpec s, bool mean,
                     T* __restrict__ out) {
  using A = at::opmath_type<T>;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (b >= B) return;  // the whole warp
  const int lane = threadIdx.x;
  const Doc d = doc_of(tok, off, N, B, b, s.nj);
  for (int64_t d0 = 0; d0 < D; d0 += 32 * VPL) {
    A acc[VPL];
#pragma unroll
    for (int v = 0; v < VPL; ++v) acc[v] = A(0);
    int64_t kept = 0;
    for (int64_t base = 0; base < d.total; base += 32) {
      bool valid;
      int64_t row = 0;
      const bool keep = candidate(s, d, base + lane, &valid, &row);
      unsigned mask = __ballot_sync(kFull, keep);
      kept += __popc(mask);
      while (mask) {
        const int src = __ffs(mask) - 1;
        mask &= mask - 1;
        const int64_t r = __shfl_sync(kFull, row, src);
        const T* wr = W + r * ld + d0 + lane;
#pragma unroll
        for (int v = 0; v < VPL; ++v) {
          if (d0 + v * 32 + lane < D) acc[v] += static_cast<A>(wr[v * 32]);
        }
      }
    }
    T* o = out + b * D + d0 + lane;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      if (d0 + v * 32 + lane < D) {
        o[v * 32] = static_cast<T>(mean && kept > 0 ? acc[v] / static_cast<A>(kept) : acc[v]);
      }
    }
  }
}

// counts[b] = kept n-grams of document b.
__global__ void __launch_bounds__(32 * kWarps)
    count_kernel(const int64_t* __restrict__ tok, const int64_t* __restrict__ off, int64_t N, int64_t B,
                 const DevSpec s, int64_t* __restrict__ counts) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (b >= B) return;
  const Doc d = doc_of(tok, off, N, B, b, s.nj);
  int64_t kept = 0;
  if (!s.vocab) {  // nothing is dropped: sum over orders of max(0, len - n + 1)
    for (int j = 0; j < s.nj; ++j) kept += d.len >= s.orders[j] ? d.len - s.orders[j] + 1 : 0;
  } else {
    for (int64_t base = 0; base < d.total; base += 32) {
      bool valid;
      int64_t row;
      kept += __popc(__ballot_sync(kFull, candidate(s, d, base + threadIdx.x, &valid, &row)));
    }
  }
  if (threadIdx.x == 0) counts[b] = kept;
}

__device__ inline unsigned lanes_below() { return (1u << threadIdx.x) - 1u; }

// ids[id_offsets[b] ...] = the kept rows of document b, in order.
__global__ void __launch_bounds__(32 * kWarps)
    ids_kernel(const int64_t* __restrict__ tok, const int64_t* __restrict__ off, int64_t N, int64_t B,
               const DevSpec s, const int64_t* __restrict__ id_offsets, int64_t* __restrict__ ids) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (b >= B) return;
  const Doc d = doc_of(tok, off, N, B, b, s.nj);
  int64_t at = id_offsets[b];
  for (int64_t base = 0; base < d.total; base += 32) {
    bool valid;
    int64_t row = 0;
    const bool keep = candidate(s, d, base + threadIdx.x, &valid, &row);
    const unsigned mask = __ballot_sync(kFull, keep);
    if (keep) ids[at + __popc(mask & lanes_below())] = row;
    at += __popc(mask);
  }
}

// Upper bound of n-grams per document (one thread each).
__global__ void bound_kernel(const int64_t* __restrict__ off, int64_t N, int64_t B, const DevSpec s,
                             int64_t* __restrict__ bound) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t len = (b + 1 < B ? off[b + 1] : N) - off[b];
  int64_t n = 0;
  for (int j = 0; j < s.nj; ++j) n += len >= s.orders[j] ? len - s.orders[j] + 1 : 0;
  bound[b] = n;
}

// keys[base[b] ...] = row << doc_bits | b for every n-gram of document b (INT64_MAX when a
// vocabulary drops it); kept[b] = the number kept.
__global__ void __launch_bounds__(32 * kWarps)
    pairs_kernel(const int64_t* __restrict__ tok, const int64_t* __restrict__ off, int64_t N, int64_t B,
                 const DevSpec s, const int64_t* __restrict__ base_of, int doc_bits, int64_t* __restrict__ keys,
                 int64_t* __restrict__ kept_of) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (b >= B) return;
  const Doc d = doc_of(tok, off, N, B, b, s.nj);
  int64_t at = base_of[b], kept = 0;
  for (int64_t base = 0; base < d.total; base += 32) {
    bool valid;
    int64_t row = 0;
    const bool keep = candidate(s, d, base + threadIdx.x, &valid, &row);
    const unsigned vmask = __ballot_sync(kFull, valid);
    kept += __popc(__ballot_sync(kFull, keep));
    if (valid) {
      keys[at + __popc(vmask & lanes_below())] = keep ? (row << doc_bits) | b : INT64_MAX;
    }
    at += __popc(vmask);
  }
  if (threadIdx.x == 0) kept_of[b] = kept;
}

// values[j] = sum of g[doc] over the keys sorted[starts[j] .. + counts[j]) in order (a warp per
// distinct row, lanes over D).
template <typename T>
__global__ void __launch_bounds__(32 * kWarps)
    segment_kernel(const int64_t* __restrict__ sorted, const int64_t* __restrict__ starts,
                   const int64_t* __restrict__ counts, int64_t nnz, int64_t doc_mask,
                   const at::opmath_type<T>* __restrict__ g, int64_t D, T* __restrict__ values) {
  using A = at::opmath_type<T>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (j >= nnz) return;
  const int64_t i0 = starts[j], i1 = i0 + counts[j];
  for (int64_t dd = threadIdx.x; dd < D; dd += 32) {
    A acc = A(0);
    for (int64_t i = i0; i < i1; ++i) acc += g[(sorted[i] & doc_mask) * D + dd];
    values[j * D + dd] = static_cast<T>(acc);
  }
}

unsigned warp_blocks(int64_t n) { return static_cast<unsigned>((n + kWarps - 1) / kWarps); }

int bit_width(uint64_t x) {
  int n = 0;
  while (x) {
    ++n;
    x >>= 1;
  }
  return n;
}

// The data-dependent checks of the CPU kernels, in one device-to-host copy: tokens >= 0 (and
// < U when order 1 maps to row = token), offsets from 0, non-decreasing, within tokens;
// vocabulary rows of occupied slots within [0, num_rows).
void check_data(const char* op, const at::Tensor& tokens, const at::Tensor& offsets, const NgramSpec& s,
                const std::optional<at::Tensor>& vk, const std::optional<at::Tensor>& vr, int64_t num_rows) {
  const int64_t N = tokens.size(0), B = offsets.size(0);
  auto opt = tokens.options();
  auto scalar = [&](int64_t v) { return at::full({}, v, opt); };
  std::vector<at::Tensor> parts;
  if (N > 0) {
    auto [mn, mx] = at::aminmax(tokens);
    parts.push_back(mn);
    parts.push_back(mx);
  } else {
    parts.push_back(scalar(0));
    parts.push_back(scalar(-1));
  }
  parts.push_back(B > 0 ? offsets[0] : scalar(0));
  parts.push_back(B > 1 ? at::diff(offsets).min() : scalar(0));
  parts.push_back(B > 0 ? offsets[B - 1] : scalar(0));
  if (s.vocab) {
    const at::Tensor used = vk->ne(kEmptyKey);
    parts.push_back(at::where(used, *vr, scalar(INT64_MAX)).min());
    parts.push_back(at::where(used, *vr, scalar(INT64_MIN)).max());
  }
  const at::Tensor host = at::stack(parts).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  TORCH_CHECK(h[2] == 0, op, ": offsets[0] must be 0, got ", h[2]);
  TORCH_CHECK(h[3] >= 0, op, ": offsets must be non-decreasing");
  TORCH_CHECK(h[4] <= N, op, ": offsets[", B - 1, "] = ", h[4], " is past the end of tokens (", N, " tokens)");
  TORCH_CHECK(h[0] >= 0, op, ": token ids must be >= 0, got ", h[0]);
  if (s.direct_unigrams) {
    TORCH_CHECK(h[1] < s.U, op, ": token id ", h[1], " >= unigram_rows = ", s.U,
                " (order 1 maps a token to its own row)");
  }
  if (s.vocab) {
    TORCH_CHECK(h[5] >= 0 && h[6] < num_rows, op, ": vocab_rows holds rows in [", h[5], ", ", h[6],
                "] for present keys, outside the table's ", num_rows, " rows");
  }
}

std::optional<at::Tensor> contiguous_or_none(bool use, const std::optional<at::Tensor>& t) {
  return use ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

at::Tensor ngram_bag_cuda(const at::Tensor& tokens_in, const at::Tensor& offsets_in, const at::Tensor& weight,
                          at::IntArrayRef orders, int64_t num_buckets, int64_t unigram_rows, int64_t mode,
                          const std::optional<at::Tensor>& vocab_keys,
                          const std::optional<at::Tensor>& vocab_rows, bool /*sparse*/) {
  const char* op = kNgramBag;
  const NgramSpec s = check_ngram_bag(op, tokens_in, offsets_in, weight, orders, num_buckets,
                                      unigram_rows, mode, vocab_keys, vocab_rows);
  c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), offsets = offsets_in.contiguous();
  const auto vk = contiguous_or_none(s.vocab, vocab_keys), vr = contiguous_or_none(s.vocab, vocab_rows);
  check_data(op, tokens, offsets, s, vk, vr, weight.size(0));
  // Rows may be strided (a view such as table[:, :D]); only a row itself must be contiguous.
  const at::Tensor W = weight.stride(1) == 1 || weight.size(1) <= 1 ? weight : weight.contiguous();
  const int64_t N = tokens.size(0), B = offsets.size(0), D = W.size(1);
  at::Tensor out = at::empty({B, D}, W.options());
  if (out.numel() == 0) return out;
  const DevSpec spec = make_spec(s, vk, vr);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(32, kWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "ngram_bag_cuda", [&] {
    auto launch = [&](auto vpl) {
      constexpr int VPL = decltype(vpl)::value;
      ngram_bag_kernel<scalar_t, VPL><<<warp_blocks(B), block, 0, stream>>>(
          tokens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), N, B, W.data_ptr<scalar_t>(), D, W.stride(0), spec,
          mode == 1, out.data_ptr<scalar_t>());
    };
    if (D <= 32) {
      launch(std::integral_constant<int, 1>{});
    } else if (D <= 64) {
      launch(std::integral_constant<int, 2>{});
    } else if (D <= 128) {
      launch(std::integral_constant<int, 4>{});
    } else {
      launch(std::integral_constant<int, 8>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ngram_ids_cuda(const at::Tensor& tokens_in, const at::Tensor& offsets_in,
                                                  at::IntArrayRef orders, int64_t num_buckets,
                                                  int64_t unigram_rows,
                                                  const std::optional<at::Tensor>& vocab_keys,
                                                  const std::optional<at::Tensor>& vocab_rows) {
  const char* op = kNgramIds;
  const NgramSpec s = check_ngram_args(op, tokens_in, offsets_in, orders, num_buckets, unigram_rows,
                                       vocab_keys, vocab_rows, /*allow_raw=*/true);
  c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), offsets = offsets_in.contiguous();
  const auto vk = contiguous_or_none(s.vocab, vocab_keys), vr = contiguous_or_none(s.vocab, vocab_rows);
  check_data(op, tokens, offsets, s, vk, vr, INT64_MAX);
  const int64_t N = tokens.size(0), B = offsets.size(0);
  if (B == 0) return {at::empty({0}, tokens.options()), at::empty({0}, offsets.options())};
  const DevSpec spec = make_spec(s, vk, vr);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(32, kWarps);
  at::Tensor counts = at::empty({B}, offsets.options());
  count_kernel<<<warp_blocks(B), block, 0, stream>>>(tokens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), N,
                                                      B, spec, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ends = at::cumsum(counts, 0);
  const at::Tensor id_offsets = ends - counts;
  const int64_t total = ends[B - 1].item<int64_t>();
  at::Tensor ids = at::empty({total}, tokens.options());
  if (total > 0) {
    ids_kernel<<<warp_blocks(B), block, 0, stream>>>(tokens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), N,
                                                      B, spec, id_offsets.data_ptr<int64_t>(),
                                                      ids.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {ids, id_offsets};
}

std::tuple<at::Tensor, at::Tensor> ngram_bag_backward_cuda(
    const at::Tensor& grad, const at::Tensor& tokens_in, const at::Tensor& offsets_in, at::IntArrayRef orders,
    int64_t num_buckets, int64_t unigram_rows, int64_t mode, int64_t num_weights,
    const std::optional<at::Tensor>& vocab_keys, const std::optional<at::Tensor>& vocab_rows) {
  const char* op = kNgramBagBackward;
  const NgramSpec s = check_ngram_bag_backward(op, grad, tokens_in, offsets_in, orders, num_buckets,
                                               unigram_rows, mode, num_weights, vocab_keys,
                                               vocab_rows);
  const int64_t B = offsets_in.size(0);
  c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), offsets = offsets_in.contiguous();
  const auto vk = contiguous_or_none(s.vocab, vocab_keys), vr = contiguous_or_none(s.vocab, vocab_rows);
  check_data(op, tokens, offsets, s, vk, vr, num_weights);
  const int64_t N = tokens.size(0), D = grad.size(1);
  const int doc_bits = B > 1 ? bit_width(static_cast<uint64_t>(B - 1)) : 0;
  const int row_bits = num_weights > 1 ? bit_width(static_cast<uint64_t>(num_weights - 1)) : 0;
  TORCH_CHECK(row_bits + doc_bits <= 62, op, ": num_weights * documents is too large for 64-bit "
              "(row, document) keys (", num_weights, " rows, ", B, " documents)");
  auto empty_result = [&] {
    return std::make_tuple(at::empty({0}, tokens.options()), at::empty({0, D}, grad.options()));
  };
  if (B == 0) return empty_result();
  const DevSpec spec = make_spec(s, vk, vr);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(32, kWarps);
  at::Tensor bound = at::empty({B}, offsets.options());
  bound_kernel<<<static_cast<unsigned>((B + 255) / 256), 256, 0, stream>>>(offsets.data_ptr<int64_t>(), N, B, spec,
                                                                          bound.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ends = at::cumsum(bound, 0);
  const at::Tensor base = ends - bound;
  const int64_t total = ends[B - 1].item<int64_t>();
  if (total == 0) return empty_result();
  at::Tensor keys = at::empty({total}, tokens.options());
  at::Tensor kept = at::empty({B}, offsets.options());
  pairs_kernel<<<warp_blocks(B), block, 0, stream>>>(tokens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), N, B,
                                                      spec, base.data_ptr<int64_t>(), doc_bits,
                                                      keys.data_ptr<int64_t>(), kept.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t nkept = s.vocab ? kept.sum().item<int64_t>() : total;
  if (nkept == 0) return empty_result();
  // Dropped n-grams (INT64_MAX) sort last and are cut off.
  const at::Tensor sorted = std::get<0>(at::sort(keys, /*dim=*/0, /*descending=*/false)).narrow(0, 0, nkept);
  const auto [rows, inverse, counts] =
      at::unique_consecutive(at::bitwise_right_shift(sorted, doc_bits), /*return_inverse=*/false,
                             /*return_counts=*/true);
  (void)inverse;
  const int64_t nnz = rows.size(0);
  const at::Tensor starts = at::cumsum(counts, 0) - counts;
  at::Tensor values = at::empty({nnz, D}, grad.options());
  if (values.numel() == 0) return {rows, values};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ngram_bag_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    at::Tensor g = grad.to(c10::CppTypeToScalarType<A>::value).contiguous();
    if (mode == 1) g = (g / kept.clamp_min(1).unsqueeze(1).to(g.scalar_type())).contiguous();
    segment_kernel<scalar_t><<<warp_blocks(nnz), block, 0, stream>>>(
        sorted.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), nnz,
        (int64_t{1} << doc_bits) - 1, g.data_ptr<A>(), D, values.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CUDA, m) {
  m.impl("ngram_bag", &ngram_bag_cuda);
  m.impl("ngram_ids", &ngram_ids_cuda);
  m.impl("_ngram_bag_backward", &ngram_bag_backward_cuda);
}

}  // namespace effnlp
