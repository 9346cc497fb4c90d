// A minimal float vector type for the kernels, one definition per instruction set.
// The kernels are written once against `VF`; softmax_kernels.cpp is compiled once per ISA.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(RLGEN_ISA_avx512) || defined(RLGEN_ISA_avx2)
#include <immintrin.h>
#endif

namespace rlgen {

using bf16_t = uint16_t;

inline float bf16_to_float(bf16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bf16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bf16_t((bits >> 16) | 0x40);  // keep NaN a NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bf16_t(bits >> 16);
}

// 2^d for d <= 0, computed in base 2 because the range reduction is then a plain rounding.
// Callers clamp d to >= kExp2Floor first; 2^kExp2Floor (about 1e-38) stands for zero, and the
// gradient kernel masks it to an exact 0 (-inf logits, a masked vocabulary, get no gradient).
constexpr float kExp2Floor = -126.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;
// 2^f on [-0.5, 0.5]: Taylor coefficients ln2^k / k!, relative error below 1e-8.
#define RLGEN_EXP2_POLY(FMA, SET1, f, p)      \
  p = SET1(1.5403530393381608e-4f);           \
  p = FMA(p, f, SET1(1.3333558146428443e-3f)); \
  p = FMA(p, f, SET1(9.6181291076284772e-3f)); \
  p = FMA(p, f, SET1(5.5504108664821580e-2f)); \
  p = FMA(p, f, SET1(2.4022650695910071e-1f)); \
  p = FMA(p, f, SET1(6.9314718055994531e-1f)); \
  p = FMA(p, f, SET1(1.0f));


#if defined(RLGEN_ISA_avx512)

struct VF {
  static constexpr int W = 16;
  __m512 v;
  VF() = default;
  VF(__m512 x) : v(x) {}
  static VF set1(float x) { return _mm512_set1_ps(x); }
  static VF load(const float* p) { return _mm512_loadu_ps(p); }
  static VF load(const bf16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16_t* p) const {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
  }
  friend VF operator+(VF a, VF b) { return _mm512_add_ps(a.v, b.v); }
  friend VF operator-(VF a, VF b) { return _mm512_sub_ps(a.v, b.v); }
  friend VF operator*(VF a, VF b) { return _mm512_mul_ps(a.v, b.v); }
  static VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }  // a*b + c
  static VF fmsub(VF a, VF b, VF c) { return _mm512_fmsub_ps(a.v, b.v, c.v); }  // a*b - c
  static VF max(VF a, VF b) { return _mm512_max_ps(a.v, b.v); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  static VF exp2_nonpos(VF d) {  // d already >= kExp2Floor
    __m512 n = _mm512_roundscale_ps(d.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(d.v, n), p;
    RLGEN_EXP2_POLY(_mm512_fmadd_ps, _mm512_set1_ps, f, p)
    return _mm512_scalef_ps(p, n);
  }
  static VF zero_where_le(VF x, VF d, VF bound) {  // x, or 0 where d <= bound (NaN d keeps x)
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d.v, bound.v, _CMP_NLE_UQ), x.v);
  }
};

#elif defined(RLGEN_ISA_avx2)

struct VF {
  static constexpr int W = 8;
  __m256 v;
  VF() = default;
  VF(__m256 x) : v(x) {}
  static VF set1(float x) { return _mm256_set1_ps(x); }
  static VF load(const float* p) { return _mm256_loadu_ps(p); }
  static VF load(const bf16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16_t* p) const {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);  // lanes 0 and 2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  friend VF operator+(VF a, VF b) { return _mm256_add_ps(a.v, b.v); }
  friend VF operator-(VF a, VF b) { return _mm256_sub_ps(a.v, b.v); }
  friend VF operator*(VF a, VF b) { return _mm256_mul_ps(a.v, b.v); }
  static VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static VF fmsub(VF a, VF b, VF c) { return _mm256_fmsub_ps(a.v, b.v, c.v); }
  static VF max(VF a, VF b) { return _mm256_max_ps(a.v, b.v); }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static VF exp2_nonpos(VF d) {  // d already >= kExp2Floor
    __m256 n = _mm256_round_ps(d.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(d.v, n), p;
    RLGEN_EXP2_POLY(_mm256_fmadd_ps, _mm256_set1_ps, f, p)
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static VF zero_where_le(VF x, VF d, VF bound) {
    return _mm256_and_ps(_mm256_cmp_ps(d.v, bound.v, _CMP_NLE_UQ), x.v);
  }
};

#else  // portable baseline: one lane, libm's exp

struct VF {
  static constexpr int W = 1;
  float v;
  VF() = default;
  VF(float x) : v(x) {}
  static VF set1(float x) { return x; }
  static VF load(const float* p) { return *p; }
  static VF load(const bf16_t* p) { return bf16_to_float(*p); }
  void store(float* p) const { *p = v; }
  void store(bf16_t* p) const { *p = float_to_bf16(v); }
  friend VF operator+(VF a, VF b) { return a.v + b.v; }
  friend VF operator-(VF a, VF b) { return a.v - b.v; }
  friend VF operator*(VF a, VF b) { return a.v * b.v; }
  static VF fmadd(VF a, VF b, VF c) { return a.v * b.v + c.v; }
  static VF fmsub(VF a, VF b, VF c) { return a.v * b.v - c.v; }
  static VF max(VF a, VF b) { return a.v > b.v ? a.v : b.v; }
  float reduce_add() const { return v; }
  float reduce_max() const { return v; }
  static VF exp2_nonpos(VF d) { return std::exp2(d.v); }
  static VF zero_where_le(VF x, VF d, VF bound) { return !(d.v <= bound.v) ? x.v : 0.0f; }
};

#endif

}  // namespace rlgen
