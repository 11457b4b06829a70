// CPU kernel of _ngram_bag_backward, the coalesced sparse gradient of ngram_bag (forward:
// ngram_bag.cpp).
//
// The gradient of the table is the sum over (n-gram, document) pairs of grad[doc]
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
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "effnlp/ngram_bag.h"
#include "effnlp/ngram_cpu.h"

namespace effnlp {
namespace {

using namespace ngram;

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
  const NgramSpec s = check_ngram_bag_backward(op, grad, tokens_in, offsets_in, orders, num_buckets,
                                               unigram_rows, mode, num_weights, vocab_keys,
                                               vocab_rows);
  const int64_t B = offsets_in.size(0);
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
  m.impl("_ngram_bag_backward", &ngram_bag_backward_cpu);
}

}  // namespace effnlp
