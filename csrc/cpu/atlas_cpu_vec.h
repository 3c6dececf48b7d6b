// Vector primitives shared by the CPU kernels (atlas_cpu.cpp, atlas_fused_linear.cpp): decoders of
// every storage dtype (one element, or eight into an AVX2 register), the multiply-add and dot loops
// the decode is fused into, compute-dtype loads/stores, and the storage-dtype dispatch. Without AVX2
// (another architecture, or ATLAS_KERNELS_EXT_NO_AVX2=1 at build time) the scalar decoders run.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include "../atlas_checks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ATLAS_AVX2 1
#else
#define ATLAS_AVX2 0
#endif

namespace atlas_ext {
namespace cpu {

constexpr int64_t kChunk = 2048;  // elements per tile of a single-block op (fixed: determinism)

struct Fp8Lut {
  alignas(64) float v[256];
  Fp8Lut() {
    for (int b = 0; b < 256; ++b) v[b] = static_cast<float>(c10::Float8_e4m3fn(uint8_t(b), c10::Float8_e4m3fn::from_bits()));
  }
};
inline const float* fp8_lut() {
  static const Fp8Lut lut;
  return lut.v;
}

// Decoders: one element, or eight into an AVX2 register.
template <typename T> struct Dec;
template <> struct Dec<float> {
  static float one(const float* p) { return *p; }
#if ATLAS_AVX2
  static __m256 eight(const float* p) { return _mm256_loadu_ps(p); }
#endif
};
template <> struct Dec<c10::BFloat16> {
  static float one(const c10::BFloat16* p) { return static_cast<float>(*p); }
#if ATLAS_AVX2
  static __m256 eight(const c10::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
};
template <> struct Dec<c10::Half> {
  static float one(const c10::Half* p) { return static_cast<float>(*p); }
#if ATLAS_AVX2
  static __m256 eight(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
};
template <> struct Dec<int8_t> {
  static float one(const int8_t* p) { return static_cast<float>(*p); }
#if ATLAS_AVX2
  static __m256 eight(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
};
template <> struct Dec<c10::Float8_e4m3fn> {
  static float one(const c10::Float8_e4m3fn* p) { return fp8_lut()[p->x]; }
#if ATLAS_AVX2
  static __m256 eight(const c10::Float8_e4m3fn* p) {  // a gather from the 1 KiB table (in L1)
    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_i32gather_ps(fp8_lut(), idx, 4);
  }
#endif
};

// acc[j] += c * t[j]
template <typename T>
inline void axpy(float* acc, const T* t, int64_t n, float c) {
  int64_t j = 0;
#if ATLAS_AVX2
  const __m256 vc = _mm256_set1_ps(c);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(vc, Dec<T>::eight(t + j), _mm256_loadu_ps(acc + j)));
#endif
  for (; j < n; ++j) acc[j] = std::fma(c, Dec<T>::one(t + j), acc[j]);
}

// acc[j] += crow[part[j]] * s * t[j]   (hash partitions: the coefficient varies per element)
template <typename T>
inline void axpy_gather(float* acc, const T* t, int64_t n, const float* crow, const int32_t* part, float s) {
  int64_t j = 0;
#if ATLAS_AVX2
  const __m256 vs = _mm256_set1_ps(s);
  for (; j + 8 <= n; j += 8) {
    __m256 c = _mm256_mul_ps(_mm256_i32gather_ps(crow, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(part + j)), 4), vs);
    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(c, Dec<T>::eight(t + j), _mm256_loadu_ps(acc + j)));
  }
#endif
  for (; j < n; ++j) acc[j] = std::fma(crow[part[j]] * s, Dec<T>::one(t + j), acc[j]);
}

// sum_j g[j] * t[j], in a fixed order.
template <typename T>
inline float dot(const float* g, const T* t, int64_t n) {
  int64_t j = 0;
  float total = 0.f;
#if ATLAS_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j), Dec<T>::eight(t + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j + 8), Dec<T>::eight(t + j + 8), a1);
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j), Dec<T>::eight(t + j), a0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (int q = 0; q < 8; ++q) total += lanes[q];
#endif
  for (; j < n; ++j) total = std::fma(g[j], Dec<T>::one(t + j), total);
  return total;
}

// out[part[j]] += s * g[j] * t[j]  (hash partitions; products vectorised, sums in element order)
template <typename T>
inline void dot_scatter(const float* g, const T* t, int64_t n, const int32_t* part, float s, float* out) {
  int64_t j = 0;
#if ATLAS_AVX2
  alignas(32) float prod[8];
  const __m256 vs = _mm256_set1_ps(s);
  for (; j + 8 <= n; j += 8) {
    _mm256_store_ps(prod, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(g + j), Dec<T>::eight(t + j)), vs));
    for (int q = 0; q < 8; ++q) out[part[j + q]] += prod[q];
  }
