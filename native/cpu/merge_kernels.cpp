// CPU kernels of the sparse task-vector merges (merge_kernels.h has the semantics).
//
// Everything streams over the inputs in blocks: each block of every model is converted to float32
// into small per-thread buffers, so bf16 / fp16 / fp32 are read in place and no float32 copy of any
// whole delta is made. A "top" or "band" rule's cut points come from an exact parallel radix select
// on the magnitude keys (two histogram passes of 16 bits each, recomputing |x - base| on the fly:
// O(n), no scratch of n elements), then, when the cut value is shared by more entries than the rule
// keeps, a third pass counts the equal entries per block so that the first `need` of them in index
// order are kept (the lower-index-wins rule, exactly). The final pass merges all models block by
// block; its arithmetic is in the same order as the torch reference. (Built with -fno-trapping-math so
// that the selects vectorise; no result changes.)
#include "merge_kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace rlgen {
namespace merge {
namespace {

constexpr int64_t kBlock = 2048;     // elements per work item
constexpr int64_t kBins = 1 << 16;   // radix-select histogram bins (16 bits of the key per pass)

int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int64_t block_count(int64_t n) { return (n + kBlock - 1) / kBlock; }

void load_block(const Input& in, int64_t begin, int64_t len, float* dst) {
  if (!in.data) {
    std::fill(dst, dst + len, 0.0f);
    return;
  }
  switch (in.type) {
    case ElemType::f32:
      std::memcpy(dst, static_cast<const float*>(in.data) + begin, size_t(len) * sizeof(float));
      break;
    case ElemType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(in.data) + begin;
      for (int64_t t = 0; t < len; ++t) dst[t] = bf16_to_float(p[t]);
      break;
    }
    case ElemType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(in.data) + begin;
      for (int64_t t = 0; t < len; ++t) dst[t] = f16_to_float(p[t]);
      break;
    }
  }
}

void store_block(void* out, ElemType type, int64_t begin, int64_t len, const float* src) {
  switch (type) {
    case ElemType::f32:
      std::memcpy(static_cast<float*>(out) + begin, src, size_t(len) * sizeof(float));
      break;
    case ElemType::bf16: {
      uint16_t* p = static_cast<uint16_t*>(out) + begin;
      for (int64_t t = 0; t < len; ++t) p[t] = float_to_bf16(src[t]);
      break;
    }
    case ElemType::f16: {
      uint16_t* p = static_cast<uint16_t*>(out) + begin;
      for (int64_t t = 0; t < len; ++t) p[t] = float_to_f16(src[t]);
      break;
    }
  }
}

// Per-thread buffers of one block.
struct Scratch {
  std::vector<float> x, base;
  std::vector<uint32_t> keys;
  Scratch() : x(kBlock), base(kBlock), keys(kBlock) {}
};

// keys[t] = magnitude_key(x - base) of block [begin, begin + len).
void block_keys(const ModelSpec& m, const Input& base, int64_t begin, int64_t len, Scratch& s) {
  load_block(m.x, begin, len, s.x.data());
  load_block(base, begin, len, s.base.data());
  for (int64_t t = 0; t < len; ++t) s.keys[t] = magnitude_key(s.x[t] - s.base[t]);
}

// Runs body(scratch, thread, begin, len) over all blocks, statically split among the threads.
template <typename Body> void for_blocks(int64_t n, int threads, Body body) {
  const int64_t blocks = block_count(n);
#pragma omp parallel num_threads(threads)
  {
    Scratch s;
    const int tid = thread_id();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) body(s, tid, i * kBlock, std::min(kBlock, n - i * kBlock));
  }
}

// The key at ascending rank r: its value, how many keys are smaller and how many equal.
struct Selected {
  uint32_t v = 0;
  int64_t less = 0, equal = 0;
};

