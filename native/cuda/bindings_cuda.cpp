// rlgen._native_cuda: Python bindings of the CUDA kernels. Tensors arrive through DLPack (no torch
// headers) and must already be on the GPU; outputs are allocated by torch on the Python side and
// filled here. The kernels are enqueued on the caller's stream, passed as an integer
// (torch.cuda.current_stream().cuda_stream), so the calls return before the GPU has run them, as
// any torch operation does.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "array_args.h"
#include "cuda_kernels.h"
#include "merge_args.h"
#include "merge_kernels.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::device::cuda>;
using Targets = nb::ndarray<int64_t, nb::ndim<1>, nb::device::cuda>;

namespace rlgen {
namespace {

// The kernels run on the logits' GPU: every other array must be there too.
template <typename A> void check_device(const A& a, int device, const char* name) {
  if (a.device_id() != device)
    throw bad_arg(name, "on GPU " + std::to_string(a.device_id()) + ", the logits on GPU " + std::to_string(device));
}

const void* per_row(const Array& a, DType acc, int64_t rows, int device, const char* name) {
  check_per_row(a, acc, rows, name);
  check_device(a, device, name);
  return a.data();
}

const int64_t* targets_of(const Targets& t, int64_t rows, int device) {
  check_targets(t, rows);
  check_device(t, device, "targets");
  return t.data();
}

gpu::Stream stream_of(uintptr_t handle) { return reinterpret_cast<gpu::Stream>(handle); }

void stats(Array x, Targets targets, int64_t ignore_index, int64_t col_offset, double inv_t, Array state,
           uintptr_t stream) {
  StatsArgs a;
  a.x = rows_of(x, "logits");
  const int device = x.device_id();
  const int64_t rows = a.x.rows();
  a.targets = targets_of(targets, rows, device);
  a.ignore_index = ignore_index;
  a.col_offset = col_offset;
  a.inv_temperature = inv_t;
  if (state.ndim() != 2 || state.shape(0) != 4 || int64_t(state.shape(1)) != rows ||
      (rows > 1 && state.stride(1) != 1) || dtype_of(state, "state") != acc_of(a.x.dtype))
    throw bad_arg("state", "expected a [4, rows] array of the accumulation dtype");
  check_device(state, device, "state");
  a.state = state.data();
  a.state_stride = state.stride(0);
  a.threads = 0;  // CPU only
  nb::gil_scoped_release unlocked;
  gpu::softmax_stats(a, device, stream_of(stream));
}

void grad(Array x, Array out, Targets targets, int64_t ignore_index, int64_t col_offset, double inv_t, Array logz,
          Array entropy,
          std::optional<Array> grad_logprob, std::optional<Array> grad_entropy, uintptr_t stream) {
  GradArgs a;
  a.x = rows_of(x, "logits");
  a.out = rows_of(out, "out");
  const int device = x.device_id();
  const int64_t rows = a.x.rows();
  if (a.out.dtype != a.x.dtype || a.out.rows() != rows || a.out.len != a.x.len || a.out.n_inner != a.x.n_inner)
    throw bad_arg("out", "expected the shape and dtype of the logits");
  check_device(out, device, "out");
  const DType acc = acc_of(a.x.dtype);
  a.targets = targets_of(targets, rows, device);
  a.ignore_index = ignore_index;
  a.col_offset = col_offset;
  a.inv_temperature = inv_t;
  a.logz = per_row(logz, acc, rows, device, "logz");
  a.entropy = per_row(entropy, acc, rows, device, "entropy");
  a.grad_logprob = grad_logprob ? per_row(*grad_logprob, acc, rows, device, "grad_logprob") : nullptr;
  a.grad_entropy = grad_entropy ? per_row(*grad_entropy, acc, rows, device, "grad_entropy") : nullptr;
  a.threads = 0;  // CPU only
  nb::gil_scoped_release unlocked;
  gpu::softmax_grad(a, device, stream_of(stream));
}

// rules: (keep, threshold, key, hi_v, hi_c, lo_v, lo_c) per tensor, the cut points already resolved
// (rlgen/merging/kernels.py: _cuda_rule_row).
void sparse_apply(std::vector<Array> tensors, std::optional<Array> base, Array out, std::vector<int64_t> rules,
                  std::vector<double> weights, std::vector<double> divide_by, bool consensus, bool normalize,
                  double divisor, double lam, uintptr_t stream) {
  using merge::gpu::kMaxModels;
  const size_t count = tensors.size();
  if (count == 0 || count > size_t(kMaxModels))
    throw bad_arg("tensors", "expected 1 to " + std::to_string(kMaxModels) + " arrays");
  if (rules.size() != 7 * count || weights.size() != count || divide_by.size() != count)
    throw bad_arg("rules", "expected 7 rule values, a weight and a divisor per tensor");
  merge::gpu::ApplyArgs a{};
  a.n = out.ndim() == 1 ? int64_t(out.shape(0)) : -1;
  const int device = out.device_id();
  const merge::Input o = merge_input(out, a.n, "out");
  a.out = out.data();
  a.out_type = o.type;
  a.models = int(count);
  for (size_t i = 0; i < count; ++i) {
    check_device(tensors[i], device, "tensors");
    a.x[i] = merge_input(tensors[i], a.n, "tensors");
    const int64_t* r = rules.data() + 7 * i;
    a.rules[i] = merge::Rule{merge_keep(r[0]), uint32_t(r[2]), uint64_t(r[1]), merge::Cut{uint32_t(r[3]), r[4]},
                             merge::Cut{uint32_t(r[5]), r[6]}};
    a.weight[i] = float(weights[i]);
    a.divide_by[i] = float(divide_by[i]);
  }
  if (base) {
    check_device(*base, device, "base");
    a.base = merge_input(*base, a.n, "base");
  }
  a.consensus = consensus;
  a.normalize = normalize;
  a.divisor = float(divisor);
  a.lam = float(lam);
  nb::gil_scoped_release unlocked;
  merge::gpu::sparse_task_apply(a, device, stream_of(stream));
}

}  // namespace
}  // namespace rlgen