#endif
  for (; j < n; ++j) out[part[j]] += g[j] * Dec<T>::one(t + j) * s;
}

// acc[j] += c * t[j] and returns sum_j g[j] * t[j] (fixed order): each element of t decoded once,
// serving both the recomposition of a weight tile and the coefficient-gradient dot.
template <typename T>
inline float axpy_dot(float* acc, const float* g, const T* t, int64_t n, float c) {
  int64_t j = 0;
  float total = 0.f;
#if ATLAS_AVX2
  const __m256 vc = _mm256_set1_ps(c);
  __m256 a0 = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = Dec<T>::eight(t + j);
    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(vc, v, _mm256_loadu_ps(acc + j)));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(g + j), v, a0);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a0);
  for (int q = 0; q < 8; ++q) total += lanes[q];
#endif
  for (; j < n; ++j) {
    const float v = Dec<T>::one(t + j);
    acc[j] = std::fma(c, v, acc[j]);
    total = std::fma(g[j], v, total);
  }
  return total;
}

// --- Several slabs at once -------------------------------------------------------------------
// The loops below take a group of G <= kGroup slabs side by side (slab g at t + g * stride) and keep
// the weight accumulator (and the dot accumulators) in registers across them: one load and one
// store of acc per vector and group, instead of one per slab. Per slab and element they do the same
// arithmetic in the same order as the one-slab loops above (axpy over g = 0, 1, ...; dot with its
// two accumulators; axpy_dot with its one), so their results are bitwise the same.
constexpr int kGroup = 4;

// acc[j] = fma(c[G-1], t_{G-1}[j], ... fma(c[0], t_0[j], acc[j]))
template <typename T, int G>
inline void axpy_group(float* acc, const T* t, int64_t stride, const float* c, int64_t n) {
  int64_t j = 0;
#if ATLAS_AVX2
  __m256 vc[G];
  for (int g = 0; g < G; ++g) vc[g] = _mm256_set1_ps(c[g]);
  for (; j + 16 <= n; j += 16) {
    __m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
    for (int g = 0; g < G; ++g) {
      a0 = _mm256_fmadd_ps(vc[g], Dec<T>::eight(t + g * stride + j), a0);
      a1 = _mm256_fmadd_ps(vc[g], Dec<T>::eight(t + g * stride + j + 8), a1);
    }
    _mm256_storeu_ps(acc + j, a0);
    _mm256_storeu_ps(acc + j + 8, a1);
  }
  for (; j + 8 <= n; j += 8) {
    __m256 a0 = _mm256_loadu_ps(acc + j);
    for (int g = 0; g < G; ++g) a0 = _mm256_fmadd_ps(vc[g], Dec<T>::eight(t + g * stride + j), a0);
    _mm256_storeu_ps(acc + j, a0);
  }
#endif
  for (; j < n; ++j) {
    float a = acc[j];
    for (int g = 0; g < G; ++g) a = std::fma(c[g], Dec<T>::one(t + g * stride + j), a);
    acc[j] = a;
  }
}

// out[g] = dot<T>(x, t_g, n) for the G slabs (the same two accumulators and order as dot)
template <typename T, int G>
inline void dot_group(const float* x, const T* t, int64_t stride, int64_t n, float* out) {
  int64_t j = 0;
  for (int g = 0; g < G; ++g) out[g] = 0.f;
#if ATLAS_AVX2
  __m256 a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
    for (int g = 0; g < G; ++g) {
      a0[g] = _mm256_fmadd_ps(x0, Dec<T>::eight(t + g * stride + j), a0[g]);
      a1[g] = _mm256_fmadd_ps(x1, Dec<T>::eight(t + g * stride + j + 8), a1[g]);
    }
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + j);
    for (int g = 0; g < G; ++g) a0[g] = _mm256_fmadd_ps(x0, Dec<T>::eight(t + g * stride + j), a0[g]);
  }
  for (int g = 0; g < G; ++g) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(a0[g], a1[g]));
    for (int q = 0; q < 8; ++q) out[g] += lanes[q];
  }
#endif
  for (; j < n; ++j)
    for (int g = 0; g < G; ++g) out[g] = std::fma(x[j], Dec<T>::one(t + g * stride + j), out[g]);
}

// acc += sum_g c[g] t_g (as axpy_group) and out[g] = sum_j x[j] t_g[j] (as axpy_dot), each element
// of each slab decoded once.
template <typename T, int G>
inline void axpy_dot_group(float* acc, const float* x, const T* t, int64_t stride, const float* c, int64_t n,
                           float* out) {
  int64_t j = 0;
  for (int g = 0; g < G; ++g) out[g] = 0.f;
#if ATLAS_AVX2
  __m256 vc[G], a0[G];
  for (int g = 0; g < G; ++g) {
    vc[g] = _mm256_set1_ps(c[g]);
    a0[g] = _mm256_setzero_ps();
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + j);
    __m256 w = _mm256_loadu_ps(acc + j);
    for (int g = 0; g < G; ++g) {
      const __m256 v = Dec<T>::eight(t + g * stride + j);
      w = _mm256_fmadd_ps(vc[g], v, w);
      a0[g] = _mm256_fmadd_ps(x0, v, a0[g]);
    }
    _mm256_storeu_ps(acc + j, w);
  }
  for (int g = 0; g < G; ++g) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, a0[g]);
    for (int q = 0; q < 8; ++q) out[g] += lanes[q];
  }