// Walk a histogram to the bin holding rank r (counting from `before`).
void find_bin(const std::vector<int64_t>& hist, int64_t r, int64_t before, uint32_t& bin, int64_t& below) {
  int64_t cum = before;
  for (int64_t b = 0; b < kBins; ++b) {
    if (cum + hist[b] > r) {
      bin = uint32_t(b);
      below = cum;
      return;
    }
    cum += hist[b];
  }
  bin = uint32_t(kBins - 1);  // unreachable for r < n
  below = cum;
}

// Sum per-thread histograms (thread-major, kBins each).
std::vector<int64_t> total_of(const std::vector<uint32_t>& per_thread, int threads) {
  std::vector<int64_t> total(kBins, 0);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < kBins; ++b) {
    int64_t sum = 0;
    for (int t = 0; t < threads; ++t) sum += per_thread[size_t(t) * kBins + b];
    total[b] = sum;
  }
  return total;
}

// Exact radix select of up to two ascending ranks (0 <= r < n) of model m's magnitude keys.
std::vector<Selected> select_ranks(int64_t n, const ModelSpec& m, const Input& base, const std::vector<int64_t>& ranks,
                                   int threads) {
  const size_t q = ranks.size();
  std::vector<uint32_t> hist(size_t(threads) * kBins, 0);
  for_blocks(n, threads, [&](Scratch& s, int tid, int64_t begin, int64_t len) {
    block_keys(m, base, begin, len, s);
    uint32_t* h = hist.data() + size_t(tid) * kBins;
    for (int64_t t = 0; t < len; ++t) ++h[s.keys[t] >> 16];
  });
  const std::vector<int64_t> high = total_of(hist, threads);
  std::vector<uint32_t> high_bin(q);
  std::vector<int64_t> high_below(q);
  for (size_t i = 0; i < q; ++i) find_bin(high, ranks[i], 0, high_bin[i], high_below[i]);

  // Second pass: the low 16 bits of the keys in each rank's high bin, gathered first without a
  // branch (a quarter to a half of the keys may match: a branch would mispredict).
  std::vector<std::vector<uint32_t>> low_hist(q, std::vector<uint32_t>(size_t(threads) * kBins, 0));
  for_blocks(n, threads, [&](Scratch& s, int tid, int64_t begin, int64_t len) {
    block_keys(m, base, begin, len, s);
    for (size_t i = 0; i < q; ++i) {
      uint32_t* h = low_hist[i].data() + size_t(tid) * kBins;
      uint32_t* low = reinterpret_cast<uint32_t*>(s.x.data());  // free once the keys are made
      const uint32_t want = high_bin[i];
      int64_t found = 0;
      for (int64_t t = 0; t < len; ++t) {
        low[found] = s.keys[t] & 0xFFFFu;
        found += (s.keys[t] >> 16) == want;
      }
      for (int64_t t = 0; t < found; ++t) ++h[low[t]];
    }
  });
  std::vector<Selected> out(q);
  for (size_t i = 0; i < q; ++i) {
    const std::vector<int64_t> low = total_of(low_hist[i], threads);
    uint32_t low_bin;
    find_bin(low, ranks[i], high_below[i], low_bin, out[i].less);
    out[i].v = (high_bin[i] << 16) | low_bin;
    out[i].equal = low[low_bin];
  }
  return out;
}

// The flat index c with exactly `need` keys equal to v before it (0 < need < number equal).
int64_t equal_cut(int64_t n, const ModelSpec& m, const Input& base, uint32_t v, int64_t need, int threads) {
  std::vector<int64_t> counts(size_t(block_count(n)), 0);
  for_blocks(n, threads, [&](Scratch& s, int, int64_t begin, int64_t len) {
    block_keys(m, base, begin, len, s);
    int64_t c = 0;
    for (int64_t t = 0; t < len; ++t) c += s.keys[t] == v;
    counts[size_t(begin / kBlock)] = c;
  });
  int64_t seen = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (seen + counts[i] >= need) {  // the need-th equal key is in block i
      Scratch s;
      const int64_t begin = int64_t(i) * kBlock, len = std::min(kBlock, n - begin);
      block_keys(m, base, begin, len, s);
      for (int64_t t = 0; t < len; ++t)
        if (s.keys[t] == v && ++seen == need) return begin + t + 1;
    }
    seen += counts[i];
  }
  return n;  // unreachable when need <= the number of equal keys
}

