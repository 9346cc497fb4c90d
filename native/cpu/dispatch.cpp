// Run-time choice of the CPU kernel variant: the widest instruction set that was compiled in and
// that the running CPU supports, unless RLGEN_CPU_ISA (or set_isa) asks for a narrower one.
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"

namespace rlgen {

namespace {

struct Variant {
  const char* name;
  int64_t (*forward)(const ForwardArgs&);
  int64_t (*stats)(const StatsArgs&);
  void (*grad)(const GradArgs&);
  double (*read_sum)(const float*, int64_t, int);
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() { __builtin_cpu_init(); return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

const std::vector<Variant>& compiled() {
  static const std::vector<Variant> variants = {
#if defined(RLGEN_HAVE_avx512)
      {"avx512", cpu_avx512::logprob_forward, cpu_avx512::softmax_stats, cpu_avx512::softmax_grad, cpu_avx512::read_sum, has_avx512},
#endif
#if defined(RLGEN_HAVE_avx2)
      {"avx2", cpu_avx2::logprob_forward, cpu_avx2::softmax_stats, cpu_avx2::softmax_grad, cpu_avx2::read_sum, has_avx2},
#endif
      {"base", cpu_base::logprob_forward, cpu_base::softmax_stats, cpu_base::softmax_grad, cpu_base::read_sum, always},
  };
  return variants;
}

const Variant* pick(const std::string& wanted) {
  for (const auto& v : compiled())
    if (v.supported() && (wanted.empty() || wanted == v.name)) return &v;
  return nullptr;
}

const Variant*& active() {
  static const Variant* chosen = [] {
    const char* env = std::getenv("RLGEN_CPU_ISA");
    const Variant* v = env ? pick(env) : nullptr;
    return v ? v : pick("");
  }();
  return chosen;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const auto& v : compiled())
    if (v.supported()) names.push_back(v.name);
  return names;
}

std::string active_isa() { return active()->name; }

void set_isa(const std::string& name) {
  const Variant* v = pick(name);
  if (!v) throw std::invalid_argument("CPU kernel variant '" + name + "' is not available on this machine");
  active() = v;
}

int64_t logprob_forward(const ForwardArgs& args) { return active()->forward(args); }
int64_t softmax_stats(const StatsArgs& args) { return active()->stats(args); }
void softmax_grad(const GradArgs& args) { active()->grad(args); }
double read_sum(const float* data, int64_t n, int threads) { return active()->read_sum(data, n, threads); }

}  // namespace rlgen
