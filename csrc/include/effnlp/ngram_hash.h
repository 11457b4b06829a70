// The n-gram hash of ngram_bag / ngram_ids and the row it selects, shared by the CPU and CUDA
// kernels (host and device inline code, no torch) and reproduced bit for bit by
// effnlp_ext/reference.py with int64 torch ops.
//
// Hash of the n-gram (t_0, ..., t_{n-1}) of order n (tokens are int64 >= 0, read as uint64;
// all arithmetic is mod 2^64):
//
//   h = kBasis                                    FNV-1a over whole 64-bit tokens
//   for each t_i:  h = (h ^ t_i) * kPrime
//   h ^= n * kOrderMix                            the order, so orders never share a stream
//   h ^= h >> 33; h *= kMix1; h ^= h >> 33; h *= kMix2; h ^= h >> 33     (murmur3 fmix64)
//
// The chain is a prefix computation: the hashes of all orders starting at one position come
// out of a single pass over max(orders) tokens.
//
// Rows (U = unigram_rows, K = num_buckets):
//   order 1 and U > 0:         row = token (token < U required)
//   otherwise:                 row = U + ((h >> 1) % K)     (logical shift: the top 63 bits,
//                                                             a non-negative int64)
//   U == 0 and K == 0:         no row; ngram_ids returns h itself, as an int64 (raw keys)
//   vocabulary mode:           row = vocab_rows[slot] where vocab_keys[slot] == (int64)h, found
//                              by linear probing from slot h & (T - 1) in a table of T = 2^k
//                              slots; kEmptyKey marks an empty slot and ends the probe (the
//                              n-gram is then dropped). U and K are unused (must be 0).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EFFNLP_HOST_DEVICE __host__ __device__
#else
#define EFFNLP_HOST_DEVICE
#endif

namespace effnlp {
namespace ngram {

constexpr uint64_t kBasis = 0xcbf29ce484222325ULL;     // FNV-1a 64-bit offset basis
constexpr uint64_t kPrime = 0x00000100000001b3ULL;     // FNV-1a 64-bit prime
constexpr uint64_t kOrderMix = 0x9e3779b97f4a7c15ULL;  // 2^64 / golden ratio (odd)
constexpr uint64_t kMix1 = 0xff51afd7ed558ccdULL;      // murmur3 fmix64 constants
constexpr uint64_t kMix2 = 0xc4ceb9fe1a85ec53ULL;
// An empty slot of a vocabulary table (INT64_MIN). A real key equal to it cannot be stored
// (build_vocab_table rejects it) and is never found.
constexpr int64_t kEmptyKey = static_cast<int64_t>(0x8000000000000000ULL);
// Longest n-gram order accepted (the kernels keep a window of this many hashes per position).
constexpr int kMaxOrder = 32;

EFFNLP_HOST_DEVICE inline uint64_t step(uint64_t h, int64_t token) {
  return (h ^ static_cast<uint64_t>(token)) * kPrime;
}

// The final hash of a chain value h after `order` tokens.
EFFNLP_HOST_DEVICE inline uint64_t finish(uint64_t h, int64_t order) {
  h ^= static_cast<uint64_t>(order) * kOrderMix;
  h ^= h >> 33;
  h *= kMix1;
  h ^= h >> 33;
  h *= kMix2;
  h ^= h >> 33;
  return h;
}

// Hash of tokens[0..n).
EFFNLP_HOST_DEVICE inline uint64_t hash(const int64_t* tokens, int64_t n) {
  uint64_t h = kBasis;
  for (int64_t i = 0; i < n; ++i) h = step(h, tokens[i]);
  return finish(h, n);
}

// (h >> 1) % K for K > 0, without a hardware division: with M = floor((2^64 - 1) / K) the
// quotient estimate q = floor(x * M / 2^64) is floor(x / K) or one less for any x < 2^63, so
// one conditional subtraction finishes it. Equal to the plain % for every input.
struct Modulo {
  uint64_t K = 1, M = ~0ULL;
  Modulo() = default;
  explicit Modulo(uint64_t k) : K(k), M(k ? ~0ULL / k : 0) {}
  EFFNLP_HOST_DEVICE inline uint64_t of_top63(uint64_t h) const {
    const uint64_t x = h >> 1;
#if defined(__CUDA_ARCH__)
    const uint64_t q = __umul64hi(x, M);
#else
    const uint64_t q = static_cast<uint64_t>((static_cast<unsigned __int128>(x) * M) >> 64);
#endif
    uint64_t r = x - q * K;
    if (r >= K) r -= K;
    return r;
  }
};

// The row of the vocabulary table holding key h, or -1 when absent. mask = T - 1, T a power
// of two; the table must keep at least one empty slot (build_vocab_table keeps half empty), and
// the probe stops after T slots in any case.
EFFNLP_HOST_DEVICE inline int64_t vocab_find(const int64_t* keys, const int64_t* rows, uint64_t mask,
                                             uint64_t h) {
  const int64_t key = static_cast<int64_t>(h);
  uint64_t slot = h & mask;
  for (uint64_t probes = 0; probes <= mask; ++probes) {
    const int64_t k = keys[slot];
    if (k == kEmptyKey) return -1;
    if (k == key) return rows[slot];
    slot = (slot + 1) & mask;
  }
  return -1;
}

}  // namespace ngram
}  // namespace effnlp
