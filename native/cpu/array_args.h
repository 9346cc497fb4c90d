// Reading kernel arguments from DLPack arrays (nanobind ndarrays), shared by the CPU and CUDA
// bindings: dtype, the 2-D / 3-D row view of logits, per-row vectors and targets, each checked with
// an error that names the argument.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace rlgen {

inline std::invalid_argument bad_arg(const char* name, const std::string& what) {
  return std::invalid_argument(std::string(name) + ": " + what);
}

template <typename A> DType dtype_of(const A& a, const char* name) {
  namespace nb = nanobind;
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return DType::f32;
  if (dt == nb::dtype<double>()) return DType::f64;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1) return DType::bf16;
  throw bad_arg(name, "expected float32, bfloat16 or float64");
}

inline DType acc_of(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

// [rows, V] or [B, T, V] with any outer strides and a contiguous last dimension.
template <typename A> Rows rows_of(const A& a, const char* name) {
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
    throw bad_arg(name, "expected a 2-D or 3-D array");
  }
  r.len = int64_t(a.shape(a.ndim() - 1));
  if (r.len > 1 && a.stride(a.ndim() - 1) != 1) throw bad_arg(name, "the last dimension must be contiguous");
  return r;
}

// A contiguous 1-D array of the accumulation dtype with one value per row.
template <typename A> void check_per_row(const A& a, DType acc, int64_t rows, const char* name) {
  if (a.ndim() != 1 || int64_t(a.shape(0)) != rows || (rows > 1 && a.stride(0) != 1))
    throw bad_arg(name, "expected a contiguous 1-D array with one value per row");
  if (dtype_of(a, name) != acc)
    throw bad_arg(name, "expected the accumulation dtype (float64 for float64 logits, else float32)");
}

template <typename T> void check_targets(const T& t, int64_t rows) {
  if (int64_t(t.shape(0)) != rows || (rows > 1 && t.stride(0) != 1))
    throw bad_arg("targets", "expected a contiguous int64 array with one value per row");
}

}  // namespace rlgen
