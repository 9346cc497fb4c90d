// Softmax statistics and gradient over segments of logit rows: the CPU side of token_logprobs and
// linear_token_logprobs. Compiled once per instruction set (RLGEN_ISA = base | avx2 | avx512).
//
// Forward (softmax_stats): each row is read once from memory. It is walked in L1-sized blocks: a
// first sweep finds the block's max, the running state is rescaled if the max grew (online
// softmax), and a second sweep, now from L1, accumulates exp(z - m) and exp(z - m) * (z - m).
// NaN logits make their row's results NaN, as in torch: the clamps are written max(floor, d), and
// MAXPS returns its second operand when either is NaN.
// Backward (softmax_grad): one read and one write per element; log p is recomputed from the saved
// log-normaliser, so nothing of size [rows, V] is kept between forward and backward.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "simd.h"

#define RLGEN_CAT_(a, b) a##b
#define RLGEN_CAT(a, b) RLGEN_CAT_(a, b)

namespace rlgen {
namespace RLGEN_CAT(cpu_, RLGEN_ISA) {

namespace {

constexpr int64_t kBlock = 2048;  // elements per block: 8 KiB of fp32, stays in L1 between sweeps

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) { return bf16_to_float(v); }

// --- fp32 / bf16 input, fp32 accumulation, vectorised ----------------------------------------

template <typename T>
void stats_row(const T* x, int64_t len, int64_t target_col, float inv_t, float& m, float& s, float& t, float& tz) {
  constexpr int W = VF::W;
  const float c = inv_t * kLog2e;  // x -> z * log2(e): the sums are taken in base 2
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t n = std::min(kBlock, len - b0);
    const T* p = x + b0;
    VF vmax = VF::set1(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + W <= n; j += W) vmax = VF::max(vmax, VF::load(p + j));
    float bmax = vmax.reduce_max();
    for (; j < n; ++j) bmax = std::max(bmax, to_float(p[j]));
    const float bz = bmax * inv_t;
    if (bz == -std::numeric_limits<float>::infinity()) continue;  // block fully masked
    if (bz > m) {
      if (s > 0.0f) {
        const float a = std::exp(m - bz);
        t = a * (t + (m - bz) * s);
        s *= a;
      }
      m = bz;
    }
    const float m2 = m * kLog2e;
    const VF vm = VF::set1(m2), vc = VF::set1(c), vfloor = VF::set1(kExp2Floor);
    VF vs0 = VF::set1(0.0f), vt0 = VF::set1(0.0f), vs1 = VF::set1(0.0f), vt1 = VF::set1(0.0f);
    // While this block is summed from L1, the next one is requested from memory, so the memory
    // stream never idles (the hardware prefetcher alone stops at the sweep's pauses).
    const char* next = reinterpret_cast<const char*>(p + n);
    j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {  // two independent accumulators hide the add latency
      for (int64_t byte = 0; byte < int64_t(2 * W * sizeof(T)); byte += 64)
        __builtin_prefetch(next + j * int64_t(sizeof(T)) + byte);
      VF d0 = VF::max(vfloor, VF::fmsub(VF::load(p + j), vc, vm));
      VF d1 = VF::max(vfloor, VF::fmsub(VF::load(p + j + W), vc, vm));
      VF e0 = VF::exp2_nonpos(d0), e1 = VF::exp2_nonpos(d1);
      vs0 = vs0 + e0;
      vs1 = vs1 + e1;
      vt0 = VF::fmadd(e0, d0, vt0);
      vt1 = VF::fmadd(e1, d1, vt1);
    }
    for (; j + W <= n; j += W) {
      VF d0 = VF::max(vfloor, VF::fmsub(VF::load(p + j), vc, vm));
      VF e0 = VF::exp2_nonpos(d0);
      vs0 = vs0 + e0;
      vt0 = VF::fmadd(e0, d0, vt0);
    }
    float bs = (vs0 + vs1).reduce_add(), bt = (vt0 + vt1).reduce_add();
    for (; j < n; ++j) {
      const float d = std::max(to_float(p[j]) * c - m2, kExp2Floor);
      const float e = std::exp2(d);
      bs += e;
      bt += e * d;
    }
    s += bs;
    t += kLn2 * bt;  // back to natural-log units
  }
  if (target_col >= 0 && target_col < len) tz = to_float(x[target_col]) * inv_t;
}

template <typename T>
void grad_row(const T* x, T* out, int64_t len, int64_t target_col, float inv_t, float logz, float h, float c1, float c2,
              float g_target) {
  constexpr int W = VF::W;
  // The target's gradient is computed before the sweep: with in-place output its logit is overwritten.
  float target_grad = 0.0f;
  const bool has_target = target_col >= 0 && target_col < len;
  if (has_target) {
    const float lp = to_float(x[target_col]) * inv_t - logz;
    const float p = std::exp(lp);
    target_grad = (p > 0.0f ? p * (c1 + c2 * (lp + h)) : 0.0f) + g_target;
  }
  // In base 2: lp2 = log2 p, and c1 + c2 (lp + h) = (c1 + c2 h) + (c2 ln2) lp2.
  const float c = inv_t * kLog2e, logz2 = logz * kLog2e, a = c1 + c2 * h, b = c2 * kLn2;
  const VF vc = VF::set1(c), vlz = VF::set1(logz2), vfloor = VF::set1(kExp2Floor);
  const VF va = VF::set1(a), vb = VF::set1(b), vc1 = VF::set1(c1);
  int64_t j = 0;
  if (c2 == 0.0f) {  // no entropy gradient: grad = c1 * p
    for (; j + W <= len; j += W) {
      VF lp2 = VF::max(vfloor, VF::fmsub(VF::load(x + j), vc, vlz));
      VF::zero_where_le(vc1 * VF::exp2_nonpos(lp2), lp2, vfloor).store(out + j);
    }
  } else {
    for (; j + W <= len; j += W) {
      VF lp2 = VF::max(vfloor, VF::fmsub(VF::load(x + j), vc, vlz));
      VF::zero_where_le(VF::exp2_nonpos(lp2) * VF::fmadd(vb, lp2, va), lp2, vfloor).store(out + j);
    }
  }
  for (; j < len; ++j) {
    const float lp2 = to_float(x[j]) * c - logz2;
    const float g = !(lp2 <= kExp2Floor) ? std::exp2(lp2) * (a + b * lp2) : 0.0f;  // NaN stays NaN
    if constexpr (sizeof(T) == 4) out[j] = g;
    else out[j] = float_to_bf16(g);
  }
  if (has_target) {
    if constexpr (sizeof(T) == 4) out[target_col] = target_grad;
    else out[target_col] = float_to_bf16(target_grad);
  }
}

// --- fp64 input: scalar, double accumulation (used for gradcheck) ----------------------------

void stats_row_f64(const double* x, int64_t len, int64_t target_col, double inv_t, double& m, double& s, double& t,
                   double& tz) {
  for (int64_t j = 0; j < len; ++j) {
    const double z = x[j] * inv_t;
    if (z == -std::numeric_limits<double>::infinity()) continue;  // masked; NaN falls through and stays NaN
    if (z > m) {
      if (s > 0.0) {
        const double a = std::exp(m - z);
        t = a * (t + (m - z) * s);
        s *= a;
      }
      m = z;
    }
    const double d = z - m, e = std::exp(d);
    s += e;
    t += e * d;
  }
  if (target_col >= 0 && target_col < len) tz = x[target_col] * inv_t;
}

void grad_row_f64(const double* x, double* out, int64_t len, int64_t target_col, double inv_t, double logz, double h,
                  double c1, double c2, double g_target) {
  double target_grad = 0.0;
  for (int64_t j = 0; j < len; ++j) {
    const double lp = x[j] * inv_t - logz;
    const double p = std::exp(lp);
    const double g = p > 0.0 ? p * (c1 + c2 * (lp + h)) : 0.0;
    if (j == target_col) target_grad = g + g_target;
    out[j] = g;
  }
  if (target_col >= 0 && target_col < len) out[target_col] = target_grad;
}

template <typename Fn>
void for_rows(int64_t rows, int threads, Fn&& fn) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(guided) num_threads(threads) if (threads > 1 && rows > 1)
#endif
  for (int64_t r = 0; r < rows; ++r) fn(r);
}

