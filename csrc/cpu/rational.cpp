// CPU kernels of the rational activation y = P(x) / (1 + |S(x)|) and its backward (math:
// include/effnlp/rational.h).
//
// x is viewed as segments of C/G contiguous channels that share one group's coefficients
// (segment s has group s % G). Both kernels make one pass over the data: the forward reads x
// and writes y; the backward reads x and dL/dy and writes dL/dx while it sums the coefficient
// gradients. P, P', S and S' come from Horner in at::vec::Vectorized registers, |S| via its
// sign. Segments shorter than one vector use the scalar code of rational.h (the same code the
// CUDA kernels run).
//
// The coefficient gradients are sums over every element of a group. For a result that is
// numerically stable and bitwise independent of the thread count, the segments are cut into
// chunks whose size depends on the shape only; each chunk sums its elements in vector
// registers (float partials of at most kFlush elements, then double) into its own row of a
// double buffer, and the rows are added in chunk order at the end.
//
// float16/bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>

#include "effnlp/rational.h"

namespace effnlp {
namespace {

// Elements per chunk of the backward's reduction (at least; also >= 16 per coefficient
// partial, so that the partial buffer stays small next to the data when G is large).
constexpr int64_t kChunkElems = 1 << 15;
// Elements summed in the vector lanes (float for float inputs) before a flush into doubles:
// each lane adds at most kFlush / Vec::size() terms in the input precision.
constexpr int64_t kFlush = 256;
// Elements per task of the forward (no reduction: any split gives the same result).
constexpr int64_t kForwardGrain = 1 << 14;

bool needs_upcast(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

template <typename T>
using Vec = at::vec::Vectorized<T>;

// One group's coefficients broadcast into vectors.
template <typename T>
struct VecCoeffs {
  std::array<Vec<T>, kRationalMaxCoeffs> a, b;
  int64_t num = 0, den = 0;

  void load(const T* pa, int64_t na, const T* pb, int64_t nb) {
    num = na;
    den = nb;
    for (int64_t k = 0; k < na; ++k) a[k] = Vec<T>(pa[k]);
    for (int64_t k = 0; k < nb; ++k) b[k] = Vec<T>(pb[k]);
  }
};

// y[0..n) for one segment with the coefficients c (vectorised; the last partial vector through
// masked loads and stores).
template <typename T, int NUM, int DEN>
void forward_segment(const T* x, T* y, int64_t n, const VecCoeffs<T>& c) {
  const int64_t num = NUM >= 0 ? NUM : c.num, den = DEN >= 0 ? DEN : c.den;
  const Vec<T> one(T(1));
  for (int64_t i = 0; i < n; i += Vec<T>::size()) {
    const int64_t cnt = std::min<int64_t>(Vec<T>::size(), n - i);
    const Vec<T> xv = cnt == Vec<T>::size() ? Vec<T>::loadu(x + i) : Vec<T>::loadu(x + i, cnt);
    Vec<T> p = c.a[num - 1];
    for (int64_t k = num - 2; k >= 0; --k) p = at::vec::fmadd(p, xv, c.a[k]);
    Vec<T> r = den > 0 ? c.b[den - 1] : Vec<T>(T(0));
    for (int64_t k = den - 2; k >= 0; --k) r = at::vec::fmadd(r, xv, c.b[k]);
    const Vec<T> yv = p / (one + (xv * r).abs());
    if (cnt == Vec<T>::size()) {
      yv.store(y + i);
    } else {
      yv.store(y + i, cnt);
    }
  }
}

template <typename T, int NUM, int DEN>
void rational_forward_kernel(const T* x, T* y, const T* a, const T* b, const RationalShape& s,
                             int64_t segments) {
  const int64_t L = s.group_size;
  const int64_t grain = std::max<int64_t>(1, kForwardGrain / std::max<int64_t>(L, 1));
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    if (L < Vec<T>::size()) {
      for (int64_t seg = begin; seg < end; ++seg) {
        const int64_t g = seg % s.groups;
        const T* pa = a + g * s.num;
        const T* pb = b + g * s.den;
        for (int64_t i = seg * L; i < (seg + 1) * L; ++i) {
          y[i] = rational_forward_one<T, T>(x[i], pa, s.num, pb, s.den);
        }
      }
      return;
    }
    VecCoeffs<T> c;
    int64_t loaded = -1;
    for (int64_t seg = begin; seg < end; ++seg) {
      const int64_t g = seg % s.groups;
      if (g != loaded) {
        c.load(a + g * s.num, s.num, b + g * s.den, s.den);
        loaded = g;
      }
      forward_segment<T, NUM, DEN>(x + seg * L, y + seg * L, L, c);
    }
  });
}

// The backward over elements [0, n) of one segment: writes dx (when given) and adds the
// segment's coefficient gradients into acc[0..num) (numerator) and acc[num..num+den)
// (denominator) when acc is given.
template <typename T, int NUM, int DEN>
void backward_segment(const T* x, const T* gy, T* dx, int64_t n, const VecCoeffs<T>& c, double* acc) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t num = NUM >= 0 ? NUM : c.num, den = DEN >= 0 ? DEN : c.den, K = num + den;
  const int64_t top = std::max(num - 1, den);  // highest power of x a gradient needs
  const Vec<T> one(T(1)), zero(T(0));
  // Two passes per block of kFlush elements, both in L1: the first writes dx and keeps u and v
  // (a Horner pass needs the coefficients in registers); the second sums u x^k and v x^(k+1),
  // whose partial sums then fit in registers too. With the degrees as compile-time constants
  // (NUM >= 0) the partial sums are sized exactly and live in registers.
  constexpr int64_t kParts = NUM >= 0 ? std::max(NUM + DEN, 1) : 2 * kRationalMaxCoeffs;
  alignas(64) T ubuf[kFlush], vbuf[kFlush];
  for (int64_t b0 = 0; b0 < n; b0 += kFlush) {
    const int64_t b1 = std::min(n, b0 + kFlush);
    for (int64_t i = b0; i < b1; i += W) {
      const int64_t cnt = std::min<int64_t>(W, b1 - i);
      const bool full = cnt == W;
      // Masked loads zero the missing lanes: there dL/dy = 0, so u = v = 0 and they add nothing.
      const Vec<T> xv = full ? Vec<T>::loadu(x + i) : Vec<T>::loadu(x + i, cnt);
      const Vec<T> gv = full ? Vec<T>::loadu(gy + i) : Vec<T>::loadu(gy + i, cnt);
      Vec<T> p = c.a[num - 1], dp = zero;
      for (int64_t k = num - 2; k >= 0; --k) {
        dp = at::vec::fmadd(dp, xv, p);
        p = at::vec::fmadd(p, xv, c.a[k]);
      }
      Vec<T> r = den > 0 ? c.b[den - 1] : zero, dr = zero;
      for (int64_t k = den - 2; k >= 0; --k) {
        dr = at::vec::fmadd(dr, xv, r);
        r = at::vec::fmadd(r, xv, c.b[k]);
      }
      const Vec<T> s = xv * r;
      const Vec<T> ds = at::vec::fmadd(xv, dr, r);
      const Vec<T> neg_sign = ((s < zero) & one) - ((s > zero) & one);  // -sign(S)
      const Vec<T> rq = one / (one + s.abs());  // 1 / Q: one division instead of two
      const Vec<T> u = gv * rq;
      const Vec<T> v = u * (p * rq) * neg_sign;
      if (dx) {
        const Vec<T> d = at::vec::fmadd(u, dp, v * ds);
        if (full) {
          d.store(dx + i);
        } else {
          d.store(dx + i, cnt);
        }
      }
      if (acc) {
        u.store(ubuf + (i - b0));
        v.store(vbuf + (i - b0));
      }
    }
    if (!acc) continue;
    Vec<T> part[kParts];
    for (int64_t k = 0; k < K; ++k) part[k] = zero;
    for (int64_t i = b0; i < b1; i += W) {
      const int64_t cnt = std::min<int64_t>(W, b1 - i);
      const Vec<T> xv = cnt == W ? Vec<T>::loadu(x + i) : Vec<T>::loadu(x + i, cnt);
      const Vec<T> u = Vec<T>::loadu(ubuf + (i - b0)), v = Vec<T>::loadu(vbuf + (i - b0));
      part[0] = part[0] + u;
      Vec<T> xp = xv;
      for (int64_t k = 1; k <= top; ++k) {
        if (k < num) part[k] = at::vec::fmadd(u, xp, part[k]);
        if (k <= den) part[num + k - 1] = at::vec::fmadd(v, xp, part[num + k - 1]);
        xp = xp * xv;
      }
    }
    alignas(64) T lanes[W];
    for (int64_t k = 0; k < K; ++k) {
      part[k].store(lanes);
      double sum = 0.0;
      for (int64_t l = 0; l < W; ++l) sum += static_cast<double>(lanes[l]);
      acc[k] += sum;
    }
  }
}

