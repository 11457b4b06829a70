// CPU kernels of ngram_bag (fused hashed n-gram embedding bag), ngram_ids and the coalesced
// sparse backward. The hash and the row layout: include/effnlp/ngram_hash.h.
//
// Forward: documents are cut into ~4 ranges per thread of equal token counts (lengths vary a
// lot), parallel over the ranges. Per document, one pass over its tokens computes every n-gram
// row (one FNV chain per position gives all orders; the rows sit in a small per-thread
// scratch, never a tensor), then the rows are summed in register blocks of 8 vectors, one pass
// over the rows per block. The table is far larger than the caches, so this is a gather bound
// by how many row misses are in flight: the first pass prefetches whole rows a dozen n-grams
// ahead into L2 (running on into the next document's rows: documents are hashed a block of
// ~16k rows ahead of the gather) and the later passes read them from L2. Accumulating in registers matters as much: adding
// each row into a row in memory (a store per vector per row) filled the store queue and held
// the out-of-order window to ~2 rows (~2x slower, measured in a stand-alone gather loop).
//
// Backward: the gradient of the table is the sum over (n-gram, document) pairs of grad[doc]
// (/ count[doc] for the mean) into row(n-gram). Pairs are packed into uint64 keys
// (row << doc_bits | doc), written in document order, and sorted on the row bits alone by a
// stable parallel LSD radix sort, so each row's pairs stay in document order whatever the
// thread count; the sorted keys are cut into runs of one row and each run is summed in that
// order by one thread, in registers. So the rows come out unique and ascending, and every value
// is bitwise the same whatever the thread count. The values tensor comes from a small pool of
// reused blocks (OutputPool below).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <utility>
#include <tuple>
#include <vector>

#include "effnlp/ngram_bag.h"

namespace effnlp {
namespace {

using namespace ngram;

// How many n-grams ahead of the one being added the first pass prefetches whole table rows
// (into L2, prefetcht2). Measured on the bench's 2M x 256 fp32 table, 1 thread: 6 to 32 all
// within noise of each other; prefetcht0 was ~1.8x slower (it evicts the rows being summed).
constexpr int64_t kPrefetchAhead = 12;
constexpr int64_t kDropped = -1;

// Number of bits needed to write x (0 for 0).
inline int bit_width(uint64_t x) { return x == 0 ? 0 : 64 - __builtin_clzll(x); }

// Turns the chain value of an n-gram into its table row (or raw hash / kDropped).
struct Router {
  const NgramSpec* s;
  Modulo mod;
  const int64_t* vkeys = nullptr;
  const int64_t* vrows = nullptr;
  uint64_t vmask = 0;
  int64_t num_rows = 0;  // vocabulary rows must lie in [0, num_rows) (ngram_bag and backward)
  const char* op = "";

  Router(const NgramSpec& spec, const std::optional<at::Tensor>& keys,
         const std::optional<at::Tensor>& rows, int64_t nrows, const char* op_name)
      : s(&spec), mod(static_cast<uint64_t>(spec.K)), num_rows(nrows), op(op_name) {
    if (spec.vocab) {
      vkeys = keys->data_ptr<int64_t>();
      vrows = rows->data_ptr<int64_t>();
      vmask = static_cast<uint64_t>(spec.table_size - 1);
    }
  }

  enum class Mode { kBuckets, kRaw, kVocab };
  Mode mode() const { return s->raw ? Mode::kRaw : (s->vocab ? Mode::kVocab : Mode::kBuckets); }

  template <Mode M>
  C10_ALWAYS_INLINE int64_t row(uint64_t chain, int64_t order, int64_t first_token) const {
    if (M == Mode::kBuckets && order == 1 && s->direct_unigrams) return first_token;
    const uint64_t h = finish(chain, order);
    if constexpr (M == Mode::kRaw) {
      return static_cast<int64_t>(h);
    } else if constexpr (M == Mode::kVocab) {
      const int64_t r = vocab_find(vkeys, vrows, vmask, h);
      TORCH_CHECK(r == kDropped || (r >= 0 && r < num_rows), op, ": vocab_rows holds row ", r,
                  " for a present key, outside the table's ", num_rows, " rows");
      return r;
    } else {
      return s->U + static_cast<int64_t>(mod.of_top63(h));
    }
  }

