// Softmax statistics and gradient over segments of logit rows: the CUDA side of token_logprobs and
// linear_token_logprobs, with the semantics of native/cpu/softmax_kernels.cpp (kernels.h has the
// per-row state and the formulas).
//
// Forward (stats): one thread block per row. Each thread folds a strided share of the row into its
// own online-softmax partial (m, s, t), reading 16-byte packs wherever the row's alignment allows;
// the partials are merged across the block (warp shuffles, then shared memory), and thread 0
// merges the block's result into the row's stored state. The merge order is fixed, so the results
// do not change from run to run.
// Backward (grad): elementwise over a (row, column tile) grid. Every element is read and then
// written by the same thread, so `out` may be `x`.
//
// The per-thread math is __host__ __device__: it can be exercised on a machine without a GPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

#define RLGEN_HD __host__ __device__ __forceinline__

namespace rlgen {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kPackBytes = 16;           // one vector load / store per thread
constexpr int kMinStatsThreads = 64;     // stats: threads per row, a power of two in this range,
constexpr int kMaxStatsThreads = 512;    //   enough for two packs each
constexpr int kGradThreads = 256;
constexpr int64_t kMaxGridX = 2147483647;  // rows beyond this are looped over in the kernels
constexpr int64_t kMaxGridY = 65535;

// --- element types ---------------------------------------------------------------------------

// Accumulation type: fp32 for fp32 and bf16 input, fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

RLGEN_HD float to_acc(float v) { return v; }
RLGEN_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
RLGEN_HD double to_acc(double v) { return v; }

RLGEN_HD void put(float& dst, float v) { dst = v; }
RLGEN_HD void put(__nv_bfloat16& dst, float v) { dst = __float2bfloat16_rn(v); }  // as torch rounds
RLGEN_HD void put(double& dst, double v) { dst = v; }

// Exponentials. fp32 / bf16: base 2 like the CPU kernels, with the hardware approximation
// (ex2.approx: one MUFU instruction, relative error about 2^-22; 2^-inf = 0, and results below
// 2^-126 flush to 0). fp64, the gradcheck dtype: base e with the accurate exp. Exponents in "exp
// units" are natural-log quantities times kScale.
template <typename A> struct Base;

template <> struct Base<float> {
  static constexpr float kScale = 1.44269504088896341f;    // log2(e)
  static constexpr float kUnscale = 0.69314718055994531f;  // ln(2)
  static constexpr float kLowest = -FLT_MAX;
  static RLGEN_HD float exp(float u) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(u));
    return r;
#else
    return std::exp2(u);
#endif
  }
};

template <> struct Base<double> {
  static constexpr double kScale = 1.0;
  static constexpr double kUnscale = 1.0;
  static constexpr double kLowest = -DBL_MAX;
  static RLGEN_HD double exp(double u) { return ::exp(u); }
};

// --- row addressing --------------------------------------------------------------------------

// The device copy of Rows: row r of a [n_outer, n_inner, len] view with a contiguous last dimension.
template <typename T> struct RowsView {
  T* data;
  int64_t n_inner, stride_outer, stride_inner, len;

  RLGEN_HD T* row(int64_t r) const { return data + (r / n_inner) * stride_outer + (r % n_inner) * stride_inner; }
};

template <typename T> RowsView<T> view_of(const Rows& r) {
  return {static_cast<T*>(r.data), r.n_inner, r.stride_outer, r.stride_inner, r.len};
}

template <typename T> struct alignas(kPackBytes) Pack {
  static constexpr int N = kPackBytes / int(sizeof(T));
  T v[N];
};

// Columns [head, body_end) of a row go through 16-byte packs, the others one element at a time.
struct Split {
  int64_t head, body_end;
};