// The same for a segment shorter than one vector, one element at a time.
template <typename T>
void backward_segment_scalar(const T* x, const T* gy, T* dx, int64_t n, const T* a, int64_t num,
                             const T* b, int64_t den, double* acc) {
  const int64_t top = std::max(num - 1, den);
  for (int64_t i = 0; i < n; ++i) {
    T u, v;
    const T d = rational_backward_one<T, T>(x[i], gy[i], a, num, b, den, u, v);
    if (dx) dx[i] = d;
    if (acc) {
      acc[0] += static_cast<double>(u);
      T xp = x[i];
      for (int64_t k = 1; k <= top; ++k) {
        if (k < num) acc[k] += static_cast<double>(u * xp);
        if (k <= den) acc[num + k - 1] += static_cast<double>(v * xp);
        xp = xp * x[i];
      }
    }
  }
}

// dx (when given) and, when partial is given, the coefficient gradients: partial is a zeroed
// double buffer [chunks, G, num+den] that receives each chunk's sums.
template <typename T, int NUM, int DEN>
void rational_backward_kernel(const T* x, const T* gy, T* dx, const T* a, const T* b,
                              const RationalShape& s, int64_t segments, int64_t seg_per_chunk,
                              double* partial) {
  const int64_t L = s.group_size, K = s.num + s.den;
  const int64_t chunks = (segments + seg_per_chunk - 1) / seg_per_chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    VecCoeffs<T> c;
    int64_t loaded = -1;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      double* acc_chunk = partial ? partial + chunk * s.groups * K : nullptr;
      const int64_t seg_end = std::min(segments, (chunk + 1) * seg_per_chunk);
      for (int64_t seg = chunk * seg_per_chunk; seg < seg_end; ++seg) {
        const int64_t g = seg % s.groups;
        double* acc = acc_chunk ? acc_chunk + g * K : nullptr;
        T* dseg = dx ? dx + seg * L : nullptr;
        if (L < Vec<T>::size()) {
          backward_segment_scalar<T>(x + seg * L, gy + seg * L, dseg, L, a + g * s.num, s.num,
                                     b + g * s.den, s.den, acc);
          continue;
        }
        if (g != loaded) {
          c.load(a + g * s.num, s.num, b + g * s.den, s.den);
          loaded = g;
        }
        backward_segment<T, NUM, DEN>(x + seg * L, gy + seg * L, dseg, L, c, acc);
      }
    }
  });
}

