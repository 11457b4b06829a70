// CPU sparse x dense products shared by sparse_linear (the exported TAMT path) and masked_linear
// (its sparse path at high sparsity), and the builders of CSR matrices from a masked weight.
//
// sparse_linear_impl: y = x @ W.T + bias with W [out, in] in CSR (int32 indices).
// Layout: tokens go in blocks of B = 8 vectors (64 floats, 32 doubles; the last tokens in a
// block of 1, 2 or 4 vectors when they fit). A block of x is transposed once into a
// thread-local panel xT [in, B] (contiguous rows of B, in L2); each output row o is then
// sum_p W[o, col_p] * xT[col_p, :], one register accumulator per vector, fed by one
// broadcast value and one contiguous load per vector and nonzero. So every nonzero costs B
// FMAs at full vector width with no gather, the ideal for an unstructured mask. With several
// whole blocks and enough nonzeros, the nonzeros are first split by stripes of 192 input columns
// (build_stripes) and each chunk of rows walks the panel one stripe at a time, so the rows it
// reads stay in L1. Accumulators start at the bias; rows are done in chunks whose results (a
// [chunk, B] tile) are transposed back into y. Both transposes go through 8x8 register tiles
// (at::vec::transpose_mxn).
// On a CPU with AVX-512 the float rows run a 512-bit loop (stripe_rows_avx512: a block of 64
// tokens in 4 zmm accumulators, half the loads and FMAs of the 8 AVX2 vectors), chosen at run time
// (use_avx512), so the build still targets AVX2 and runs on any x86-64 with it.
// The work is split over (token block, row chunk) tiles in block-major order, so a thread
// re-transposes only when its block changes and small batches still use every core.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && defined(CPU_CAPABILITY_AVX2)
#define EFFNLP_SPARSE_AVX512 1
#include <immintrin.h>
#endif