// `a` and `b` are the same row of the input and the output (the same pointer for stats). Packs
// need both at the same distance from a 16-byte boundary: strided views put rows anywhere.
template <typename T> RLGEN_HD Split split_row(const T* a, const T* b, int64_t len) {
  constexpr int64_t N = Pack<T>::N;
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (pa % kPackBytes != pb % kPackBytes || pa % sizeof(T) != 0) return {0, 0};
  int64_t head = int64_t((kPackBytes - pa % kPackBytes) % kPackBytes / sizeof(T));
  if (head > len) head = len;
  return {head, head + (len - head) / N * N};
}

RLGEN_HD int64_t scalar_count(const Split& sp, int64_t len) { return sp.head + (len - sp.body_end); }

// The k-th of a row's one-at-a-time columns: those before the packs, then those after.
RLGEN_HD int64_t scalar_column(const Split& sp, int64_t k) { return k < sp.head ? k : sp.body_end + (k - sp.head); }

// --- online softmax --------------------------------------------------------------------------

// The statistics of a set of columns, in natural units: m = max z, s = sum exp(z - m),
// t = sum exp(z - m) (z - m). Nothing seen: m = -inf, s = t = 0.
template <typename A> struct Partial {
  A m, s, t;
};

template <typename A> RLGEN_HD Partial<A> empty_partial() { return {A(-INFINITY), A(0), A(0)}; }

// Adds part's sums, rescaled from its max to m (>= part.m), into (s, t).
template <typename A> RLGEN_HD void add_rescaled(const Partial<A>& part, A m, A& s, A& t) {
  // An empty part adds nothing; skipping it also avoids (-inf - m) * 0 = NaN. A NaN s goes through.
  if (part.s == A(0)) return;
  const A d = part.m - m;
  const A e = d == A(0) ? A(1) : Base<A>::exp(d * Base<A>::kScale);  // exact when the max stays
  s += e * part.s;
  t += e * (part.t + d * part.s);
}

template <typename A> RLGEN_HD Partial<A> merge(const Partial<A>& a, const Partial<A>& b) {
  Partial<A> r{fmax(a.m, b.m), A(0), A(0)};
  add_rescaled(a, r.m, r.s, r.t);
  add_rescaled(b, r.m, r.s, r.t);
  return r;
}

// The larger of a and b, or NaN when either is: a NaN logit must make the row's statistics NaN,
// not vanish into a chunk that looks fully masked (fmax would drop it).
template <typename A> RLGEN_HD A max_keep_nan(A a, A b) { return a > b || a != a ? a : b; }

// One thread's running statistics, updated a few columns at a time: the max of the few comes
// first, so the sums are rescaled (one exp) at most once per update rather than once per column.
// t is kept in exp units until finish().
template <typename A> struct Online {
  A m = A(-INFINITY), s = A(0), tu = A(0);

  template <int K> RLGEN_HD void add(const A (&x)[K], A inv_t) {
    A xmax = x[0];
    for (int k = 1; k < K; ++k) xmax = max_keep_nan(xmax, x[k]);
    const A zmax = xmax * inv_t;
    if (zmax == A(-INFINITY)) return;  // all masked: nothing to add, and z - m would be NaN while m = -inf
    if (zmax > m) {
      if (s != A(0)) {
        const A du = (m - zmax) * Base<A>::kScale;
        const A a = Base<A>::exp(du);
        tu = a * (tu + du * s);
        s *= a;
      }
      m = zmax;
    }
    const A c = inv_t * Base<A>::kScale, mu = m * Base<A>::kScale;
    for (int k = 0; k < K; ++k) {
      const A d = x[k] * c - mu;  // z - m in exp units, <= 0 up to rounding
      const A e = Base<A>::exp(d);
      s += e;
      tu += e * fmax(d, Base<A>::kLowest);  // a -inf logit: e = 0, and 0 * -inf would be NaN
    }
  }

  RLGEN_HD Partial<A> finish() const { return {m, s, tu * Base<A>::kUnscale}; }
};

