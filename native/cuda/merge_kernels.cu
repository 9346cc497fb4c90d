// The element-wise half of the sparse task-vector merges on the GPU (native/cpu/merge_kernels.h has
// the semantics): every model's rule arrives resolved (DARE thresholds, magnitude cut points found
// with torch), so one grid-stride kernel reads each model's entry, applies its rule, elects the sign
// and writes base + lam * merged in the output dtype. With consensus the models' taus are computed
// twice (sum, then agreement) rather than kept: up to kMaxModels of them, read through the cache.
//
// merge_value() is __host__ __device__: native/cuda/tests/merge_host_emulation.cu runs it on the host.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "merge_kernels.h"

namespace rlgen {
namespace merge {
namespace gpu {

RLGEN_MERGE_HD float model_tau(const ApplyArgs& p, int i, float base, int64_t j) {
  const float d = load(p.x[i], j) - base;
  return keeps(p.rules[i], d, j) ? p.weight[i] * (d / p.divide_by[i]) : 0.0f;
}

// base + lam * merged at entry j, in float32 (same operation order as the CPU kernel).
RLGEN_MERGE_HD float merge_value(const ApplyArgs& p, int64_t j) {
  const float base = load(p.base, j);
  float acc = 0.0f;
  if (!p.consensus) {
    for (int i = 0; i < p.models; ++i) acc += model_tau(p, i, base, j);
    if (p.normalize) acc /= p.divisor;
  } else {
    float total = 0.0f, weights = 0.0f;
    for (int i = 0; i < p.models; ++i) total += model_tau(p, i, base, j);
    for (int i = 0; i < p.models; ++i) {
      const float tau = model_tau(p, i, base, j);
      const bool agree = total >= 0.0f ? tau > 0.0f : tau < 0.0f;  // a zero never agrees
      acc += agree ? tau : 0.0f;
      weights += agree ? p.weight[i] : 0.0f;
    }
    if (p.normalize) acc /= weights == 0.0f ? 1.0f : weights;
  }
  return base + p.lam * acc;
}

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) apply_kernel(const ApplyArgs p) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < p.n; j += step)
    store(p.out, p.out_type, j, merge_value(p, j));
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("rlgen CUDA merge kernel: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

void sparse_task_apply(const ApplyArgs& args, int device, CUstream_st* stream) {
  if (args.n <= 0) return;
  if (args.models < 1 || args.models > kMaxModels) throw std::runtime_error("sparse_task_apply: bad model count");
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t wanted = (args.n + kThreads - 1) / kThreads;
  const int blocks = int(std::min<int64_t>(wanted, int64_t(std::max(sms, 1)) * 16));  // grid-stride beyond
  int previous = 0;  // the arrays' device is made current for the launch, then restored
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  apply_kernel<<<blocks, kThreads, 0, stream>>>(args);
  const cudaError_t launched = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check(launched, "sparse_task_apply launch");
}

}  // namespace gpu
}  // namespace merge
}  // namespace rlgen
