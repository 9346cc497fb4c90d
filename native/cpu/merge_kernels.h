// Sparse task-vector merging of one tensor (ties, DARE, breadcrumbs, task arithmetic, linear): the
// semantics are rlgen/merging/kernels.py's, which computes the per-model rule counts (k, ranks,
// DARE thresholds) and calls these kernels.
//
// delta_i = x_i - base in float32. A model's rule says which entries of delta_i survive:
//   all / none
//   top     the k largest |delta_i|, the lower flat index first among equal magnitudes
//   random  DARE: entry j survives iff mix32(mix32(j) ^ key) < threshold
//   band    breadcrumbs: ascending stable magnitude ranks [lo, hi)
// tau_i = weight_i * survivor / divide_by_i; merged = sum_i tau_i (or, with consensus, only the tau_i
// of the elected sign, sign of sum_i tau_i with 0 counting as +); normalised by divisor (without
// consensus) or by the agreeing weights (with); out = base + lam * merged.
//
// Magnitudes are compared as the IEEE bits of |delta| (monotonic for non-negative floats, every NaN
// made the same largest key), so a "top" or "band" rule reduces to cut points (v, c): a value v and a
// flat index c that splits the entries equal to v. The helpers below are __host__ __device__ under
// nvcc: the CUDA kernel and its host emulation share them with the CPU kernel.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define RLGEN_MERGE_HD __host__ __device__ __forceinline__
#else
#define RLGEN_MERGE_HD inline
#endif

struct CUstream_st;

namespace rlgen {
namespace merge {

enum class ElemType : int32_t { f32 = 0, bf16 = 1, f16 = 2 };
enum class Keep : int32_t { all = 0, none = 1, top = 2, random = 3, band = 4 };  // kernels.py: _KIND_CODES

RLGEN_MERGE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

RLGEN_MERGE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

RLGEN_MERGE_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

RLGEN_MERGE_HD uint16_t float_to_bf16(float f) {  // round to nearest even, as torch
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

RLGEN_MERGE_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

RLGEN_MERGE_HD uint16_t float_to_f16(float f) {  // round to nearest even, overflow to inf, as torch
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  if (u >= 0x47800000u) return uint16_t(sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u));  // >= 2^16: inf / NaN
  if (u < 0x38800000u) {
    // Below 2^-14 the half is subnormal: adding 0.5 puts its 10 bits at the bottom of the float's
    // mantissa, rounded to nearest even by the float addition itself.
    return uint16_t(sign | (float_bits(bits_float(u) + 0.5f) - 0x3F000000u));
  }
  const uint32_t odd = (u >> 13) & 1u;  // ties to even: bias by 0xFFF plus the kept bit
  u += 0xC8000FFFu + odd;               // rebias the exponent (-112 << 23) and round
  return uint16_t(sign | (u >> 13));
}

RLGEN_MERGE_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// DARE: entry j survives iff its hash is below the threshold (threshold 2^32 would keep all; such
// rules are "all").
RLGEN_MERGE_HD bool dare_keeps(uint32_t key, uint64_t threshold, int64_t j) {
  return uint64_t(mix32(mix32(uint32_t(j)) ^ key)) < threshold;
}

// |d| as an ordered integer key.
RLGEN_MERGE_HD uint32_t magnitude_key(float d) {
  const uint32_t u = float_bits(d) & 0x7FFFFFFFu;
  return u > 0x7F800000u ? 0x7FC00000u : u;
}

struct Cut {
  uint32_t v;
  int64_t c;
};

// The k largest keys (lower index first among equals) are those "above" the cut of rank k.
RLGEN_MERGE_HD bool above(const Cut& cut, uint32_t key, int64_t j) { return key > cut.v || (key == cut.v && j < cut.c); }
// The entries of ascending stable rank < R are those "below" the cut of rank R.
RLGEN_MERGE_HD bool below(const Cut& cut, uint32_t key, int64_t j) { return key < cut.v || (key == cut.v && j < cut.c); }

// A model's rule with its cut points resolved: top keeps above(hi); band keeps below(hi) && !below(lo).
struct Rule {
  Keep keep;
  uint32_t key;
  uint64_t threshold;
  Cut hi, lo;
};

RLGEN_MERGE_HD bool keeps(const Rule& r, float delta, int64_t j) {
  switch (r.keep) {
    case Keep::all: return true;
    case Keep::none: return false;
    case Keep::random: return dare_keeps(r.key, r.threshold, j);
    case Keep::top: return above(r.hi, magnitude_key(delta), j);
    case Keep::band: {
      const uint32_t k = magnitude_key(delta);
      return below(r.hi, k, j) && !below(r.lo, k, j);
    }
  }
  return false;
}

// An input array (contiguous, n entries); data == nullptr reads as zeros (no base).
struct Input {
  const void* data = nullptr;
  ElemType type = ElemType::f32;
};

RLGEN_MERGE_HD float load(const Input& in, int64_t j) {
  if (!in.data) return 0.0f;
  switch (in.type) {
    case ElemType::f32: return static_cast<const float*>(in.data)[j];
    case ElemType::bf16: return bf16_to_float(static_cast<const uint16_t*>(in.data)[j]);
    case ElemType::f16: return f16_to_float(static_cast<const uint16_t*>(in.data)[j]);
  }
  return 0.0f;
}

RLGEN_MERGE_HD void store(void* out, ElemType type, int64_t j, float v) {
  switch (type) {
    case ElemType::f32: static_cast<float*>(out)[j] = v; break;
    case ElemType::bf16: static_cast<uint16_t*>(out)[j] = float_to_bf16(v); break;
    case ElemType::f16: static_cast<uint16_t*>(out)[j] = float_to_f16(v); break;
  }
}

// --- CPU kernels (merge_kernels.cpp) -------------------------------------------------------------

// One model as the CPU kernel takes it: the rule in counts, its cut points found by the kernel.
//   top: a = k (0 < k < n); random: a = threshold, key; band: [a, b) (0 <= a < b <= n, not all)
struct ModelSpec {
  Input x;
  Keep keep = Keep::all;
  int64_t a = 0, b = 0;
  uint32_t key = 0;
  float weight = 1.0f, divide_by = 1.0f;
};

struct SparseMergeArgs {
  int64_t n = 0;
  std::vector<ModelSpec> models;
  Input base;
  void* out = nullptr;
  ElemType out_type = ElemType::f32;
  bool consensus = false, normalize = false;
  float divisor = 1.0f;  // without consensus, when normalize
  float lam = 1.0f;
  int threads = 1;
};

void sparse_task_merge(const SparseMergeArgs& args);
// mask[j] = whether model `m` keeps entry j (tests).
void keep_mask(int64_t n, const ModelSpec& m, const Input& base, bool* mask, int threads);

// --- CUDA kernel (native/cuda/merge_kernels.cu) --------------------------------------------------

namespace gpu {

constexpr int kMaxModels = 16;  // kernels.py: MAX_CUDA_MODELS

// Passed by value to the kernel: rules already resolved (cut points found with torch).
struct ApplyArgs {
  int64_t n;
  int models;
  Input x[kMaxModels];
  Rule rules[kMaxModels];
  float weight[kMaxModels], divide_by[kMaxModels];
  Input base;
  void* out;
  ElemType out_type;
  bool consensus, normalize;
  float divisor, lam;
};

// Enqueues the element-wise merge on `stream` of `device`; throws std::runtime_error on launch errors.
void sparse_task_apply(const ApplyArgs& args, int device, CUstream_st* stream);

}  // namespace gpu

}  // namespace merge
}  // namespace rlgen
