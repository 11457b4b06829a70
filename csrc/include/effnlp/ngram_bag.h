// Argument validation of ngram_bag, ngram_ids and _ngram_bag_backward, shared by the CPU and
// CUDA kernels (the data-dependent checks of tokens and offsets are done per device).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "effnlp/checks.h"
#include "effnlp/ngram_hash.h"

namespace effnlp {

constexpr const char* kNgramBag = "ngram_bag";
constexpr const char* kNgramIds = "ngram_ids";
constexpr const char* kNgramBagBackward = "_ngram_bag_backward";

// What the kernels need to know about the n-gram layout, validated.
struct NgramSpec {
  std::vector<int64_t> orders;  // ascending, distinct, in [1, kMaxOrder]
  int64_t max_order = 0;
  int64_t U = 0, K = 0;         // unigram_rows, num_buckets
  bool vocab = false;           // rows come from (vocab_keys, vocab_rows)
  bool raw = false;             // U == K == 0 without vocab: ids are the raw 64-bit hashes
  bool direct_unigrams = false; // order 1 maps to row = token (U > 0)
  int64_t table_size = 0;       // T of the vocabulary table
  int64_t num_orders() const { return static_cast<int64_t>(orders.size()); }
  // Upper bound on the n-grams of a document of len tokens (exact unless vocab drops some).
  int64_t ngrams_in(int64_t len) const {
    int64_t n = 0;
    for (int64_t o : orders) n += std::max<int64_t>(0, len - o + 1);
    return n;
  }
};

// Validates tokens, offsets, orders, num_buckets, unigram_rows and the vocabulary table
// (everything but the data-dependent properties of tokens and offsets). allow_raw: whether
// U == K == 0 without a vocabulary is accepted (ngram_ids: raw hashes).
inline NgramSpec check_ngram_args(const char* op, const at::Tensor& tokens, const at::Tensor& offsets,
                                  at::IntArrayRef orders, int64_t num_buckets, int64_t unigram_rows,
                                  const std::optional<at::Tensor>& vocab_keys,
                                  const std::optional<at::Tensor>& vocab_rows, bool allow_raw) {
  TORCH_CHECK(tokens.scalar_type() == at::kLong, op, ": tokens must be an int64 tensor, got ",
              tokens.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be an int64 tensor, got ",
              offsets.scalar_type());
  TORCH_CHECK(tokens.dim() == 1, op, ": tokens must be 1-D (the flat token ids of all documents), got ",
              tokens.dim(), "-D ", tokens.sizes());
  TORCH_CHECK(offsets.dim() == 1, op, ": offsets must be 1-D (the start of each document), got ",
              offsets.dim(), "-D ", offsets.sizes());
  TORCH_CHECK(offsets.device() == tokens.device(), op, ": offsets is on ", offsets.device(),
              " but tokens is on ", tokens.device(), "; all inputs must be on one device");
  TORCH_CHECK(!orders.empty(), op, ": orders must not be empty");
  NgramSpec s;
  for (int64_t o : orders) {
    TORCH_CHECK(o >= 1 && o <= ngram::kMaxOrder, op, ": every n-gram order must be in [1, ",
                ngram::kMaxOrder, "], got ", o);
    s.orders.push_back(o);
  }
  std::sort(s.orders.begin(), s.orders.end());
  TORCH_CHECK(std::adjacent_find(s.orders.begin(), s.orders.end()) == s.orders.end(), op,
              ": orders must be distinct, got ", orders);
  s.max_order = s.orders.back();
  TORCH_CHECK(unigram_rows >= 0, op, ": unigram_rows must be >= 0, got ", unigram_rows);
  TORCH_CHECK(num_buckets >= 0, op, ": num_buckets must be >= 0, got ", num_buckets);
  TORCH_CHECK(unigram_rows <= INT64_MAX - num_buckets, op, ": unigram_rows + num_buckets overflows int64");
  s.U = unigram_rows;
  s.K = num_buckets;
  const bool has_keys = vocab_keys.has_value() && vocab_keys->defined();
  const bool has_rows = vocab_rows.has_value() && vocab_rows->defined();
  TORCH_CHECK(has_keys == has_rows, op, ": vocab_keys and vocab_rows must be given together");
  if (has_keys) {
    const at::Tensor& k = *vocab_keys;
    const at::Tensor& r = *vocab_rows;
    TORCH_CHECK(k.scalar_type() == at::kLong && r.scalar_type() == at::kLong, op,
                ": vocab_keys and vocab_rows must be int64 tensors, got ", k.scalar_type(), " and ",
                r.scalar_type());
    TORCH_CHECK(k.dim() == 1 && r.dim() == 1 && k.size(0) == r.size(0), op,
                ": vocab_keys and vocab_rows must be 1-D of one size T, got ", k.sizes(), " and ",
                r.sizes());
    const int64_t T = k.size(0);
    TORCH_CHECK(T > 0 && (T & (T - 1)) == 0, op,
                ": the vocabulary table size must be a power of two, got ", T);
    TORCH_CHECK(k.device() == tokens.device() && r.device() == tokens.device(), op,
                ": the vocabulary table is on ", k.device(), " but tokens is on ", tokens.device(),
                "; all inputs must be on one device");
    TORCH_CHECK(unigram_rows == 0 && num_buckets == 0, op,
                ": with a vocabulary every n-gram is looked up in it, so unigram_rows and "
                "num_buckets must be 0, got ", unigram_rows, " and ", num_buckets);
    s.vocab = true;
    s.table_size = T;
    return s;
  }
  s.direct_unigrams = s.U > 0 && s.orders.front() == 1;
  const bool hashes = !(s.direct_unigrams && s.orders.size() == 1);  // some order is bucketed
  if (s.U == 0 && s.K == 0 && allow_raw) {
    s.raw = true;
  } else if (hashes) {
    TORCH_CHECK(s.K > 0, op, ": num_buckets must be > 0 to hash ",
                s.U > 0 ? "the orders above 1" : "n-grams",
                allow_raw ? " (num_buckets = unigram_rows = 0 returns the raw hashes)" : "");
  }
  return s;
}

// ngram_bag's inputs: the n-gram arguments, the mode and a 2-D floating table on the tokens'
// device with unigram_rows + num_buckets rows (any row count with a vocabulary).
inline NgramSpec check_ngram_bag(const char* op, const at::Tensor& tokens, const at::Tensor& offsets,
                                 const at::Tensor& weight, at::IntArrayRef orders,
                                 int64_t num_buckets, int64_t unigram_rows, int64_t mode,
                                 const std::optional<at::Tensor>& vocab_keys,
                                 const std::optional<at::Tensor>& vocab_rows) {
  const NgramSpec s = check_ngram_args(op, tokens, offsets, orders, num_buckets, unigram_rows,
                                       vocab_keys, vocab_rows, /*allow_raw=*/false);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (sum) or 1 (mean), got ", mode);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [rows, D], got ", weight.dim(), "-D ",
              weight.sizes());
  check_floating(op, weight, "weight");
  TORCH_CHECK(weight.device() == tokens.device(), op, ": weight is on ", weight.device(),
              " but tokens is on ", tokens.device(), "; all inputs must be on one device");
  if (!s.vocab) {
    TORCH_CHECK(weight.size(0) == s.U + s.K, op, ": weight has ", weight.size(0),
                " rows but unigram_rows + num_buckets = ", s.U, " + ", s.K, " = ", s.U + s.K);
  }
  return s;
}

