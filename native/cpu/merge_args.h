// Reading the merge kernels' arguments from DLPack arrays (nanobind ndarrays), shared by the CPU and
// CUDA bindings: flat fp32 / bf16 / fp16 arrays and the per-model rule rows of rlgen/merging/kernels.py.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include "array_args.h"
#include "merge_kernels.h"

namespace rlgen {

// A contiguous 1-D array of n fp32 / bf16 / fp16 entries.
template <typename A> merge::Input merge_input(const A& a, int64_t n, const char* name) {
  namespace nb = nanobind;
  namespace dl = nanobind::dlpack;
  if (a.ndim() != 1 || int64_t(a.shape(0)) != n || (n > 1 && a.stride(0) != 1))
    throw bad_arg(name, "expected a contiguous 1-D array of " + std::to_string(n) + " entries");
  const dl::dtype dt = a.dtype();
  merge::ElemType type;
  if (dt == nb::dtype<float>()) type = merge::ElemType::f32;
  else if (dt.code == uint8_t(dl::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1) type = merge::ElemType::bf16;
  else if (dt.code == uint8_t(dl::dtype_code::Float) && dt.bits == 16 && dt.lanes == 1) type = merge::ElemType::f16;
  else throw bad_arg(name, "expected float32, bfloat16 or float16");
  return merge::Input{a.data(), type};
}

inline merge::Keep merge_keep(int64_t code) {
  if (code < 0 || code > int64_t(merge::Keep::band)) throw bad_arg("rules", "unknown keep rule " + std::to_string(code));
  return merge::Keep(code);
}

}  // namespace rlgen