namespace effnlp {
namespace sparse_cpu {

template <typename T>
struct Panel {
  std::vector<T> xt, tile;  // 64 bytes longer than used: the data start at a 64-byte boundary
  int64_t block = -1;
};

// The first 64-byte boundary in a buffer (the panel's rows are then whole cache lines).
template <typename T>
inline T* align64(std::vector<T>& v) {
  const auto a = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((a + 63) & ~uintptr_t{63});
}

// Whether the AVX-512 loop may run: the CPU (and the OS, which __builtin_cpu_supports checks
// through XCR0) supports AVX-512F and ATEN_CPU_CAPABILITY, torch's own switch, does not ask for
// AVX2 or less ("default", "avx2"). Read once.
inline bool use_avx512() {
#ifdef EFFNLP_SPARSE_AVX512
  static const bool ok = [] {
    if (!__builtin_cpu_supports("avx512f")) return false;
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    return !(cap && (std::strcmp(cap, "default") == 0 || std::strcmp(cap, "avx2") == 0));
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef EFFNLP_SPARSE_AVX512
// Rows [o0, o1) of one stripe for float blocks of B = 16 * NZ tokens: acc[o] (a [B] row of the
// tile) = (first ? bias[o] : acc[o]) + sum_p vals[p] * xs[cols[p] * B .. + B]. xs and tile are
// 64-byte aligned (B floats are whole cache lines). Measured on a 2-vCPU Xeon (AVX-512, 1
// thread, 4096 tokens, 90%): 768 -> 3072 1.3x and 3072 -> 768 1.6x faster than the AVX2 loop
// with the same stripes; 8 zmm (128 tokens) no faster, 2 zmm (32) slower; on a panel off a
// 64-byte boundary every load straddles two lines and the loop is slower than the AVX2 one.
// It is the AVX2 loop of sparse_linear_block written with 512-bit intrinsics: at::vec is built
// for AVX2 here, so the wider loop cannot share its Vectorized code.
template <int NZ>
__attribute__((target("avx512f"))) inline void stripe_rows_avx512(
    const float* xs, const int32_t* ptr, const int32_t* cols, const float* vals,
    const float* bias, bool first, int64_t o0, int64_t o1, float* tile) {
  constexpr int64_t B = 16 * NZ;
  for (int64_t o = o0; o < o1; ++o) {
    float* acc = tile + (o - o0) * B;
    __m512 a[NZ];
    if (first) {
      const __m512 b = _mm512_set1_ps(bias ? bias[o] : 0.f);
      for (int i = 0; i < NZ; ++i) a[i] = b;
    } else {
      for (int i = 0; i < NZ; ++i) a[i] = _mm512_load_ps(acc + 16 * i);
    }
    for (int32_t p = ptr[o]; p < ptr[o + 1]; ++p) {
      const __m512 v = _mm512_set1_ps(vals[p]);
      const float* r = xs + static_cast<int64_t>(cols[p]) * B;
      for (int i = 0; i < NZ; ++i) a[i] = _mm512_fmadd_ps(v, _mm512_load_ps(r + 16 * i), a[i]);
    }
    for (int i = 0; i < NZ; ++i) _mm512_store_ps(acc + 16 * i, a[i]);
  }
}
#endif

template <typename T>
Panel<T>& panel() {
  thread_local Panel<T> p;
  return p;
}

// One tile of a transpose: dst[j0 + j, i0 + i] = src[i0 + i, j0 + j], 8x8 or the edge.
template <typename T>
inline void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t i0,
                           int64_t j0, int64_t rows, int64_t cols) {
  const int64_t mi = std::min<int64_t>(8, rows - i0), mj = std::min<int64_t>(8, cols - j0);
  const T* s = src + i0 * ld_src + j0;
  T* d = dst + j0 * ld_dst + i0;
  if (mi == 8 && mj == 8) {
    at::vec::transpose_mxn<T, 8, 8>(s, ld_src, d, ld_dst);
  } else {
    at::vec::transpose_mxn<T>(s, ld_src, d, ld_dst, static_cast<int>(mi), static_cast<int>(mj));
  }
}

// dst[j, i] = src[i, j] for a [rows, cols] src (leading dims ld_src, ld_dst), 8x8 tiles, src
// rows outermost. With `dst_rows_outer` each group of 8 dst rows is written left to right
// instead, so every cache line of dst is completed by two consecutive tiles (for y: its rows are
// long and fresh, and the src tile is in L1).
template <typename T>
inline void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows,
                      int64_t cols, bool dst_rows_outer = false) {
  if (dst_rows_outer) {
    for (int64_t j0 = 0; j0 < cols; j0 += 8) {
      for (int64_t i0 = 0; i0 < rows; i0 += 8) {
        transpose_tile(src, ld_src, dst, ld_dst, i0, j0, rows, cols);
      }
    }
  } else {
    for (int64_t i0 = 0; i0 < rows; i0 += 8) {
      for (int64_t j0 = 0; j0 < cols; j0 += 8) {
        transpose_tile(src, ld_src, dst, ld_dst, i0, j0, rows, cols);
      }
    }
  }
}

// The nonzeros of every row split by stripes of kStripe input columns, stripe-major: stripe s
// holds a CSR over all rows (ptr[s * (out + 1) + o] .. [.. + o + 1]) with the column as an offset
// inside the stripe. The product then walks one stripe at a time, so the panel rows it reads
// (kStripe x 256 B = 48 KB, the L1 of current x86 cores) stay in L1 while every row of a chunk
// uses them, instead of each nonzero fetching its 256 B row of the whole [in, B] panel from L2.
// Measured, 4096 tokens, 768 -> 3072, 90%, 1 thread: the loop 1.17-1.23x faster with stripes of
// 128-192 columns (AVX2 and the AVX-512 loop alike).
constexpr int64_t kStripe = 192;

inline int64_t n_stripes(int64_t in) { return (in + kStripe - 1) / kStripe; }

template <typename T>
struct Striped {
  std::vector<int32_t> ptr, col;  // ptr: [n_stripes(in) * (out + 1)]; col: offset in the stripe
  std::vector<T> val;
};

// Stripes pay when there are several token blocks to amortise the O(nnz) split over and enough
// nonzeros per (row, stripe) to amortise the accumulators' reload; else the plain loop runs.
inline bool want_stripes(int64_t n_blocks, int64_t nnz, int64_t out, int64_t in) {
  const int64_t ns = n_stripes(in);
  return ns > 1 && n_blocks >= 4 && nnz >= 8 * out * ns;
}

template <typename T>
void build_stripes(const int32_t* crow, const int32_t* col, const T* val, int64_t out, int64_t in,
                   Striped<T>& st) {
  const int64_t ns = n_stripes(in), ld = out + 1;
  st.ptr.assign(ns * ld, 0);
  const int64_t nnz = crow[out];
  st.col.resize(nnz);
  st.val.resize(nnz);
  int32_t* ptr = st.ptr.data();
  at::parallel_for(0, out, 256, [&](int64_t r0, int64_t r1) {  // counts, in slot [s, o]
    for (int64_t o = r0; o < r1; ++o) {
      for (int32_t p = crow[o]; p < crow[o + 1]; ++p) ++ptr[(col[p] / kStripe) * ld + o];
    }
  });
  int64_t total = 0;  // counts -> starts, stripe-major; slot [s, out] = end of stripe s
  for (int64_t s = 0; s < ns; ++s) {
    for (int64_t o = 0; o < out; ++o) {
      const int32_t c = ptr[s * ld + o];
      ptr[s * ld + o] = static_cast<int32_t>(total);
      total += c;
    }
    ptr[s * ld + out] = static_cast<int32_t>(total);
  }
  at::parallel_for(0, out, 256, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> pos(ns);
    for (int64_t o = r0; o < r1; ++o) {
      for (int64_t s = 0; s < ns; ++s) pos[s] = ptr[s * ld + o];
      for (int32_t p = crow[o]; p < crow[o + 1]; ++p) {
        const int32_t s = col[p] / kStripe;
        const int32_t q = pos[s]++;
        st.col[q] = col[p] - s * static_cast<int32_t>(kStripe);
        st.val[q] = val[p];
      }
    }
  });
}

// NV vectors of tokens per block (B = NV * V tokens): 8 for whole blocks; the tokens left over
// (fewer than 8 vectors) go in the narrowest block that holds them, so few lanes compute padding.
// `st` (whole blocks only): the nonzeros split by stripes, or null for the plain loop.
template <typename T, int NV>
inline void sparse_linear_block(const T* x, const int32_t* crow, const int32_t* col, const T* val,
                                const T* bias, T* y, int64_t N, int64_t in, int64_t out,
                                const Striped<T>* st = nullptr) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t B = NV * V;
  constexpr int64_t kChunk = 128;
  const int64_t nblocks = (N + B - 1) / B;
  const int64_t nchunks = (out + kChunk - 1) / kChunk;
  [[maybe_unused]] const bool wide = std::is_same_v<T, float> && B % 16 == 0 && use_avx512();
  at::parallel_for(0, nblocks * nchunks, 1, [&](int64_t t0, int64_t t1) {
    Panel<T>& P = panel<T>();
    constexpr int64_t kPad = 64 / sizeof(T);
    if (static_cast<int64_t>(P.xt.size()) < in * B + kPad) P.xt.resize(in * B + kPad);
    if (static_cast<int64_t>(P.tile.size()) < kChunk * B + kPad) P.tile.resize(kChunk * B + kPad);
    P.block = -1;  // a fresh range: the panel of a previous call is stale
    T* xt = align64(P.xt);
    T* tile = align64(P.tile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / nchunks, chunk = t % nchunks;
      const int64_t n0 = blk * B, nb = std::min<int64_t>(B, N - n0);
      if (P.block != blk) {
        // xT[k, j] = x[n0 + j, k]; lanes past the last token are zero.
        // x block [nb, in] -> xT [in, B] in 8x8 tiles (AVX2 shuffles for float).
        transpose(x + n0 * in, in, xt, B, nb, in);
        if (nb < B) {
          for (int64_t k = 0; k < in; ++k) std::fill(xt + k * B + nb, xt + (k + 1) * B, T(0));
        }
        P.block = blk;
      }
      const int64_t o0 = chunk * kChunk, o1 = std::min<int64_t>(out, o0 + kChunk);
      // One stripe of the panel at a time (the plain CSR is a single stripe over every column);
      // between stripes the rows' accumulators wait in the tile (L1).
      const int64_t ns = st ? n_stripes(in) : 1;
      const int32_t* cols = st ? st->col.data() : col;
      const T* vals = st ? st->val.data() : val;
      for (int64_t s = 0; s < ns; ++s) {
        const T* xs = xt + s * kStripe * B;
        const int32_t* ptr = st ? st->ptr.data() + s * (out + 1) : crow;
#ifdef EFFNLP_SPARSE_AVX512
        if constexpr (std::is_same_v<T, float> && B % 16 == 0) {
          if (wide) {
            stripe_rows_avx512<static_cast<int>(B / 16)>(xs, ptr, cols, vals, bias, s == 0, o0, o1,
                                                         tile);
            continue;
          }
        }
#endif
        for (int64_t o = o0; o < o1; ++o) {
          T* acc = tile + (o - o0) * B;
          Vec a[NV];
          for (int i = 0; i < NV; ++i) {
            a[i] = s == 0 ? Vec(bias ? bias[o] : T(0)) : Vec::loadu(acc + i * V);
          }
          for (int32_t p = ptr[o]; p < ptr[o + 1]; ++p) {
            const Vec v(vals[p]);
            const T* r = xs + static_cast<int64_t>(cols[p]) * B;
            for (int i = 0; i < NV; ++i) a[i] = at::vec::fmadd(v, Vec::loadu(r + i * V), a[i]);
          }
          for (int i = 0; i < NV; ++i) a[i].store(acc + i * V);
        }
      }
      // tile [rows, B] (bias already in) -> y[n0.., o0..] [nb, rows], 8x8 tiles.
      transpose(tile, B, y + n0 * out + o0, out, o1 - o0, nb, /*dst_rows_outer=*/true);
    }
  });
}