// _ngram_bag_backward's inputs: the n-gram arguments, the mode, grad [B, D] on the tokens'
// device and num_weights (= unigram_rows + num_buckets without a vocabulary).
inline NgramSpec check_ngram_bag_backward(const char* op, const at::Tensor& grad,
                                          const at::Tensor& tokens, const at::Tensor& offsets,
                                          at::IntArrayRef orders, int64_t num_buckets,
                                          int64_t unigram_rows, int64_t mode, int64_t num_weights,
                                          const std::optional<at::Tensor>& vocab_keys,
                                          const std::optional<at::Tensor>& vocab_rows) {
  const NgramSpec s = check_ngram_args(op, tokens, offsets, orders, num_buckets, unigram_rows,
                                       vocab_keys, vocab_rows, /*allow_raw=*/false);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (sum) or 1 (mean), got ", mode);
  check_floating(op, grad, "grad");
  TORCH_CHECK(grad.device() == tokens.device(), op, ": grad is on ", grad.device(),
              " but tokens is on ", tokens.device(), "; all inputs must be on one device");
  const int64_t B = offsets.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B, op, ": grad must be [B, D] with B = ", B,
              " documents, got ", grad.sizes());
  TORCH_CHECK(num_weights >= 0, op, ": num_weights must be >= 0, got ", num_weights);
  if (!s.vocab) {
    TORCH_CHECK(num_weights == s.U + s.K, op, ": num_weights = ", num_weights,
                " but unigram_rows + num_buckets = ", s.U + s.K);
  }
  return s;
}

}  // namespace effnlp