// Thread `tid` of `nthreads`'s share of one row: packs tid, tid + nthreads, ..., then the same
// stride over the one-at-a-time columns.
template <typename T>
RLGEN_HD Partial<Acc<T>> stats_thread(const T* row, int64_t len, int64_t tid, int64_t nthreads, Acc<T> inv_t) {
  using A = Acc<T>;
  constexpr int N = Pack<T>::N;
  const Split sp = split_row(row, row, len);
  const Pack<T>* packs = reinterpret_cast<const Pack<T>*>(row + sp.head);
  const int64_t n_packs = (sp.body_end - sp.head) / N;
  Online<A> acc;
  int64_t i = tid;
  for (; i + nthreads < n_packs; i += 2 * nthreads) {  // two loads in flight before the first use
    const Pack<T> p0 = packs[i], p1 = packs[i + nthreads];
    A v[2 * N];
    for (int k = 0; k < N; ++k) {
      v[k] = to_acc(p0.v[k]);
      v[N + k] = to_acc(p1.v[k]);
    }
    acc.add(v, inv_t);
  }
  if (i < n_packs) {
    const Pack<T> p0 = packs[i];
    A v[N];
    for (int k = 0; k < N; ++k) v[k] = to_acc(p0.v[k]);
    acc.add(v, inv_t);
  }
  const int64_t n_scalar = scalar_count(sp, len);
  for (int64_t k = tid; k < n_scalar; k += nthreads) {
    const A v[1] = {to_acc(row[scalar_column(sp, k)])};
    acc.add(v, inv_t);
  }
  return acc.finish();
}

template <typename A> __device__ Partial<A> warp_merge(Partial<A> p) {
#pragma unroll
  for (int lanes = kWarp / 2; lanes > 0; lanes /= 2) {
    const Partial<A> other{__shfl_xor_sync(0xffffffffu, p.m, lanes), __shfl_xor_sync(0xffffffffu, p.s, lanes),
                           __shfl_xor_sync(0xffffffffu, p.t, lanes)};
    p = merge(p, other);
  }
  return p;
}

// The whole block's partial, valid in thread 0. blockDim.x must be a multiple of the warp size.
template <typename A> __device__ Partial<A> block_merge(Partial<A> p, Partial<A>* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  p = warp_merge(p);
  if (lane == 0) scratch[warp] = p;
  __syncthreads();
  if (warp == 0) p = warp_merge(lane < int(blockDim.x / kWarp) ? scratch[lane] : empty_partial<A>());
  __syncthreads();  // scratch is reused for the next row
  return p;
}

template <typename T> struct StatsParams {
  RowsView<const T> x;
  int64_t rows;
  const int64_t* targets;
  int64_t ignore_index;
  int64_t col_offset;
  Acc<T> inv_t;
  Acc<T>* state;  // [4, rows]: m, s, t, tz, state_stride apart
  int64_t state_stride;
};

// Merges the segment's statistics into row r's stored state, and records the target's z when the
// target lies in this segment.
template <typename T> __device__ void fold_into_state(const StatsParams<T>& p, int64_t r, const T* row,
                                                      const Partial<Acc<T>>& part) {
  using A = Acc<T>;
  A* m = p.state + r;
  A* s = m + p.state_stride;
  A* t = s + p.state_stride;
  A* tz = t + p.state_stride;
  const Partial<A> total = merge(Partial<A>{*m, *s, *t}, part);
  *m = total.m;
  *s = total.s;
  *t = total.t;
  const int64_t target = p.targets[r], col = target - p.col_offset;
  if (target != p.ignore_index && target >= 0 && col >= 0 && col < p.x.len) *tz = to_acc(row[col]) * p.inv_t;
}

template <typename T> __global__ void __launch_bounds__(kMaxStatsThreads) stats_kernel(const StatsParams<T> p) {
  using A = Acc<T>;
  __shared__ Partial<A> scratch[kMaxStatsThreads / kWarp];
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* row = p.x.row(r);
    const Partial<A> part = block_merge(stats_thread(row, p.x.len, threadIdx.x, blockDim.x, p.inv_t), scratch);
    if (threadIdx.x == 0) fold_into_state(p, r, row, part);
  }
}