template <typename T>
inline void sparse_linear_impl(const T* x, const int32_t* crow, const int32_t* col, const T* val,
                               const T* bias, T* y, int64_t N, int64_t in, int64_t out) {
  constexpr int64_t V = at::vec::Vectorized<T>::size();
  // whole blocks of 8 vectors, then the remaining tokens in the narrowest block that holds them
  const int64_t full = N / (8 * V) * (8 * V), rest = N - full;
  if (full > 0) {
    const Striped<T>* st = nullptr;
    thread_local Striped<T> stripes;  // reused across calls: fresh pages cost a fault each
    if (want_stripes(full / (8 * V), crow[out], out, in)) {
      build_stripes(crow, col, val, out, in, stripes);
      st = &stripes;
    }
    sparse_linear_block<T, 8>(x, crow, col, val, bias, y, full, in, out, st);
  }
  if (rest == 0) return;
  const T* xr = x + full * in;
  T* yr = y + full * out;
  if (rest <= V) {
    sparse_linear_block<T, 1>(xr, crow, col, val, bias, yr, rest, in, out);
  } else if (rest <= 2 * V) {
    sparse_linear_block<T, 2>(xr, crow, col, val, bias, yr, rest, in, out);
  } else if (rest <= 4 * V) {
    sparse_linear_block<T, 4>(xr, crow, col, val, bias, yr, rest, in, out);
  } else {
    sparse_linear_block<T, 8>(xr, crow, col, val, bias, yr, rest, in, out);
  }
}