#endif
  for (; j < n; ++j) {
    float w = acc[j];
    for (int g = 0; g < G; ++g) {
      const float v = Dec<T>::one(t + g * stride + j);
      w = std::fma(c[g], v, w);
      out[g] = std::fma(x[j], v, out[g]);
    }
    acc[j] = w;
  }
}

// f(std::integral_constant<int, G>{}) for the run-time group size g (1 <= g <= kGroup): the one
// switch from a run-time group size to the compile-time G of the group loops.
template <typename F>
inline void with_group(int g, F&& f) {
  switch (g) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// The group loops for a run-time group size 1 <= g <= kGroup.
template <typename T>
inline void axpy_slabs(int g, float* acc, const T* t, int64_t stride, const float* c, int64_t n) {
  with_group(g, [&](auto G) { axpy_group<T, decltype(G)::value>(acc, t, stride, c, n); });
}
template <typename T>
inline void dot_slabs(int g, const float* x, const T* t, int64_t stride, int64_t n, float* out) {
  with_group(g, [&](auto G) { dot_group<T, decltype(G)::value>(x, t, stride, n, out); });
}
template <typename T>
inline void axpy_dot_slabs(int g, float* acc, const float* x, const T* t, int64_t stride, const float* c, int64_t n,
                           float* out) {
  with_group(g, [&](auto G) { axpy_dot_group<T, decltype(G)::value>(acc, x, t, stride, c, n, out); });
}

// Calls f(r, e, p, row) for the runs [r, e) of [a, b) (block-local elements of segment s) that share
// one part p and, with by_row (scaled storage: one scale per slab and row), one row of s.row_len
// elements (row is 0 without by_row). Contiguous and single-part layouts; hash layouts vary the
// part per element.
template <typename F>
inline void for_each_run(const Seg& s, bool by_row, int64_t a, int64_t b, F&& f) {
  for (int64_t r = a; r < b;) {
    int64_t e = std::min(b, part_end(r, s));
    int64_t row = 0;
    if (by_row) {
      row = r / s.row_len;
      e = std::min(e, (row + 1) * s.row_len);
    }
    f(r, e, part_of(r, s), row);
    r = e;
  }
}

// out[c] = float(sum over blocks b = 0, 1, ... of partial[b * nk + c]), summed in float64 in block
// order: the fixed-order final sum of every CPU coefficient-gradient reduction over one block.
template <typename P>
inline void sum_in_order(const P* partial, int64_t nblocks, int64_t nk, float* out) {
  for (int64_t c = 0; c < nk; ++c) {
    double acc = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) acc += partial[b * nk + c];
    out[c] = static_cast<float>(acc);
  }
}

// dst[j] = float(cast<dt>(src[j])) in place: a weight tile rounded to the compute dtype.
inline void round_to(float* v, int64_t n, at::ScalarType dt) {
  if (dt == at::kBFloat16) {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<float>(c10::BFloat16(v[j]));
  } else if (dt == at::kHalf) {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<float>(c10::Half(v[j]));
  }
}

// dst[j] = float(src[a + j]) for a compute-dtype tensor
inline void load_f32(const void* src, at::ScalarType st, int64_t a, int64_t n, float* dst) {
  if (st == at::kFloat) {
    std::memcpy(dst, static_cast<const float*>(src) + a, n * sizeof(float));
  } else if (st == at::kBFloat16) {
    const auto* p = static_cast<const c10::BFloat16*>(src) + a;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]);
  } else {
    const auto* p = static_cast<const c10::Half*>(src) + a;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]);
  }
}

// dst[a + j] = cast(src[j]), round to nearest even
inline void store_f32(const float* src, int64_t n, void* dst, at::ScalarType dt, int64_t a) {
  if (dt == at::kFloat) {
    std::memcpy(static_cast<float*>(dst) + a, src, n * sizeof(float));
  } else if (dt == at::kBFloat16) {
    auto* p = static_cast<c10::BFloat16*>(dst) + a;
    for (int64_t j = 0; j < n; ++j) p[j] = c10::BFloat16(src[j]);
  } else {
    auto* p = static_cast<c10::Half*>(dst) + a;
    for (int64_t j = 0; j < n; ++j) p[j] = c10::Half(src[j]);
  }
}

}  // namespace cpu
}  // namespace atlas_ext