// --- gradient --------------------------------------------------------------------------------

// Per-row constants of the gradient. With lp = log p_j in exp units,
//   out_j = inv_t * (g_lp * ([j == target] - p_j) - g_h * p_j * (log p_j + H))
//         = p_j * (a + b * lp) + [j == target] * inv_t * g_lp.
template <typename A> struct GradCoefs {
  A c;       // x -> z in exp units
  A logz_u;  // log Z in exp units
  A a, b, g_target;
  int64_t target_col;  // -1 when the row is ignored; may lie outside this segment

  RLGEN_HD A at(A x, int64_t col) const {
    const A lp = x * c - logz_u;
    const A p = Base<A>::exp(lp);
    // p = 0 (a -inf logit, or one too small to matter) gives exactly 0, where b * lp may be infinite.
    A grad = p == A(0) ? A(0) : p * (a + b * lp);
    if (col == target_col) grad += g_target;
    return grad;
  }
};

// g_lp: 0 for an ignored row or without a log-prob gradient; g_h: 0 without an entropy gradient.
template <typename A> RLGEN_HD GradCoefs<A> make_coefs(A inv_t, A logz, A entropy, A g_lp, A g_h, int64_t target_col) {
  const A c1 = -inv_t * g_lp, c2 = -inv_t * g_h;
  // Without an entropy gradient H is not needed (and may be NaN on a fully masked row).
  const A a = c2 == A(0) ? c1 : c1 + c2 * entropy;
  return {inv_t * Base<A>::kScale, logz * Base<A>::kScale, a, c2 * Base<A>::kUnscale, inv_t * g_lp, target_col};
}

// Thread `tid` of `nthreads`'s share of one row's gradient (x and out may be the same row).
template <typename T>
RLGEN_HD void grad_thread(const T* x, T* out, int64_t len, int64_t tid, int64_t nthreads, const GradCoefs<Acc<T>>& g) {
  constexpr int N = Pack<T>::N;
  const Split sp = split_row(x, static_cast<const T*>(out), len);
  const Pack<T>* in = reinterpret_cast<const Pack<T>*>(x + sp.head);
  Pack<T>* dst = reinterpret_cast<Pack<T>*>(out + sp.head);
  const int64_t n_packs = (sp.body_end - sp.head) / N;
  for (int64_t i = tid; i < n_packs; i += nthreads) {
    const Pack<T> v = in[i];
    const int64_t col0 = sp.head + i * N;
    Pack<T> r;
    for (int k = 0; k < N; ++k) put(r.v[k], g.at(to_acc(v.v[k]), col0 + k));
    dst[i] = r;
  }
  const int64_t n_scalar = scalar_count(sp, len);
  for (int64_t k = tid; k < n_scalar; k += nthreads) {
    const int64_t col = scalar_column(sp, k);
    put(out[col], g.at(to_acc(x[col]), col));
  }
}

template <typename T> struct GradParams {
  RowsView<const T> x;
  RowsView<T> out;
  int64_t rows;
  const int64_t* targets;
  int64_t ignore_index;
  int64_t col_offset;
  Acc<T> inv_t;
  const Acc<T>* logz;
  const Acc<T>* entropy;
  const Acc<T>* grad_logprob;  // null: no log-prob gradient
  const Acc<T>* grad_entropy;  // null: no entropy gradient
};

template <typename T> __device__ GradCoefs<Acc<T>> row_coefs(const GradParams<T>& p, int64_t r) {
  using A = Acc<T>;
  const int64_t target = p.targets[r];
  const bool ignored = target == p.ignore_index || target < 0;
  const A g_lp = p.grad_logprob && !ignored ? p.grad_logprob[r] : A(0);
  const A g_h = p.grad_entropy ? p.grad_entropy[r] : A(0);
  return make_coefs(p.inv_t, p.logz[r], p.entropy[r], g_lp, g_h, ignored ? int64_t(-1) : target - p.col_offset);
}

