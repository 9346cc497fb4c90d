// rlgen._native: Python bindings of the CPU kernels. Tensors arrive through DLPack (no torch
// headers); outputs are allocated by torch on the Python side and filled here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>

#include "array_args.h"
#include "dispatch.h"
#include "merge_args.h"
#include "merge_kernels.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::device::cpu>;
using Targets = nb::ndarray<int64_t, nb::ndim<1>, nb::device::cpu>;

namespace rlgen {
namespace {

const void* per_row(const Array& a, DType acc, int64_t rows, const char* name) {
  check_per_row(a, acc, rows, name);
  return a.data();
}

int64_t forward(Array x, Targets targets, int64_t ignore_index, double inv_t, Array logprob, Array entropy, Array logz,
                int threads) {
  ForwardArgs a;
  a.x = rows_of(x, "logits");
  const int64_t rows = a.x.rows();
  const DType acc = acc_of(a.x.dtype);
  check_targets(targets, rows);
  a.targets = targets.data();
  a.ignore_index = ignore_index;
  a.inv_temperature = inv_t;
  a.logprob = const_cast<void*>(per_row(logprob, acc, rows, "logprob"));
  a.entropy = const_cast<void*>(per_row(entropy, acc, rows, "entropy"));
  a.logz = const_cast<void*>(per_row(logz, acc, rows, "logz"));
  a.threads = threads;
  nb::gil_scoped_release unlocked;
  return logprob_forward(a);
}

int64_t stats(Array x, Targets targets, int64_t ignore_index, int64_t vocab, int64_t col_offset, double inv_t,
              Array state, int threads) {
  StatsArgs a;
  a.x = rows_of(x, "logits");
  const int64_t rows = a.x.rows();
  check_targets(targets, rows);
  a.targets = targets.data();
  a.ignore_index = ignore_index;
  a.vocab = vocab;
  a.col_offset = col_offset;
  a.inv_temperature = inv_t;
  if (state.ndim() != 2 || state.shape(0) != 4 || int64_t(state.shape(1)) != rows ||
      (rows > 1 && state.stride(1) != 1) || dtype_of(state, "state") != acc_of(a.x.dtype))
    throw bad_arg("state", "expected a [4, rows] array of the accumulation dtype");
  a.state = state.data();
  a.state_stride = state.stride(0);
  a.threads = threads;
  nb::gil_scoped_release unlocked;
  return softmax_stats(a);
}

void grad(Array x, Array out, Targets targets, int64_t ignore_index, int64_t col_offset, double inv_t, Array logz, Array entropy, std::optional<Array> grad_logprob, std::optional<Array> grad_entropy,
          int threads) {
  GradArgs a;
  a.x = rows_of(x, "logits");
  a.out = rows_of(out, "out");
  const int64_t rows = a.x.rows();
  if (a.out.dtype != a.x.dtype || a.out.rows() != rows || a.out.len != a.x.len || a.out.n_inner != a.x.n_inner)
    throw bad_arg("out", "expected the shape and dtype of the logits");
  const DType acc = acc_of(a.x.dtype);
  check_targets(targets, rows);
  a.targets = targets.data();
  a.ignore_index = ignore_index;
  a.col_offset = col_offset;
  a.inv_temperature = inv_t;
  a.logz = per_row(logz, acc, rows, "logz");
  a.entropy = per_row(entropy, acc, rows, "entropy");
  a.grad_logprob = grad_logprob ? per_row(*grad_logprob, acc, rows, "grad_logprob") : nullptr;
  a.grad_entropy = grad_entropy ? per_row(*grad_entropy, acc, rows, "grad_entropy") : nullptr;
  a.threads = threads;
  nb::gil_scoped_release unlocked;
  softmax_grad(a);
}

double read_sum_py(nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu> x, int threads) {
  const float* data = x.data();
  const int64_t n = int64_t(x.shape(0));
  nb::gil_scoped_release unlocked;
  return read_sum(data, n, threads);
}

// --- merges (merge_kernels.h) -----------------------------------------------------------------------

// rule: (keep, a, b, key) as merge::ModelSpec documents.
merge::ModelSpec merge_model(const Array& x, int64_t n, const int64_t* rule, double weight, double divide_by) {
  merge::ModelSpec m;
  m.x = merge_input(x, n, "tensors");
  m.keep = merge_keep(rule[0]);
  m.a = rule[1];
  m.b = rule[2];
  m.key = uint32_t(rule[3]);
  const bool counts_ok = m.keep == merge::Keep::top ? (m.a > 0 && m.a < n)
                         : m.keep == merge::Keep::band ? (m.a >= 0 && m.a < m.b && m.b <= n)
                         : m.keep == merge::Keep::random ? (m.a >= 0 && m.a <= (int64_t(1) << 32))
                                                          : true;
  if (!counts_ok) throw bad_arg("rules", "counts out of range for " + std::to_string(n) + " entries");
  m.weight = float(weight);
  m.divide_by = float(divide_by);
  return m;
}

void sparse_merge(std::vector<Array> tensors, std::optional<Array> base, Array out, std::vector<int64_t> rules,
                  std::vector<double> weights, std::vector<double> divide_by, bool consensus, bool normalize,
                  double divisor, double lam, int threads) {
  merge::SparseMergeArgs a;
  const size_t count = tensors.size();
  if (count == 0) throw bad_arg("tensors", "expected at least one array");
  if (rules.size() != 4 * count || weights.size() != count || divide_by.size() != count)
    throw bad_arg("rules", "expected 4 rule values, a weight and a divisor per tensor");
  a.n = out.ndim() == 1 ? int64_t(out.shape(0)) : -1;
  const merge::Input o = merge_input(out, a.n, "out");
  a.out = out.data();
  a.out_type = o.type;
  for (size_t i = 0; i < count; ++i)
    a.models.push_back(merge_model(tensors[i], a.n, rules.data() + 4 * i, weights[i], divide_by[i]));
  if (base) a.base = merge_input(*base, a.n, "base");
  a.consensus = consensus;
  a.normalize = normalize;
  a.divisor = float(divisor);
  a.lam = float(lam);
  a.threads = std::max(1, threads);
  nb::gil_scoped_release unlocked;
  merge::sparse_task_merge(a);
}

void sparse_keep_mask(Array x, std::optional<Array> base, Array out, std::vector<int64_t> rule, int threads) {
  const int64_t n = out.ndim() == 1 ? int64_t(out.shape(0)) : -1;
  const nb::dlpack::dtype dt = out.dtype();
  if (n < 0 || (n > 1 && out.stride(0) != 1) || dt.bits != 8 || dt.lanes != 1 ||
      (dt.code != uint8_t(nb::dlpack::dtype_code::Bool) && dt.code != uint8_t(nb::dlpack::dtype_code::UInt)))
    throw bad_arg("out", "expected a contiguous 1-D bool array");
  if (rule.size() != 4) throw bad_arg("rule", "expected (keep, a, b, key)");
  const merge::ModelSpec m = merge_model(x, n, rule.data(), 1.0, 1.0);
  const merge::Input b = base ? merge_input(*base, n, "base") : merge::Input{};
  bool* mask = static_cast<bool*>(out.data());
  nb::gil_scoped_release unlocked;
  merge::keep_mask(n, m, b, mask, std::max(1, threads));
}

}  // namespace
}  // namespace rlgen