// CSR of a masked matrix M = W * 1[S > t] (W, S: [rows, cols], contiguous), or of its
// transpose M.T ([cols, rows]: the CSC of M) when `transposed`. int32 indices; rows/cols and
// the number of kept entries must fit in int32 (checked by the caller). Parallel over row
// chunks: each chunk counts its kept entries per output row, a prefix sum over (output row,
// chunk) gives every chunk its slots, then each chunk fills them in order, so the column
// indices of every output row come out sorted.
template <typename T>
struct MaskedCsr {
  std::vector<int32_t> crow, col;
  std::vector<T> val;
};

// Kept entries of M (one pass over S).
template <typename T>
int64_t count_kept(const T* s, T t, int64_t n) {
  return at::parallel_reduce(0, n, int64_t{1} << 16, int64_t{0}, [&](int64_t b, int64_t e, int64_t acc) {
    for (int64_t i = b; i < e; ++i) acc += s[i] > t;
    return acc;
  }, std::plus<int64_t>());
}

template <typename T>
void build_masked_csr(const T* w, const T* s, T t, int64_t rows, int64_t cols, bool transposed,
                      MaskedCsr<T>& out) {
  const int64_t out_rows = transposed ? cols : rows;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  const int64_t per = (rows + nchunks - 1) / nchunks;
  // counts[c * out_rows + r]: kept entries of chunk c in output row r.
  std::vector<int64_t> counts(nchunks * out_rows, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * out_rows;
      for (int64_t r = c * per; r < std::min(rows, (c + 1) * per); ++r) {
        const T* sr = s + r * cols;
        if (transposed) {
          for (int64_t j = 0; j < cols; ++j) cnt[j] += sr[j] > t;
        } else {
          int64_t k = 0;
          for (int64_t j = 0; j < cols; ++j) k += sr[j] > t;
          cnt[r] = k;
        }
      }
    }
  });
  out.crow.assign(out_rows + 1, 0);
  int64_t total = 0;
  for (int64_t r = 0; r < out_rows; ++r) {      // counts -> each chunk's first slot in row r
    out.crow[r] = static_cast<int32_t>(total);
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t k = counts[c * out_rows + r];
      counts[c * out_rows + r] = total;
      total += k;
    }
  }
  out.crow[out_rows] = static_cast<int32_t>(total);
  out.col.resize(total);
  out.val.resize(total);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* pos = counts.data() + c * out_rows;
      for (int64_t r = c * per; r < std::min(rows, (c + 1) * per); ++r) {
        const T* sr = s + r * cols;
        const T* wr = w + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          if (!(sr[j] > t)) continue;
          const int64_t o = transposed ? j : r;
          const int64_t p = pos[o]++;
          out.col[p] = static_cast<int32_t>(transposed ? r : j);
          out.val[p] = wr[j];
        }
      }
    }
  });
}

}  // namespace sparse_cpu
}  // namespace effnlp