// The cut below which lie the entries of ascending stable rank < r (0 < r < n).
Cut below_cut(int64_t n, const ModelSpec& m, const Input& base, const Selected& sel, int64_t r, int threads) {
  const int64_t need = r - sel.less;  // in [0, equal)
  return Cut{sel.v, need == 0 ? 0 : equal_cut(n, m, base, sel.v, need, threads)};
}

Rule resolve(int64_t n, const ModelSpec& m, const Input& base, int threads) {
  Rule r{m.keep, m.key, uint64_t(m.a), Cut{0, 0}, Cut{0, 0}};
  if (m.keep == Keep::top) {
    const int64_t k = m.a;
    const Selected sel = select_ranks(n, m, base, {n - k}, threads)[0];
    const int64_t need = k - (n - sel.less - sel.equal);  // equal keys to keep, in [1, equal]
    r.hi = Cut{sel.v, need == sel.equal ? n : equal_cut(n, m, base, sel.v, need, threads)};
  } else if (m.keep == Keep::band) {
    std::vector<int64_t> ranks;
    if (m.b < n) ranks.push_back(m.b);
    if (m.a > 0) ranks.push_back(m.a);
    const std::vector<Selected> sel = select_ranks(n, m, base, ranks, threads);
    r.hi = m.b < n ? below_cut(n, m, base, sel[0], m.b, threads) : Cut{0xFFFFFFFFu, n};
    r.lo = m.a > 0 ? below_cut(n, m, base, sel.back(), m.a, threads) : Cut{0, 0};
  }
  return r;
}

// tau = weight * survivor / divide_by over entries [0, len) of a block (x in, tau out).
//
// A top or band rule keeps, on each side of its cut indices, the keys in a fixed range [lo, hi):
// top keeps key >= v before its cut c and key > v from c on; band keeps key < v_hi (<= before c_hi)
// and key >= v_lo (> before c_lo). So a block splits into at most three segments of plain integer
// range tests, which vectorise (keys are < 2^31: signed compares).
constexpr int64_t kNoLimit = 0x7FFFFFFF;

void range_taus(const float* base, float* x, int64_t len, int32_t lo, int32_t hi, float w, float div) {
  for (int64_t t = 0; t < len; ++t) {
    const float d = x[t] - base[t];
    const int32_t k = int32_t(magnitude_key(d));
    const float tau = w * (d / div);
    x[t] = (k >= lo && k < hi) ? tau : 0.0f;
  }
}

void block_taus(const Rule& r, const ModelSpec& m, int64_t begin, int64_t len, const float* base, float* x) {
  const float w = m.weight, div = m.divide_by;
  switch (r.keep) {
    case Keep::none:
      std::fill(x, x + len, 0.0f);
      return;
    case Keep::all:
      for (int64_t t = 0; t < len; ++t) x[t] = w * ((x[t] - base[t]) / div);
      return;
    case Keep::random: {
      if (r.threshold > 0xFFFFFFFFull) {  // keeps everything (never sent: such rules are "all")
        for (int64_t t = 0; t < len; ++t) x[t] = w * ((x[t] - base[t]) / div);
        return;
      }
      const uint32_t threshold = uint32_t(r.threshold), key = r.key, j0 = uint32_t(begin);
      for (int64_t t = 0; t < len; ++t) {
        const float tau = w * ((x[t] - base[t]) / div);
        x[t] = mix32(mix32(j0 + uint32_t(t)) ^ key) < threshold ? tau : 0.0f;
      }
      return;
    }
    case Keep::top:
    case Keep::band: break;
  }
  const bool top = r.keep == Keep::top;
  const int64_t end = begin + len;
  int64_t cuts[2] = {top ? r.hi.c : std::min(r.hi.c, r.lo.c), top ? end : std::max(r.hi.c, r.lo.c)};
  int64_t at = begin;
  for (int64_t stop : {cuts[0], cuts[1], end}) {
    stop = std::min(std::max(stop, at), end);
    if (stop == at) continue;
    // Limits of the segment [at, stop): every index in it is on the same side of both cuts.
    const int64_t lo = top ? int64_t(r.hi.v) + (at >= r.hi.c) : int64_t(r.lo.v) + (at < r.lo.c);
    const int64_t hi = top ? kNoLimit : std::min(int64_t(r.hi.v) + (at < r.hi.c), kNoLimit);
    range_taus(base + (at - begin), x + (at - begin), stop - at, int32_t(lo), int32_t(hi), w, div);
    at = stop;
  }
}

}  // namespace