NB_MODULE(_native, m) {
  m.doc() = "rlgen's CPU kernels: softmax statistics and gradients for log-probs and entropies";
  m.def("logprob_forward", &rlgen::forward, nb::arg("x"), nb::arg("targets"), nb::arg("ignore_index"),
        nb::arg("inv_temperature"), nb::arg("logprob"), nb::arg("entropy"), nb::arg("logz"), nb::arg("threads"),
        "Log-prob, entropy and log-normaliser of whole logit rows in one pass; returns the number of bad targets.");
  m.def("softmax_stats", &rlgen::stats, nb::arg("x"), nb::arg("targets"), nb::arg("ignore_index"), nb::arg("vocab"),
        nb::arg("col_offset"), nb::arg("inv_temperature"), nb::arg("state"), nb::arg("threads"),
        "Fold a segment of each logit row into the running (m, s, t, tz) state (online softmax); returns the "
        "number of bad targets (counted when col_offset == 0).");
  m.def("softmax_grad", &rlgen::grad, nb::arg("x"), nb::arg("out"), nb::arg("targets"), nb::arg("ignore_index"),
        nb::arg("col_offset"),
        nb::arg("inv_temperature"), nb::arg("logz"), nb::arg("entropy"), nb::arg("grad_logprob").none(),
        nb::arg("grad_entropy").none(), nb::arg("threads"),
        "Write d(loss)/d(logits) of a segment into `out` (which may be `x`).");
  m.def("read_sum", &rlgen::read_sum_py, nb::arg("x"), nb::arg("threads"),
        "Sum a float32 array: the memory read-bandwidth probe of bench/logprob.py.");
  m.def("sparse_task_merge", &rlgen::sparse_merge, nb::arg("tensors"), nb::arg("base").none(), nb::arg("out"),
        nb::arg("rules"), nb::arg("weights"), nb::arg("divide_by"), nb::arg("consensus"), nb::arg("normalize"),
        nb::arg("divisor"), nb::arg("lam"), nb::arg("threads"),
        "Merge the task vectors of one tensor into `out` (rlgen/merging/kernels.py: sparse_task_merge); rules holds\n"
        "(keep, a, b, key) per tensor.");
  m.def("sparse_keep_mask", &rlgen::sparse_keep_mask, nb::arg("x"), nb::arg("base").none(), nb::arg("out"),
        nb::arg("rule"), nb::arg("threads"), "Write one model's keep mask under `rule` (keep, a, b, key) into `out`.");
  m.def("available_isas", &rlgen::available_isas, "Compiled CPU variants this CPU can run, widest first.");
  m.def("active_isa", &rlgen::active_isa, "The CPU variant in use.");
  m.def("set_isa", &rlgen::set_isa, nb::arg("name"), "Use another available CPU variant (tests, benchmarks).");
  m.attr("openmp") =
#if defined(RLGEN_OPENMP)
      true;
#else
      false;
#endif
}