  template <Mode M, typename F>
  C10_ALWAYS_INLINE int64_t for_each_as(const int64_t* tok, int64_t len, F& emit) const {
    const int64_t* orders = s->orders.data();
    const int64_t nj = s->num_orders(), top = s->max_order;
    int64_t kept = 0;
    for (int64_t p = 0; p < len; ++p) {
      const int64_t avail = std::min(len - p, top);
      uint64_t h = kBasis;
      int64_t j = 0;
      for (int64_t k = 0; k < avail && j < nj; ++k) {
        h = step(h, tok[p + k]);
        if (k + 1 == orders[j]) {
          const int64_t r = row<M>(h, k + 1, tok[p]);
          ++j;
          if (M == Mode::kVocab && r == kDropped) continue;
          emit(r);
          ++kept;
        }
      }
    }
    return kept;
  }

  // Calls emit(row) for every kept n-gram of tok[0..len), by position, then by increasing order;
  // in raw mode every value is a hash (nothing is dropped). Returns the number emitted.
  template <typename F>
  inline int64_t for_each(const int64_t* tok, int64_t len, F&& emit) const {
    switch (mode()) {
      case Mode::kRaw:
        return for_each_as<Mode::kRaw>(tok, len, emit);
      case Mode::kVocab:
        return for_each_as<Mode::kVocab>(tok, len, emit);
      default:
        return for_each_as<Mode::kBuckets>(tok, len, emit);
    }
  }
};

// Checks what depends on the data: offsets start at 0, never decrease and stay within tokens;
// tokens are >= 0 and, when order 1 maps to row = token, < U.
void check_data(const char* op, const at::Tensor& tokens, const at::Tensor& offsets, const NgramSpec& s) {
  const int64_t N = tokens.size(0), B = offsets.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  if (B > 0) {
    TORCH_CHECK(off[0] == 0, op, ": offsets[0] must be 0, got ", off[0]);
    for (int64_t b = 1; b < B; ++b) {
      TORCH_CHECK(off[b] >= off[b - 1], op, ": offsets must be non-decreasing, got offsets[", b - 1,
                  "] = ", off[b - 1], " > offsets[", b, "] = ", off[b]);
    }
    TORCH_CHECK(off[B - 1] <= N, op, ": offsets[", B - 1, "] = ", off[B - 1],
                " is past the end of tokens (", N, " tokens)");
  }
  if (N == 0) return;
  const auto [mn, mx] = at::aminmax(tokens);
  const int64_t lo = mn.item<int64_t>(), hi = mx.item<int64_t>();
  TORCH_CHECK(lo >= 0, op, ": token ids must be >= 0, got ", lo);
  if (s.direct_unigrams) {
    TORCH_CHECK(hi < s.U, op, ": token id ", hi, " >= unigram_rows = ", s.U,
                " (order 1 maps a token to its own row)");
  }
}

// Document bounds of `parts` consecutive ranges with about equal numbers of tokens.
std::vector<int64_t> balanced_bounds(const int64_t* off, int64_t B, int64_t N, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, B);
  bounds[0] = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = N * k / parts;
    bounds[k] = std::max(bounds[k - 1], static_cast<int64_t>(std::lower_bound(off, off + B, target) - off));
  }
  return bounds;
}

inline int64_t doc_end(const int64_t* off, int64_t B, int64_t N, int64_t b) {
  return b + 1 < B ? off[b + 1] : N;
}

// Runs body(b) for every document, in parallel over ranges of balanced token counts.
template <typename F>
void parallel_docs(const int64_t* off, int64_t B, int64_t N, F&& body) {
  if (B == 0) return;
  const int64_t parts = std::min<int64_t>(B, 4 * at::get_num_threads());
  const std::vector<int64_t> bounds = balanced_bounds(off, B, N, parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t b = bounds[p0]; b < bounds[p1]; ++b) body(b);
  });
}