// Calls f with the degrees as compile-time constants (NUM, DEN) for the default degrees 5/4,
// which lets the compiler unroll Horner and keep the gradient accumulators in registers; -1
// (read at run time) otherwise.
template <typename F>
void with_degrees(int64_t num, int64_t den, F&& f) {
  if (num == 6 && den == 4) {
    f(std::integral_constant<int, 6>(), std::integral_constant<int, 4>());
  } else {
    f(std::integral_constant<int, -1>(), std::integral_constant<int, -1>());
  }
}

at::Tensor rational_cpu(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  const RationalShape s = check_rational(kRational, x, numerator, denominator);
  if (needs_upcast(x.scalar_type())) {
    return rational_cpu(x.to(at::kFloat), numerator.to(at::kFloat), denominator.to(at::kFloat))
        .to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor ac = numerator.contiguous(), bc = denominator.contiguous();
  const int64_t segments = x.numel() / s.group_size;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rational_cpu", [&] {
    with_degrees(s.num, s.den, [&](auto num, auto den) {
      rational_forward_kernel<scalar_t, decltype(num)::value, decltype(den)::value>(
          xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
          bc.data_ptr<scalar_t>(), s, segments);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& numerator,
    const at::Tensor& denominator, std::array<bool, 3> mask) {
  const char* op = kRationalBackward;
  const RationalShape s = check_rational_backward(op, grad_y, x, numerator, denominator);
  if (needs_upcast(x.scalar_type())) {
    auto up = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto g = rational_backward_cpu(up(grad_y), up(x), up(numerator), up(denominator), mask);
    auto down = [&](const at::Tensor& t) { return t.to(x.scalar_type()); };
    return {down(std::get<0>(g)), down(std::get<1>(g)), down(std::get<2>(g))};
  }
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = mask[0] ? at::empty(x.sizes(), x.options()) : empty();
  const bool coef = mask[1] || mask[2];
  const int64_t K = s.num + s.den;
  at::Tensor sums = coef ? at::zeros({s.groups, K}, x.options().dtype(at::kDouble)) : at::Tensor();
  if (x.numel() > 0 && (mask[0] || coef)) {
    const at::Tensor xc = x.contiguous(), gc = grad_y.contiguous();
    const at::Tensor ac = numerator.contiguous(), bc = denominator.contiguous();
    const int64_t segments = x.numel() / s.group_size;
    // Chunks of whole segments, sized from the shape alone (never from the thread count).
    const int64_t chunk_elems = std::max(kChunkElems, 16 * s.groups * K);
    const int64_t seg_per_chunk = std::max<int64_t>(1, (chunk_elems + s.group_size - 1) / s.group_size);
    const int64_t chunks = (segments + seg_per_chunk - 1) / seg_per_chunk;
    at::Tensor partial = coef ? at::zeros({chunks, s.groups, K}, sums.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rational_backward_cpu", [&] {
      with_degrees(s.num, s.den, [&](auto num, auto den) {
        rational_backward_kernel<scalar_t, decltype(num)::value, decltype(den)::value>(
            xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
            mask[0] ? gx.data_ptr<scalar_t>() : nullptr, ac.data_ptr<scalar_t>(),
            bc.data_ptr<scalar_t>(), s, segments, seg_per_chunk,
            coef ? partial.data_ptr<double>() : nullptr);
      });
    });
    if (coef) {
      // Chunk rows added in chunk order: a fixed sequence of double additions.
      const double* p = partial.data_ptr<double>();
      double* out = sums.data_ptr<double>();
      const int64_t row = s.groups * K;
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t j = 0; j < row; ++j) out[j] += p[c * row + j];
      }
    }
  }
  // Fresh tensors of the coefficients' shapes (never views of one another or of sums).
  auto take = [&](const at::Tensor& like, int64_t from, int64_t count) {
    at::Tensor t = at::empty(like.sizes(), like.options());
    if (t.numel() > 0) t.view({s.groups, count}).copy_(sums.narrow(1, from, count));
    return t;
  };
  at::Tensor ga = mask[1] ? take(numerator, 0, s.num) : empty();
  at::Tensor gb = mask[2] ? take(denominator, s.num, s.den) : empty();
  return {gx, ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CPU, m) {
  m.impl("rational", &rational_cpu);
  m.impl("_rational_backward", &rational_backward_cpu);
}

}  // namespace effnlp
