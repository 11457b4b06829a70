// CPU kernel of hash_words: raw UTF-8 text of many documents -> per-document hashed word ids,
// the tokeniser of the sparse-distillation (DAN) student. The rules live in
// effnlp/word_hash.h. Text is host data, so there is no CUDA kernel: the ids it returns go to
// any device.
//
// Two passes, each in parallel over documents: count the tokens of every document, prefix-sum
// the counts into the output offsets, then hash every document's tokens into its slice. A
// 256-entry class table replaces the branches of byte_class in the inner loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "effnlp/checks.h"
#include "effnlp/word_hash.h"

namespace effnlp {
namespace {

using namespace word_hash;

struct Tables {
  std::array<uint8_t, 256> cls{};
  Tables() {
    for (int b = 0; b < 256; ++b) cls[b] = byte_class(static_cast<uint8_t>(b));
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// Calls emit(hash) for every token of text[begin, end).
template <typename Emit>
inline void scan(const uint8_t* text, int64_t begin, int64_t end, const uint8_t* cls, Emit&& emit) {
  int64_t i = begin;
  while (i < end) {
    const uint8_t c = cls[text[i]];
    if (c == kSeparator) {
      ++i;
    } else if (c == kSymbol) {
      emit(step(kFnvOffset, text[i]) & kIdMask);
      ++i;
    } else {
      uint64_t h = kFnvOffset;
      while (i < end && cls[text[i]] == kWord) h = step(h, text[i++]);
      emit(h & kIdMask);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> hash_words_cpu(const at::Tensor& text,
                                                   const at::Tensor& offsets) {
  TORCH_CHECK(text.dim() == 1 && text.scalar_type() == at::kByte,
               "hash_words: text must be a 1-D uint8 tensor (UTF-8 bytes), got ", text.scalar_type(), " ",
               text.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong,
               "hash_words: offsets must be a 1-D int64 tensor, got ", offsets.scalar_type(), " ",
               offsets.sizes());
  TORCH_CHECK(text.device().is_cpu() && offsets.device().is_cpu(),
               "hash_words: text and offsets must be CPU tensors (tokenisation runs on the host)");
  const at::Tensor t = text.contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t n = t.numel(), B = off.numel();
  const int64_t* o = off.data_ptr<int64_t>();
  if (B > 0) TORCH_CHECK(o[0] == 0, "hash_words: offsets[0] must be 0, got ", o[0]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = b + 1 < B ? o[b + 1] : n;
    TORCH_CHECK(o[b] <= end && end <= n, "hash_words: offsets must be non-decreasing and within the ",
                 n, " bytes of text; document ", b, " spans [", o[b], ", ", end, ")");
  }
  const uint8_t* data = t.data_ptr<uint8_t>();
  const uint8_t* cls = tables().cls.data();
  auto doc_end = [&](int64_t b) { return b + 1 < B ? o[b + 1] : n; };

  at::Tensor out_offsets = at::empty({B}, off.options());
  int64_t* oo = out_offsets.data_ptr<int64_t>();
  std::vector<int64_t> counts(B);
  const int64_t grain = std::max<int64_t>(1, 4096 * B / std::max<int64_t>(n, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c = 0;
      scan(data, o[b], doc_end(b), cls, [&](uint64_t) { ++c; });
      counts[b] = c;
    }
  });
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    oo[b] = total;
    total += counts[b];
  }
  at::Tensor ids = at::empty({total}, off.options());
  int64_t* out = ids.data_ptr<int64_t>();
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* p = out + oo[b];
      scan(data, o[b], doc_end(b), cls, [&](uint64_t h) { *p++ = static_cast<int64_t>(h); });
    }
  });
  return {ids, out_offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) { m.impl("hash_words", &hash_words_cpu); }

}  // namespace effnlp
