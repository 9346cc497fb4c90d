// rlgen._native: Python bindings of the CPU kernels. Tensors arrive through DLPack (no torch
// headers); outputs are allocated by torch on the Python side and filled here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "array_args.h"
#include "dispatch.h"

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
