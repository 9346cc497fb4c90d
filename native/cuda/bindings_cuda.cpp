// rlgen._native_cuda: Python bindings of the CUDA kernels. Tensors arrive through DLPack (no torch
// headers) and must already be on the GPU; outputs are allocated by torch on the Python side and
// filled here. The kernels are enqueued on the caller's stream, passed as an integer
// (torch.cuda.current_stream().cuda_stream), so the calls return before the GPU has run them, as
// any torch operation does.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::device::cuda>;
using Targets = nb::ndarray<int64_t, nb::ndim<1>, nb::device::cuda>;

namespace rlgen {
namespace {

std::invalid_argument bad(const char* name, const std::string& what) {
  return std::invalid_argument(std::string(name) + ": " + what);
}

// The kernels run on the logits' GPU: every other array must be there too.
template <typename A> void check_device(const A& a, int device, const char* name) {
  if (a.device_id() != device)
    throw bad(name, "on GPU " + std::to_string(a.device_id()) + ", the logits on GPU " + std::to_string(device));
}

DType dtype_of(const Array& a, const char* name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return DType::f32;
  if (dt == nb::dtype<double>()) return DType::f64;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1) return DType::bf16;
  throw bad(name, "expected float32, bfloat16 or float64");
}

DType acc_of(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

Rows rows_of(const Array& a, const char* name) {
  Rows r;
  r.data = a.data();
  r.dtype = dtype_of(a, name);
  if (a.ndim() == 2) {
    r.n_outer = 1;
    r.n_inner = int64_t(a.shape(0));
    r.stride_outer = 0;
    r.stride_inner = a.stride(0);
  } else if (a.ndim() == 3) {
    r.n_outer = int64_t(a.shape(0));
    r.n_inner = int64_t(a.shape(1));
    r.stride_outer = a.stride(0);
    r.stride_inner = a.stride(1);
  } else {
    throw bad(name, "expected a 2-D or 3-D array");
  }
  r.len = int64_t(a.shape(a.ndim() - 1));
  if (r.len > 1 && a.stride(a.ndim() - 1) != 1) throw bad(name, "the last dimension must be contiguous");
  return r;
}

const void* per_row(const Array& a, DType acc, int64_t rows, int device, const char* name) {
  if (a.ndim() != 1 || int64_t(a.shape(0)) != rows || (rows > 1 && a.stride(0) != 1))
    throw bad(name, "expected a contiguous 1-D array with one value per row");
  if (dtype_of(a, name) != acc)
    throw bad(name, "expected the accumulation dtype (float64 for float64 logits, else float32)");
  check_device(a, device, name);
  return a.data();
}

const int64_t* targets_of(const Targets& t, int64_t rows, int device) {
  if (int64_t(t.shape(0)) != rows || (rows > 1 && t.stride(0) != 1))
    throw bad("targets", "expected a contiguous int64 array with one value per row");
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
    throw bad("state", "expected a [4, rows] array of the accumulation dtype");
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
    throw bad("out", "expected the shape and dtype of the logits");
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
}
