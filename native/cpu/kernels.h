// Shared declarations of the CPU softmax kernels (log-prob, entropy and their gradient).
//
// A "segment" is a contiguous run of one row of logits: the whole vocabulary (token_logprobs) or
// one vocabulary chunk (linear_token_logprobs). Rows are addressed through a 3-D view so that
// strided inputs such as logits[:, :-1, :] need no copy.
//
// Running state per row, kept in the accumulation type (float for fp32/bf16 input, double for
// fp64), all in units of the tempered logits z = x / temperature:
//   m   the largest z seen so far
//   s   sum over seen columns of exp(z - m)
//   t   sum over seen columns of exp(z - m) * (z - m)
//   tz  z of the target column (left unchanged when the target is not in the segment)
// From which: logZ = m + log s, entropy = log s - t / s, logprob = tz - logZ.
#pragma once
#include <cstdint>

namespace rlgen {

enum class DType : int { f32 = 0, bf16 = 1, f64 = 2 };

struct Rows {
  void* data = nullptr;
  DType dtype = DType::f32;
  int64_t n_outer = 1, n_inner = 0, len = 0;   // rows = n_outer * n_inner, each `len` long
  int64_t stride_outer = 0, stride_inner = 0;  // in elements; the last dimension is contiguous

  int64_t rows() const { return n_outer * n_inner; }
  int64_t offset(int64_t r) const { return (r / n_inner) * stride_outer + (r % n_inner) * stride_inner; }
};

// Targets: one per row. A row whose target equals `ignore_index` has no target (log-prob 0, no
// gradient through it); any other target outside [0, vocab) is counted as bad (an error upstream).

// Whole rows at once: the finished log-prob, entropy and log-normaliser of each row.
struct ForwardArgs {
  Rows x;
  const int64_t* targets;
  int64_t ignore_index;
  double inv_temperature;
  void* logprob;  // per row, accumulation type
  void* entropy;
  void* logz;
  int threads;
};

// state: 4 arrays (m, s, t, tz) of `rows` values, `state_stride` elements apart.
struct StatsArgs {
  Rows x;
  const int64_t* targets;
  int64_t ignore_index;
  int64_t vocab;           // full vocabulary size, for the target check (done when col_offset == 0)
  int64_t col_offset;      // vocabulary index of the segment's first column
  double inv_temperature;
  void* state;
  int64_t state_stride;
  int threads;
};

// out[j] = inv_T * (g_lp * ([j == target] - p_j) - g_h * p_j * (log p_j + H)),  p_j = exp(z_j - logZ)
// `out` may be `x` itself (the gradient overwrites the logits in place).
struct GradArgs {
  Rows x;
  Rows out;
  const int64_t* targets;
  int64_t ignore_index;
  int64_t col_offset;
  double inv_temperature;
  const void* logz;      // per row, accumulation type
  const void* entropy;   // per row, accumulation type
  const void* grad_logprob;  // per row or null (no gradient through the log-probs)
  const void* grad_entropy;  // per row or null (no gradient through the entropy)
  int threads;
};

#define RLGEN_DECLARE_ISA(isa)                        \
  namespace cpu_##isa {                               \
  int64_t logprob_forward(const ForwardArgs& args);   \
  int64_t softmax_stats(const StatsArgs& args);       \
  void softmax_grad(const GradArgs& args);            \
  double read_sum(const float* data, int64_t n, int threads); \
  }

RLGEN_DECLARE_ISA(base)
RLGEN_DECLARE_ISA(avx2)
RLGEN_DECLARE_ISA(avx512)

}  // namespace rlgen