// Like for_rows, and returns how many rows `fn` flagged as bad.
template <typename Fn>
int64_t count_rows(int64_t rows, int threads, Fn&& fn) {
  int64_t bad = 0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(guided) num_threads(threads) reduction(+ : bad) if (threads > 1 && rows > 1)
#endif
  for (int64_t r = 0; r < rows; ++r) bad += fn(r) ? 1 : 0;
  return bad;
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename Acc>
void fold_row(const T* row, int64_t len, int64_t target_col, double inv_t, Acc& m, Acc& s, Acc& t, Acc& tz) {
  if constexpr (std::is_same_v<T, double>) stats_row_f64(row, len, target_col, inv_t, m, s, t, tz);
  else stats_row<T>(row, len, target_col, float(inv_t), m, s, t, tz);
}

template <typename T>
int64_t forward_impl(const ForwardArgs& a) {
  using Acc = acc_t<T>;
  Acc* lp_out = static_cast<Acc*>(a.logprob);
  Acc* h_out = static_cast<Acc*>(a.entropy);
  Acc* lz_out = static_cast<Acc*>(a.logz);
  const int64_t vocab = a.x.len;
  return count_rows(a.x.rows(), a.threads, [&](int64_t r) {
    const T* row = static_cast<const T*>(a.x.data) + a.x.offset(r);
    const int64_t target = a.targets[r];
    const bool ignored = target == a.ignore_index;
    const bool bad = !ignored && (target < 0 || target >= vocab);
    Acc m = -std::numeric_limits<Acc>::infinity(), s = 0, t = 0, tz = 0;
    fold_row<T, Acc>(row, vocab, (ignored || bad) ? -1 : target, a.inv_temperature, m, s, t, tz);
    const Acc log_s = std::log(s);
    lz_out[r] = m + log_s;
    h_out[r] = log_s - t / s;
    lp_out[r] = ignored ? Acc(0) : bad ? std::numeric_limits<Acc>::quiet_NaN() : tz - lz_out[r];
    return bad;
  });
}

template <typename T>
int64_t stats_impl(const StatsArgs& a) {
  using Acc = acc_t<T>;
  Acc* st = static_cast<Acc*>(a.state);
  const int64_t stride = a.state_stride;
  const bool check = a.col_offset == 0;  // count each bad target once over a row's chunks
  return count_rows(a.x.rows(), a.threads, [&](int64_t r) {
    const T* row = static_cast<const T*>(a.x.data) + a.x.offset(r);
    const int64_t target = a.targets[r];
    const bool ignored = target == a.ignore_index;
    const bool bad = !ignored && (target < 0 || target >= a.vocab);
    const int64_t target_col = (ignored || bad) ? -1 : target - a.col_offset;
    fold_row<T, Acc>(row, a.x.len, target_col, a.inv_temperature, st[r], st[stride + r], st[2 * stride + r],
                     st[3 * stride + r]);
    return check && bad;
  });
}

template <typename T>
void grad_impl(const GradArgs& a) {
  using Acc = acc_t<T>;
  const Acc* logz = static_cast<const Acc*>(a.logz);
  const Acc* ent = static_cast<const Acc*>(a.entropy);
  const Acc* glp = static_cast<const Acc*>(a.grad_logprob);
  const Acc* gh = static_cast<const Acc*>(a.grad_entropy);
  const Acc inv_t = Acc(a.inv_temperature);
  for_rows(a.x.rows(), a.threads, [&](int64_t r) {
    const T* row = static_cast<const T*>(a.x.data) + a.x.offset(r);
    T* out = static_cast<T*>(a.out.data) + a.out.offset(r);
    const int64_t target = a.targets[r];
    const bool ignored = target == a.ignore_index || target < 0;
    const int64_t target_col = ignored ? -1 : target - a.col_offset;
    const Acc g_lp = (glp && !ignored) ? glp[r] : Acc(0);
    const Acc c1 = -inv_t * g_lp;
    const Acc c2 = gh ? -inv_t * gh[r] : Acc(0);
    if constexpr (std::is_same_v<T, double>)
      grad_row_f64(row, out, a.x.len, target_col, inv_t, logz[r], ent[r], c1, c2, inv_t * g_lp);
    else
      grad_row<T>(row, out, a.x.len, target_col, inv_t, logz[r], ent[r], c1, c2, inv_t * g_lp);
  });
}

}  // namespace