// Runs body(b0, b1) over consecutive ranges of documents, in parallel over ranges of balanced
// token counts.
template <typename F>
void parallel_doc_ranges(const int64_t* off, int64_t B, int64_t N, F&& body) {
  if (B == 0) return;
  const int64_t parts = std::min<int64_t>(B, 4 * at::get_num_threads());
  const std::vector<int64_t> bounds = balanced_bounds(off, B, N, parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    if (bounds[p0] < bounds[p1]) body(bounds[p0], bounds[p1]);
  });
}

// C10_ALWAYS_INLINE: GCC's IPA pure-const analysis treats a function whose only effect is a
// prefetch as side-effect free and deletes its calls before inlining it (measured: GCC 12
// emitted no prefetch at all, ~1.8x slower gathers).
template <typename T>
C10_ALWAYS_INLINE void prefetch_row(const T* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 1);  // prefetcht2: into L2
}

// acc[0..D) += row[0..D), in the accumulation type A (float for half types).
template <typename T, typename A>
inline void add_row(A* __restrict__ acc, const T* __restrict__ row, int64_t D) {
  int64_t d = 0;
  if constexpr (std::is_same_v<T, A>) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t V = Vec::size();
    for (; d + 4 * V <= D; d += 4 * V) {
      (Vec::loadu(acc + d) + Vec::loadu(row + d)).store(acc + d);
      (Vec::loadu(acc + d + V) + Vec::loadu(row + d + V)).store(acc + d + V);
      (Vec::loadu(acc + d + 2 * V) + Vec::loadu(row + d + 2 * V)).store(acc + d + 2 * V);
      (Vec::loadu(acc + d + 3 * V) + Vec::loadu(row + d + 3 * V)).store(acc + d + 3 * V);
    }
    for (; d + V <= D; d += V) (Vec::loadu(acc + d) + Vec::loadu(row + d)).store(acc + d);
  } else {
    using VecT = at::vec::Vectorized<T>;
    using VecA = at::vec::Vectorized<A>;
    constexpr int64_t V = VecT::size(), VA = VecA::size();
    for (; d + V <= D; d += V) {
      auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(row + d));
      (VecA::loadu(acc + d) + a).store(acc + d);
      (VecA::loadu(acc + d + VA) + b).store(acc + d + VA);
    }
  }
  for (; d < D; ++d) acc[d] += static_cast<A>(row[d]);
}

// acc[0..D) = row[0..D) (first term of a sum).
template <typename T, typename A>
inline void set_row(A* __restrict__ acc, const T* __restrict__ row, int64_t D) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(acc, row, D * sizeof(T));
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<A>(row[d]);
  }
}

template <typename T>
std::vector<T>& scratch_vec() {
  thread_local std::vector<T> v;
  return v;
}

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
  const NgramSpec s = check_ngram_args(op, tokens_in, offsets_in, orders, num_buckets, unigram_rows,
                                       vocab_keys, vocab_rows, /*allow_raw=*/false);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (sum) or 1 (mean), got ", mode);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [rows, D], got ", weight.dim(), "-D ",
              weight.sizes());
  check_floating(op, weight, "weight");
  TORCH_CHECK(weight.device() == tokens_in.device(), op, ": weight is on ", weight.device(),
              " but tokens is on ", tokens_in.device(), "; all inputs must be on one device");
  if (!s.vocab) {
    TORCH_CHECK(weight.size(0) == s.U + s.K, op, ": weight has ", weight.size(0),
                " rows but unigram_rows + num_buckets = ", s.U, " + ", s.K, " = ", s.U + s.K);
  }
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