// blockIdx.x: rows; blockIdx.y: column tiles of a row.
template <typename T> __global__ void __launch_bounds__(kGradThreads) grad_kernel(const GradParams<T> p) {
  const int64_t tid = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.y) * blockDim.x;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x)
    grad_thread(p.x.row(r), p.out.row(r), p.x.len, tid, nthreads, row_coefs(p, r));
}

// --- launchers -------------------------------------------------------------------------------

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("rlgen CUDA kernels: ") + what + ": " + cudaGetErrorString(err));
}

// Makes the arrays' device current for the launch: torch's current device may be another GPU.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

unsigned row_blocks(int64_t rows) { return unsigned(std::min(rows, kMaxGridX)); }

// Enough threads for two packs each, so that short rows (vocabulary chunks) keep few idle threads.
int stats_threads(int64_t len, int pack) {
  int n = kMinStatsThreads;
  while (n < kMaxStatsThreads && int64_t(n) * 2 * pack < len) n *= 2;
  return n;
}

template <typename T> void launch_stats(const StatsArgs& a, Stream stream) {
  using A = Acc<T>;
  StatsParams<T> p;
  p.x = view_of<const T>(a.x);
  p.rows = a.x.rows();
  p.targets = a.targets;
  p.ignore_index = a.ignore_index;
  p.col_offset = a.col_offset;
  p.inv_t = A(a.inv_temperature);
  p.state = static_cast<A*>(a.state);
  p.state_stride = a.state_stride;
  stats_kernel<T><<<row_blocks(p.rows), stats_threads(a.x.len, Pack<T>::N), 0, stream>>>(p);
}

template <typename T> void launch_grad(const GradArgs& a, Stream stream) {
  using A = Acc<T>;
  GradParams<T> p;
  p.x = view_of<const T>(a.x);
  p.out = view_of<T>(a.out);
  p.rows = a.x.rows();
  p.targets = a.targets;
  p.ignore_index = a.ignore_index;
  p.col_offset = a.col_offset;
  p.inv_t = A(a.inv_temperature);
  p.logz = static_cast<const A*>(a.logz);
  p.entropy = static_cast<const A*>(a.entropy);
  p.grad_logprob = static_cast<const A*>(a.grad_logprob);
  p.grad_entropy = static_cast<const A*>(a.grad_entropy);
  // One pack per thread per tile; rows longer than kMaxGridY tiles loop.
  const int64_t per_tile = int64_t(kGradThreads) * Pack<T>::N;
  const int64_t tiles = std::min(std::max((a.x.len + per_tile - 1) / per_tile, int64_t(1)), kMaxGridY);
  grad_kernel<T><<<dim3(row_blocks(p.rows), unsigned(tiles)), kGradThreads, 0, stream>>>(p);
}

}  // namespace

void softmax_stats(const StatsArgs& args, int device, Stream stream) {
  if (args.x.rows() == 0 || args.x.len == 0) return;  // nothing to fold: the state stays as it is
  const DeviceGuard guard(device);
  switch (args.x.dtype) {
    case DType::f32: launch_stats<float>(args, stream); break;
    case DType::bf16: launch_stats<__nv_bfloat16>(args, stream); break;
    case DType::f64: launch_stats<double>(args, stream); break;
  }
  check(cudaGetLastError(), "softmax_stats launch");
}

void softmax_grad(const GradArgs& args, int device, Stream stream) {
  if (args.x.rows() == 0 || args.x.len == 0) return;
  const DeviceGuard guard(device);
  switch (args.x.dtype) {
    case DType::f32: launch_grad<float>(args, stream); break;
    case DType::bf16: launch_grad<__nv_bfloat16>(args, stream); break;
    case DType::f64: launch_grad<double>(args, stream); break;
  }
  check(cudaGetLastError(), "softmax_grad launch");
}

}  // namespace gpu
}  // namespace rlgen
