// CPU-side helpers of the ngram_bag kernels (csrc/cpu/ngram_bag*.cpp): the n-gram router (hash
// -> row, one mode dispatch per document), the data-dependent input checks, and the parallel
// loops over documents of balanced token counts.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "effnlp/ngram_bag.h"
#include "effnlp/ngram_hash.h"

namespace effnlp {
namespace ngram {

// The row of an n-gram a vocabulary does not hold.
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
inline void check_data(const char* op, const at::Tensor& tokens, const at::Tensor& offsets, const NgramSpec& s) {
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
inline std::vector<int64_t> balanced_bounds(const int64_t* off, int64_t B, int64_t N, int64_t parts) {
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


// A grow-only buffer of the calling thread, kept across calls.
template <typename T>
std::vector<T>& scratch_vec() {
  thread_local std::vector<T> v;
  return v;
}

}  // namespace ngram
}  // namespace effnlp
