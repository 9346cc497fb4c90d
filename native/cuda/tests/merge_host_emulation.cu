// Host-side check of the CUDA merge kernel's per-entry math (merge_kernels.cu compiled as host code, no
// GPU needed): merge_value() over models of every input dtype, every rule kind, with and without sign
// consensus, against a direct reference whose cut points come from a stable sort; plus the software
// fp16 / bf16 conversions against CUDA's own. Built and run by tests/test_merge_kernels.py where nvcc is.
#include "../merge_kernels.cu"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

using namespace rlgen::merge;

static int failures = 0;
static void expect(bool ok, const char* what, double got, double want, long at) {
  if (!ok && failures++ < 20) printf("FAIL %s at %ld: got %.9g want %.9g\n", what, at, got, want);
}

static uint16_t bits16(__half h) { uint16_t u; std::memcpy(&u, &h, 2); return u; }
static uint16_t bits16(__nv_bfloat16 h) { uint16_t u; std::memcpy(&u, &h, 2); return u; }

static void check_conversions(std::mt19937& rng) {
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = i < 1000000 ? any(rng) : (0x33000000u + uint32_t(i) * 1013u);  // then the fp16 range
    const float f = bits_float(u);
    if (f != f) continue;  // NaN payloads differ by design
    expect(float_to_f16(f) == bits16(__float2half_rn(f)), "float_to_f16", f, __half2float(__float2half_rn(f)), i);
    expect(float_to_bf16(f) == bits16(__float2bfloat16_rn(f)), "float_to_bf16", f, 0, i);
  }
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    __half x;
    const uint16_t hb = uint16_t(h);
    std::memcpy(&x, &hb, 2);
    const float want = __half2float(x), got = f16_to_float(hb);
    expect(float_bits(got) == float_bits(want) || (got != got && want != want), "f16_to_float", got, want, long(h));
    if ((h & 0x7FFFu) < 0x7BFFu) {  // the midpoint to the next half: ties to even
      const float mid = 0.5f * (want + __half2float(__ushort_as_half(uint16_t(h + 1))));
      expect(float_to_f16(mid) == bits16(__float2half_rn(mid)), "float_to_f16 tie", mid, 0, long(h));
      const float bmid = bits_float((uint32_t(h) << 16) | 0x8000u);  // a bf16 tie
      expect(float_to_bf16(bmid) == bits16(__float2bfloat16_rn(bmid)), "float_to_bf16 tie", bmid, 0, long(h));
    }
  }
}

// Cut point by the definition: sort (key, index) ascending and take the entry at `rank`.
static Cut below_cut_by_sort(const std::vector<uint32_t>& keys, int64_t rank) {
  std::vector<int64_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  const int64_t at = order[size_t(rank)];
  return Cut{keys[at], at};  // entries (v, j < at) are exactly the equal ones ranked before
}

static Cut top_cut_by_sort(const std::vector<uint32_t>& keys, int64_t k) {
  std::vector<int64_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });
  const int64_t last = order[size_t(k - 1)];
  return Cut{keys[last], last + 1};
}

static void check_merge(std::mt19937& rng, int64_t n, int models, bool consensus, bool normalize, int kind) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> base(n);
  for (auto& v : base) v = bf16_to_float(float_to_bf16(nd(rng)));
  std::vector<std::vector<uint16_t>> half_data(models);
  std::vector<std::vector<float>> float_data(models);
  gpu::ApplyArgs a{};
  a.n = n;
  a.models = models;
  std::vector<uint16_t> base16(n);
  for (int64_t j = 0; j < n; ++j) base16[j] = float_to_bf16(base[j]);
  a.base = Input{base16.data(), ElemType::bf16};
  std::vector<std::vector<float>> delta(models, std::vector<float>(n));
  for (int i = 0; i < models; ++i) {
    const ElemType type = ElemType(i % 3);
    half_data[i].resize(n);
    float_data[i].resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const float v = base[j] + 0.02f * nd(rng);
      float_data[i][j] = v;
      half_data[i][j] = type == ElemType::bf16 ? float_to_bf16(v) : float_to_f16(v);
      const float x = type == ElemType::f32 ? v : type == ElemType::bf16 ? bf16_to_float(half_data[i][j])
                                                                         : f16_to_float(half_data[i][j]);
      delta[i][j] = x - base[j];
    }
    a.x[i] = Input{type == ElemType::f32 ? static_cast<const void*>(float_data[i].data()) : half_data[i].data(), type};
    std::vector<uint32_t> keys(n);
    for (int64_t j = 0; j < n; ++j) keys[j] = magnitude_key(delta[i][j]);
    Rule r{Keep(kind), 0x9E3779B9u * uint32_t(i + 1), uint64_t(1) << 31, Cut{0, 0}, Cut{0, 0}};
    if (r.keep == Keep::top) r.hi = top_cut_by_sort(keys, n / 3 + i);
    if (r.keep == Keep::band) {
      r.lo = below_cut_by_sort(keys, n / 4);
      r.hi = below_cut_by_sort(keys, n - n / 10 - i);
    }
    a.rules[i] = r;
    a.weight[i] = i == 1 ? -0.75f : 0.5f + 0.25f * float(i);
    a.divide_by[i] = r.keep == Keep::random ? 0.5f : 1.0f;
  }
  a.out_type = ElemType::f32;
  a.consensus = consensus;
  a.normalize = normalize;
  a.divisor = 1.25f;
  a.lam = 0.9f;
  for (int64_t j = 0; j < n; ++j) {
    // The reference: ranks from the sorts above, rules restated without the cut helpers.
    std::vector<float> tau(models);
    for (int i = 0; i < models; ++i) {
      const Rule& r = a.rules[i];
      const uint32_t k = magnitude_key(delta[i][j]);
      bool keep = true;
      if (r.keep == Keep::none) keep = false;
      if (r.keep == Keep::random) keep = mix32(mix32(uint32_t(j)) ^ r.key) < r.threshold;
      if (r.keep == Keep::top) keep = k > r.hi.v || (k == r.hi.v && j < r.hi.c);
      if (r.keep == Keep::band)
        keep = (k < r.hi.v || (k == r.hi.v && j < r.hi.c)) && !(k < r.lo.v || (k == r.lo.v && j < r.lo.c));
      tau[i] = keep ? a.weight[i] * (delta[i][j] / a.divide_by[i]) : 0.0f;
    }
    float merged = 0.0f, total = 0.0f, weights = 0.0f;
    for (float t : tau) total += t;
    for (int i = 0; i < models; ++i) {
      const bool agree = !consensus || (total >= 0.0f ? tau[i] > 0.0f : tau[i] < 0.0f);
      merged += agree ? tau[i] : 0.0f;
      weights += agree ? a.weight[i] : 0.0f;
    }
    if (normalize) merged /= consensus ? (weights == 0.0f ? 1.0f : weights) : a.divisor;
    const float want = base[j] + a.lam * merged, got = gpu::merge_value(a, j);
    expect(got == want, "merge_value", got, want, long(j));
  }
}

int main() {
  std::mt19937 rng(1234);
  check_conversions(rng);
  for (int kind = 0; kind <= int(Keep::band); ++kind)
    for (int models : {1, 3, 5})
      for (int consensus = 0; consensus < 2; ++consensus)
        check_merge(rng, 997, models, consensus, kind % 2 == 0, kind);
  printf("merge emulation done, failures %d\n", failures);
  return failures ? 1 : 0;
}