// Stable LSD radix sort of keys[0..n) by their bits [lo, lo + bits), up to 11 bits a pass, in
// parallel over a fixed number of chunks; tmp has room for n keys. Returns the buffer holding
// the result. Stable, so keys with equal sort bits keep their input order, whatever the
// chunking.
uint64_t* radix_sort(uint64_t* keys, uint64_t* tmp, int64_t n, int lo, int bits) {
  if (n <= 1 || bits <= 0) return keys;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << digit;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096));
  std::vector<int64_t> hist(chunks * buckets);
  auto chunk_range = [&](int64_t c) { return std::make_pair(n * c / chunks, n * (c + 1) / chunks); };
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = lo + pass * digit;
    const uint64_t mask = static_cast<uint64_t>(buckets - 1);
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * buckets;
        const auto [i0, i1] = chunk_range(c);
        for (int64_t i = i0; i < i1; ++i) ++h[(keys[i] >> shift) & mask];
      }
    });
    int64_t run = 0;  // exclusive prefix in (digit, chunk) order: stable
    for (int64_t d = 0; d < buckets; ++d) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t v = hist[c * buckets + d];
        hist[c * buckets + d] = run;
        run += v;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * buckets;
        const auto [i0, i1] = chunk_range(c);
        for (int64_t i = i0; i < i1; ++i) tmp[h[(keys[i] >> shift) & mask]++] = keys[i];
      }
    });
    std::swap(keys, tmp);
  }
  return keys;
}

// The gradient's values (hundreds of MB for a large batch) come from a small pool of blocks
// handed back when the gradient tensor is freed (optimizer.zero_grad() sets it to None before
// the next backward): writing into freshly mapped memory pays a page fault per page, ~4x slower
// than writing memory already mapped on these VMs (measured here: 790 MB of values took
// 450-2300 ms fresh). At most kKeep free blocks stay mapped; a block is reused for a request
// that needs at least half of it.
class OutputPool {
 public:
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
    int64_t numel = 1;
    for (int64_t d : sizes) numel *= d;
    const size_t bytes = static_cast<size_t>(numel) * opt.dtype().itemsize();
    if (bytes < kMinBytes) return at::empty(sizes, opt);
    void* ptr = nullptr;
    size_t cap = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      int64_t best = -1;
      for (int64_t i = 0; i < static_cast<int64_t>(free_.size()); ++i) {
        const size_t c = free_[i].second;
        if (c >= bytes && c / 2 <= bytes && (best < 0 || c < free_[best].second)) best = i;
      }
      if (best >= 0) {
        std::tie(ptr, cap) = free_[best];
        free_.erase(free_.begin() + best);
      }
    }
    if (ptr == nullptr) {
      cap = bytes + bytes / 8;  // headroom: the next batch's gradient is rarely the same size
      ptr = c10::alloc_cpu(cap);
    }
    return at::from_blob(ptr, sizes, [cap](void* p) { OutputPool::get().give_back(p, cap); }, opt);
  }

 private:
  static constexpr size_t kMinBytes = size_t{16} << 20;
  static constexpr size_t kKeep = 2;

  void give_back(void* p, size_t cap) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(p, cap);
    if (free_.size() > kKeep) {
      c10::free_cpu(free_.front().first);
      free_.erase(free_.begin());
    }
  }

  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
};

// values[j] = sum of g[doc] over the keys sorted[starts[j] .. starts[j+1]), in that order,
// in register blocks of up to 8 vectors (g is [B, D] in the accumulation type, cache-resident).
template <typename T, int NV>
inline void segment_block(const at::opmath_type<T>* g, int64_t D, int64_t d0, const uint64_t* sorted,
                          int64_t i0, int64_t i1, uint64_t doc_mask, T* out) {
  using A = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t VA = Vec::size();
  Vec a[NV];
  for (int v = 0; v < NV; ++v) a[v] = Vec(0);
  for (int64_t i = i0; i < i1; ++i) {
    const A* r = g + static_cast<int64_t>(sorted[i] & doc_mask) * D + d0;
    for (int v = 0; v < NV; ++v) a[v] = a[v] + Vec::loadu(r + v * VA);
  }
  if constexpr (std::is_same_v<T, A>) {
    for (int v = 0; v < NV; ++v) a[v].store(out + d0 + v * VA);
  } else {
    A tmp[NV * VA];
    for (int v = 0; v < NV; ++v) a[v].store(tmp + v * VA);
    for (int64_t k = 0; k < NV * VA; ++k) out[d0 + k] = static_cast<T>(tmp[k]);
  }
}