NB_MODULE(_native_cuda, m) {
  m.doc() = "rlgen's CUDA kernels: softmax statistics and gradients for log-probs and entropies";
  m.def("softmax_stats", &rlgen::stats, nb::arg("x"), nb::arg("targets"), nb::arg("ignore_index"), nb::arg("col_offset"),
        nb::arg("inv_temperature"), nb::arg("state"), nb::arg("stream"),
        "Fold a segment of each logit row into the running (m, s, t, tz) state (online softmax),\n"
        "enqueued on the CUDA stream `stream` (a cudaStream_t as an integer, 0 for the default stream).");
  m.def("softmax_grad", &rlgen::grad, nb::arg("x"), nb::arg("out"), nb::arg("targets"), nb::arg("ignore_index"),
        nb::arg("col_offset"),
        nb::arg("inv_temperature"), nb::arg("logz"), nb::arg("entropy"), nb::arg("grad_logprob").none(),
        nb::arg("grad_entropy").none(), nb::arg("stream"),
        "Write d(loss)/d(logits) of a segment into `out` (which may be `x`), enqueued on the CUDA\n"
        "stream `stream` (a cudaStream_t as an integer, 0 for the default stream).");
  m.def("sparse_task_apply", &rlgen::sparse_apply, nb::arg("tensors"), nb::arg("base").none(), nb::arg("out"),
        nb::arg("rules"), nb::arg("weights"), nb::arg("divide_by"), nb::arg("consensus"), nb::arg("normalize"),
        nb::arg("divisor"), nb::arg("lam"), nb::arg("stream"),
        "Merge the task vectors of one tensor into `out` given each tensor's resolved rule (keep, threshold, key,\n"
        "hi_v, hi_c, lo_v, lo_c), enqueued on the CUDA stream `stream`.");
}
