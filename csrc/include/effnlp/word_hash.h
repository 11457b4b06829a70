// Word tokenisation and hashing of raw text, shared by the hash_words kernel and documented
// for the pure-PyTorch reference (effnlp_ext/reference.py::hash_words_reference).
//
// Bytes are classified one at a time (UTF-8 multibyte sequences are all >= 0x80, so they are
// word bytes and a non-ASCII word stays whole):
//   separator: ASCII whitespace and control bytes (<= 0x20, 0x7f);
//   word:      ASCII letters and digits, the apostrophe, every byte >= 0x80;
//   symbol:    every other printable ASCII byte; each one is a token of its own.
// A token is a maximal run of word bytes, or one symbol byte. ASCII letters are lower-cased.
// Its id is the 64-bit FNV-1a hash of its (lower-cased) bytes with the top bit cleared, so ids
// are non-negative int64 and the same on every platform and run (unlike Python's hash()).
#pragma once

#include <cstdint>

namespace effnlp {
namespace word_hash {

constexpr uint64_t kFnvOffset = 14695981039346656037ULL;
constexpr uint64_t kFnvPrime = 1099511628211ULL;
constexpr uint64_t kIdMask = 0x7fffffffffffffffULL;

enum ByteClass : uint8_t { kSeparator = 0, kWord = 1, kSymbol = 2 };

constexpr ByteClass byte_class(uint8_t b) {
  if (b <= 0x20 || b == 0x7f) return kSeparator;
  if (b >= 0x80 || b == '\'' || (b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') ||
      (b >= 'A' && b <= 'Z'))
    return kWord;
  return kSymbol;
}

constexpr uint8_t lower(uint8_t b) { return (b >= 'A' && b <= 'Z') ? uint8_t(b + 32) : b; }

constexpr uint64_t step(uint64_t h, uint8_t b) { return (h ^ lower(b)) * kFnvPrime; }

}  // namespace word_hash
}  // namespace effnlp