void keep_mask(int64_t n, const ModelSpec& m, const Input& base, bool* mask, int threads) {
  const Rule r = resolve(n, m, base, threads);
  for_blocks(n, threads, [&](Scratch& s, int, int64_t begin, int64_t len) {
    load_block(m.x, begin, len, s.x.data());
    load_block(base, begin, len, s.base.data());
    for (int64_t t = 0; t < len; ++t) mask[begin + t] = keeps(r, s.x[t] - s.base[t], begin + t);
  });
}

void sparse_task_merge(const SparseMergeArgs& a) {
  const size_t count = a.models.size();
  std::vector<Rule> rules(count);
  for (size_t i = 0; i < count; ++i) rules[i] = resolve(a.n, a.models[i], a.base, a.threads);

  const int64_t blocks = block_count(a.n);
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<float> base(kBlock), acc(kBlock), total(kBlock), weights(kBlock);
    std::vector<float> taus(a.consensus ? count * kBlock : kBlock);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t begin = blk * kBlock, len = std::min(kBlock, a.n - begin);
      load_block(a.base, begin, len, base.data());
      std::fill(acc.begin(), acc.begin() + len, 0.0f);
      if (!a.consensus) {
        float* tau = taus.data();
        for (size_t i = 0; i < count; ++i) {
          load_block(a.models[i].x, begin, len, tau);
          block_taus(rules[i], a.models[i], begin, len, base.data(), tau);
          for (int64_t t = 0; t < len; ++t) acc[t] += tau[t];
        }
        if (a.normalize)
          for (int64_t t = 0; t < len; ++t) acc[t] /= a.divisor;
      } else {
        std::fill(total.begin(), total.begin() + len, 0.0f);
        for (size_t i = 0; i < count; ++i) {
          float* tau = taus.data() + i * kBlock;
          load_block(a.models[i].x, begin, len, tau);
          block_taus(rules[i], a.models[i], begin, len, base.data(), tau);
          for (int64_t t = 0; t < len; ++t) total[t] += tau[t];
        }
        std::fill(weights.begin(), weights.begin() + len, 0.0f);
        for (size_t i = 0; i < count; ++i) {
          const float* tau = taus.data() + i * kBlock;
          const float w = a.models[i].weight;
          for (int64_t t = 0; t < len; ++t) {
            const bool up = total[t] >= 0.0f;  // a zero tau never agrees; a NaN total elects -1
            const bool agree = (up & (tau[t] > 0.0f)) | (!up & (tau[t] < 0.0f));
            acc[t] += agree ? tau[t] : 0.0f;
            weights[t] += agree ? w : 0.0f;
          }
        }
        if (a.normalize)
          for (int64_t t = 0; t < len; ++t) acc[t] /= weights[t] == 0.0f ? 1.0f : weights[t];
      }
      for (int64_t t = 0; t < len; ++t) acc[t] = base[t] + a.lam * acc[t];
      store_block(a.out, a.out_type, begin, len, acc.data());
    }
  }
}

}  // namespace merge
}  // namespace rlgen
