// CPU kernels of ngram_bag (fused hashed n-gram embedding bag) and ngram_ids; the backward is in
// ngram_bag_backward.cpp. The hash and the row layout: include/effnlp/ngram_hash.h.
//
// Forward: documents are cut into ~4 ranges per thread of equal token counts (lengths vary a
// lot), parallel over the ranges. Per document, one pass over its tokens computes every n-gram
// row (one FNV chain per position gives all orders; the rows sit in a small per-thread
// scratch, never a tensor), then the rows are summed in register blocks of 8 vectors, one pass
// over the rows per block. The table is far larger than the caches, so this is a gather bound
// by how many row misses are in flight: the first pass prefetches whole rows a dozen n-grams
// ahead into L2 (running on into the next document's rows: documents are hashed a block of
// ~16k rows ahead of the gather) and the later passes read them from L2. Accumulating in
// registers matters as much: adding each row into a row in memory (a store per vector per row)
// filled the store queue and held the out-of-order window to ~2 rows (~2x slower, measured in a
// stand-alone gather loop).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "effnlp/ngram_bag.h"
#include "effnlp/ngram_cpu.h"

namespace effnlp {
namespace {

using namespace ngram;

// How many n-grams ahead of the one being added the first pass prefetches whole table rows
// (into L2, prefetcht2). Measured on the bench's 2M x 256 fp32 table, 1 thread: 6 to 32 all
// within noise of each other; prefetcht0 was ~1.8x slower (it evicts the rows being summed).
constexpr int64_t kPrefetchAhead = 12;

// C10_ALWAYS_INLINE: GCC's IPA pure-const analysis treats a function whose only effect is a
// prefetch as side-effect free and deletes its calls before inlining it (measured: GCC 12
// emitted no prefetch at all, ~1.8x slower gathers).
template <typename T>
C10_ALWAYS_INLINE void prefetch_row(const T* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 1);  // prefetcht2: into L2
}

// acc[0..D) += row[0..D), in the accumulation type A (float for half types).


// Where the first pass over a document's rows prefetches: dist n-grams ahead, continuing into
// the next document's rows.
struct Ahead {
  const int64_t* rows;
  int64_t n;
  const int64_t* next;
  int64_t n_next;
  int64_t dist;
  int64_t ld;  // row stride of the table
  template <typename T>
  C10_ALWAYS_INLINE void prefetch(const T* W, int64_t D, int64_t i) const {
    const int64_t j = i + dist;
    const int64_t r = j < n ? rows[j] : (j - n < n_next ? next[j - n] : -1);
    if (r >= 0) prefetch_row(W + r * ld, D * static_cast<int64_t>(sizeof(T)));
  }
};

template <typename T>
inline at::vec::Vectorized<at::opmath_type<T>> load_as_acc(const T* p) {
  using A = at::opmath_type<T>;
  if constexpr (std::is_same_v<T, A>) {
    return at::vec::Vectorized<T>::loadu(p);
  } else {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// acc[d0 .. d0 + NV * VA) = sum of the rows' elements there, in NV vector registers (no
// stores in the loop: a store per vector per row would fill the store queue and stall the
// out-of-order window that keeps the row misses in flight).
template <typename T, int NV, bool PF>
inline void sum_block(const T* W, int64_t D, int64_t d0, const Ahead& ah, at::opmath_type<T>* acc) {
  using Vec = at::vec::Vectorized<at::opmath_type<T>>;
  constexpr int64_t VA = Vec::size();
  Vec a[NV];
  for (int v = 0; v < NV; ++v) a[v] = Vec(0);
  for (int64_t i = 0; i < ah.n; ++i) {
    if constexpr (PF) ah.prefetch(W, D, i);
    const T* r = W + ah.rows[i] * ah.ld + d0;
    for (int v = 0; v < NV; ++v) a[v] = a[v] + load_as_acc<T>(r + v * VA);
  }
  for (int v = 0; v < NV; ++v) a[v].store(acc + d0 + v * VA);
}

template <typename T, bool PF>
inline void sum_tail(const T* W, int64_t D, int64_t d0, const Ahead& ah, at::opmath_type<T>* acc) {
  using A = at::opmath_type<T>;
  A t[at::vec::Vectorized<A>::size()] = {};
  const int64_t m = D - d0;
  for (int64_t i = 0; i < ah.n; ++i) {
    if constexpr (PF) ah.prefetch(W, D, i);
    const T* r = W + ah.rows[i] * ah.ld + d0;
    for (int64_t k = 0; k < m; ++k) t[k] += static_cast<A>(r[k]);
  }
  for (int64_t k = 0; k < m; ++k) acc[d0 + k] = t[k];
}

// acc[0..D) = sum of the table rows ah.rows[0..n), one pass over the rows per register block;
// the first pass prefetches whole rows into L2, so the later ones read them from cache (a
// document's rows, at most ~0.5 MB at 256 fp32 and 3 orders, stay in L2).
template <typename T>
void gather_sum(const T* W, int64_t D, const Ahead& ah, at::opmath_type<T>* acc) {
  constexpr int64_t VA = at::vec::Vectorized<at::opmath_type<T>>::size();
  int64_t d0 = 0;
  bool first = true;
  auto block = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    if (first) {
      sum_block<T, NV, true>(W, D, d0, ah, acc);
    } else {
      sum_block<T, NV, false>(W, D, d0, ah, acc);
    }
    first = false;
    d0 += NV * VA;
  };
  while (D - d0 >= 8 * VA) block(std::integral_constant<int, 8>{});
  if (D - d0 >= 4 * VA) block(std::integral_constant<int, 4>{});
  if (D - d0 >= 2 * VA) block(std::integral_constant<int, 2>{});
  if (D - d0 >= VA) block(std::integral_constant<int, 1>{});
  if (D > d0) {
    if (first) {
      sum_tail<T, true>(W, D, d0, ah, acc);
    } else {
      sum_tail<T, false>(W, D, d0, ah, acc);
    }
  }
}

// Rows hashed ahead of the gather, in n-grams: a block of documents is hashed into one
// contiguous run of rows (128 KB, L2-resident), then summed document by document, so the
// prefetches run on from one document into the next.
constexpr int64_t kBlockRows = 16384;

template <typename T>
void ngram_bag_impl(const at::Tensor& tokens, const at::Tensor& offsets, const T* W, int64_t D, int64_t ld,
                    const Router& router, bool mean, T* out) {
  using A = at::opmath_type<T>;
  const int64_t N = tokens.size(0), B = offsets.size(0);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const NgramSpec& s = *router.s;
  parallel_doc_ranges(off, B, N, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<int64_t> rows, starts;
    std::vector<A>& buf = scratch_vec<A>();
    if (static_cast<int64_t>(buf.size()) < D) buf.resize(D);
    for (int64_t c0 = b0; c0 < b1;) {
      // Hash documents c0 .. c1 (at least one, then while under kBlockRows rows).
      starts.clear();
      int64_t used = 0, c1 = c0;
      while (c1 < b1 && (c1 == c0 || used < kBlockRows)) {
        const int64_t start = off[c1], len = doc_end(off, B, N, c1) - start;
        const int64_t need = used + s.ngrams_in(len);
        if (static_cast<int64_t>(rows.size()) < need) {
          rows.resize(std::max<int64_t>(need, 2 * static_cast<int64_t>(rows.size())));
        }
        starts.push_back(used);
        int64_t* r = rows.data() + used;
        used += router.for_each(tok + start, len, [&](int64_t row) { *r++ = row; });
        ++c1;
      }
      starts.push_back(used);
      for (int64_t b = c0; b < c1; ++b) {
        const int64_t i0 = starts[b - c0], i1 = starts[b - c0 + 1], n = i1 - i0;
        const Ahead ah{rows.data() + i0, n, rows.data() + i1, used - i1, kPrefetchAhead, ld};
        A* acc;
        if constexpr (std::is_same_v<T, A>) {
          acc = out + b * D;
        } else {
          acc = buf.data();
        }
        gather_sum<T>(W, D, ah, acc);
        if (mean && n > 1) {
          const A c = static_cast<A>(n);
          for (int64_t d = 0; d < D; ++d) acc[d] /= c;
        }
        if constexpr (!std::is_same_v<T, A>) {
          T* o = out + b * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
        }
      }
      c0 = c1;
    }
  });
}

at::Tensor ngram_bag_cpu(const at::Tensor& tokens_in, const at::Tensor& offsets_in, const at::Tensor& weight,
                         at::IntArrayRef orders, int64_t num_buckets, int64_t unigram_rows, int64_t mode,
                         const std::optional<at::Tensor>& vocab_keys,
                         const std::optional<at::Tensor>& vocab_rows, bool /*sparse*/) {
  const char* op = kNgramBag;
  const NgramSpec s = check_ngram_bag(op, tokens_in, offsets_in, weight, orders, num_buckets,
                                      unigram_rows, mode, vocab_keys, vocab_rows);
  const at::Tensor tokens = tokens_in.contiguous(), offsets = offsets_in.contiguous();
  check_data(op, tokens, offsets, s);
  // Rows may be strided (a view such as table[:, :D]): only the row itself must be contiguous,
  // so a large table is never copied for it.
  const at::Tensor W = weight.stride(1) == 1 || weight.size(1) <= 1 ? weight : weight.contiguous();
  const std::optional<at::Tensor> vk = s.vocab ? std::optional<at::Tensor>(vocab_keys->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> vr = s.vocab ? std::optional<at::Tensor>(vocab_rows->contiguous()) : std::nullopt;
  const int64_t B = offsets.size(0), D = W.size(1);
  at::Tensor out = at::empty({B, D}, W.options());
  if (out.numel() == 0) return out;
  const Router router(s, vk, vr, W.size(0), op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "ngram_bag_cpu", [&] {
    ngram_bag_impl<scalar_t>(tokens, offsets, W.data_ptr<scalar_t>(), D, W.stride(0), router, mode == 1,
                             out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ngram_ids_cpu(const at::Tensor& tokens_in, const at::Tensor& offsets_in,
                                                 at::IntArrayRef orders, int64_t num_buckets,
                                                 int64_t unigram_rows,
                                                 const std::optional<at::Tensor>& vocab_keys,
                                                 const std::optional<at::Tensor>& vocab_rows) {
  const char* op = kNgramIds;
  const NgramSpec s = check_ngram_args(op, tokens_in, offsets_in, orders, num_buckets, unigram_rows,
                                       vocab_keys, vocab_rows, /*allow_raw=*/true);
  const at::Tensor tokens = tokens_in.contiguous(), offsets = offsets_in.contiguous();
  check_data(op, tokens, offsets, s);
  const std::optional<at::Tensor> vk = s.vocab ? std::optional<at::Tensor>(vocab_keys->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> vr = s.vocab ? std::optional<at::Tensor>(vocab_rows->contiguous()) : std::nullopt;
  const int64_t N = tokens.size(0), B = offsets.size(0);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const Router router(s, vk, vr, INT64_MAX, op);
  // Pass 1: the number of ids of each document (a lookup per n-gram only with a vocabulary).
  at::Tensor id_offsets = at::empty({B}, offsets.options());
  int64_t* ido = id_offsets.data_ptr<int64_t>();
  parallel_docs(off, B, N, [&](int64_t b) {
    const int64_t len = doc_end(off, B, N, b) - off[b];
    ido[b] = s.vocab ? router.for_each(tok + off[b], len, [](int64_t) {}) : s.ngrams_in(len);
  });
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = ido[b];
    ido[b] = total;
    total += c;
  }
  at::Tensor ids = at::empty({total}, tokens.options());
  int64_t* out = ids.data_ptr<int64_t>();
  parallel_docs(off, B, N, [&](int64_t b) {
    int64_t* o = out + ido[b];
    router.for_each(tok + off[b], doc_end(off, B, N, b) - off[b], [&](int64_t r) { *o++ = r; });
  });
  return {ids, id_offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) {
  m.impl("ngram_bag", &ngram_bag_cpu);
  m.impl("ngram_ids", &ngram_ids_cpu);
}

}  // namespace effnlp
