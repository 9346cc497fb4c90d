// Host entry points of the CUDA softmax kernels: the same two operations as the CPU kernels, with
// the same arguments (StatsArgs / GradArgs of native/cpu/kernels.h, whose `threads` is ignored
// here) and the same results up to float rounding. All pointers are device pointers.
//
// The launchers only enqueue work on `stream`: nothing is synchronised, and errors of the kernels
// themselves surface at the caller's next synchronisation, as with any torch operation. Launch
// errors throw std::runtime_error.
#pragma once
#include "kernels.h"

// cudaStream_t is `CUstream_st*`; declaring it here keeps the CUDA headers out of the bindings.
struct CUstream_st;

namespace rlgen {
namespace gpu {

using Stream = CUstream_st*;

// `device`: the CUDA device holding the arrays (and owning `stream`); made current for the launch.
void softmax_stats(const StatsArgs& args, int device, Stream stream);
void softmax_grad(const GradArgs& args, int device, Stream stream);

}  // namespace gpu
}  // namespace rlgen