int64_t logprob_forward(const ForwardArgs& a) {
  switch (a.x.dtype) {
    case DType::f32: return forward_impl<float>(a);
    case DType::bf16: return forward_impl<bf16_t>(a);
    case DType::f64: return forward_impl<double>(a);
  }
  return 0;
}

int64_t softmax_stats(const StatsArgs& a) {
  switch (a.x.dtype) {
    case DType::f32: return stats_impl<float>(a);
    case DType::bf16: return stats_impl<bf16_t>(a);
    case DType::f64: return stats_impl<double>(a);
  }
  return 0;
}

void softmax_grad(const GradArgs& a) {
  switch (a.x.dtype) {
    case DType::f32: return grad_impl<float>(a);
    case DType::bf16: return grad_impl<bf16_t>(a);
    case DType::f64: return grad_impl<double>(a);
  }
}

// Sum of n floats: a read-bandwidth probe for the benchmark (same threads and vector width as the kernels).
double read_sum(const float* data, int64_t n, int threads) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  double total = 0.0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total) if (threads > 1)
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = data + c * kChunk;
    const int64_t len = std::min(kChunk, n - c * kChunk);
    VF a0 = VF::set1(0.0f), a1 = VF::set1(0.0f), a2 = VF::set1(0.0f), a3 = VF::set1(0.0f);
    int64_t j = 0;
    for (; j + 4 * VF::W <= len; j += 4 * VF::W) {
      a0 = a0 + VF::load(p + j);
      a1 = a1 + VF::load(p + j + VF::W);
      a2 = a2 + VF::load(p + j + 2 * VF::W);
      a3 = a3 + VF::load(p + j + 3 * VF::W);
    }
    float s = ((a0 + a1) + (a2 + a3)).reduce_add();
    for (; j < len; ++j) s += p[j];
    total += s;
  }
  return total;
}

}  // namespace cpu_<isa>
}  // namespace rlgen