template <typename T>
void segment_sums(const at::opmath_type<T>* g, int64_t D, const uint64_t* sorted, const int64_t* starts,
                  int64_t nnz, uint64_t doc_mask, T* values) {
  using A = at::opmath_type<T>;
  constexpr int64_t VA = at::vec::Vectorized<A>::size();
  at::parallel_for(0, nnz, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i0 = starts[j], i1 = starts[j + 1];
      T* out = values + j * D;
      int64_t d0 = 0;
      for (; D - d0 >= 8 * VA; d0 += 8 * VA) segment_block<T, 8>(g, D, d0, sorted, i0, i1, doc_mask, out);
      if (D - d0 >= 4 * VA) {
        segment_block<T, 4>(g, D, d0, sorted, i0, i1, doc_mask, out);
        d0 += 4 * VA;
      }
      if (D - d0 >= 2 * VA) {
        segment_block<T, 2>(g, D, d0, sorted, i0, i1, doc_mask, out);
        d0 += 2 * VA;
      }
      if (D - d0 >= VA) {
        segment_block<T, 1>(g, D, d0, sorted, i0, i1, doc_mask, out);
        d0 += VA;
      }
      for (; d0 < D; ++d0) {
        A acc = 0;
        for (int64_t i = i0; i < i1; ++i) acc += g[static_cast<int64_t>(sorted[i] & doc_mask) * D + d0];
        out[d0] = static_cast<T>(acc);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ngram_bag_backward_cpu(
    const at::Tensor& grad, const at::Tensor& tokens_in, const at::Tensor& offsets_in, at::IntArrayRef orders,
    int64_t num_buckets, int64_t unigram_rows, int64_t mode, int64_t num_weights,
    const std::optional<at::Tensor>& vocab_keys, const std::optional<at::Tensor>& vocab_rows) {
  const char* op = kNgramBagBackward;
  const NgramSpec s = check_ngram_args(op, tokens_in, offsets_in, orders, num_buckets, unigram_rows,
                                       vocab_keys, vocab_rows, /*allow_raw=*/false);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (sum) or 1 (mean), got ", mode);
  check_floating(op, grad, "grad");
  TORCH_CHECK(grad.device() == tokens_in.device(), op, ": grad is on ", grad.device(),
              " but tokens is on ", tokens_in.device(), "; all inputs must be on one device");
  const int64_t B = offsets_in.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B, op, ": grad must be [B, D] with B = ", B,
              " documents, got ", grad.sizes());
  TORCH_CHECK(num_weights >= 0, op, ": num_weights must be >= 0, got ", num_weights);
  if (!s.vocab) {
    TORCH_CHECK(num_weights == s.U + s.K, op, ": num_weights = ", num_weights,
                " but unigram_rows + num_buckets = ", s.U + s.K);
  }
  const at::Tensor tokens = tokens_in.contiguous(), offsets = offsets_in.contiguous();
  check_data(op, tokens, offsets, s);
  const std::optional<at::Tensor> vk = s.vocab ? std::optional<at::Tensor>(vocab_keys->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> vr = s.vocab ? std::optional<at::Tensor>(vocab_rows->contiguous()) : std::nullopt;
  const int64_t N = tokens.size(0), D = grad.size(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const Router router(s, vk, vr, num_weights, op);

  // Pairs (row, doc) as keys row << doc_bits | doc, written in (doc, position, order) order at
  // each document's upper-bound slots; n-grams a vocabulary drops become all-ones keys. A
  // stable sort on the row bits alone then leaves each row's pairs in document order. With a
  // vocabulary the row field gets one more bit when needed, so that the all-ones field of a
  // dropped key exceeds every real row and sorts last.
  std::vector<int64_t> base(B + 1, 0), kept(B, 0);
  for (int64_t b = 0; b < B; ++b) base[b + 1] = base[b] + s.ngrams_in(doc_end(off, B, N, b) - off[b]);
  const int64_t total = base[B];
  const int doc_bits = B > 1 ? bit_width(static_cast<uint64_t>(B - 1)) : 0;
  const uint64_t max_row = static_cast<uint64_t>(std::max<int64_t>(num_weights, 1) - 1);
  const int row_bits = bit_width(s.vocab ? max_row + 1 : max_row);
  TORCH_CHECK(row_bits + doc_bits <= 63, op, ": num_weights * documents is too large for 64-bit "
              "(row, document) keys (", num_weights, " rows, ", B, " documents)");
  std::vector<uint64_t>& kbuf = scratch_vec<uint64_t>();
  if (static_cast<int64_t>(kbuf.size()) < 2 * total) kbuf.resize(2 * total);
  uint64_t* keys = kbuf.data();
  parallel_docs(off, B, N, [&](int64_t b) {
    uint64_t* k = keys + base[b];
    const uint64_t db = static_cast<uint64_t>(b);
    kept[b] = router.for_each(tok + off[b], doc_end(off, B, N, b) - off[b], [&](int64_t r) {
      *k++ = (static_cast<uint64_t>(r) << doc_bits) | db;
    });
    std::fill(k, keys + base[b + 1], ~uint64_t{0});
  });
  int64_t nkept = 0;
  for (int64_t b = 0; b < B; ++b) nkept += kept[b];
  const uint64_t* sorted = radix_sort(keys, keys + total, total, doc_bits, row_bits);

  // Runs of one row: starts[j] for j < nnz, starts[nnz] = nkept. Parallel count, then fill.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), nkept / 4096));
  std::vector<int64_t> chunk_runs(chunks + 1, 0);
  auto is_start = [&](int64_t i) { return i == 0 || (sorted[i] >> doc_bits) != (sorted[i - 1] >> doc_bits); };
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t n = 0;
      for (int64_t i = nkept * c / chunks; i < nkept * (c + 1) / chunks; ++i) n += is_start(i);
      chunk_runs[c + 1] = n;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) chunk_runs[c + 1] += chunk_runs[c];
  const int64_t nnz = chunk_runs[chunks];
  std::vector<int64_t> starts(nnz + 1);
  starts[nnz] = nkept;
  at::Tensor rows = at::empty({nnz}, tokens.options());
  int64_t* rows_p = rows.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t j = chunk_runs[c];
      for (int64_t i = nkept * c / chunks; i < nkept * (c + 1) / chunks; ++i) {
        if (is_start(i)) {
          starts[j] = i;
          rows_p[j++] = static_cast<int64_t>(sorted[i] >> doc_bits);
        }
      }
    }
  });

  at::Tensor values = OutputPool::get().empty({nnz, D}, grad.options());
  if (values.numel() == 0) return {rows, values};
  const uint64_t doc_mask = (uint64_t{1} << doc_bits) - 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ngram_bag_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    // g[b] = grad[b] (sum) or grad[b] / count[b] (mean), in the accumulation type.
    at::Tensor g = grad.to(c10::CppTypeToScalarType<A>::value).contiguous();
    if (mode == 1) {
      at::Tensor counts = at::empty({B, 1}, g.options());
      A* cp = counts.data_ptr<A>();
      for (int64_t b = 0; b < B; ++b) cp[b] = static_cast<A>(std::max<int64_t>(kept[b], 1));
      g = g / counts;
    }
    segment_sums<scalar_t>(g.data_ptr<A>(), D, sorted, starts.data(), nnz, doc_mask,
                           values.data_ptr<scalar_t>());
  });
  return {rows, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) {
  m.impl("ngram_bag", &ngram_bag_cpu);
  m.impl("ngram_ids", &ngram_ids_cpu);
  m.impl("_ngram_bag_backward", &ngram_bag_backward_cpu);
}

}  // namespace effnlp
