#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace rlgen {

std::vector<std::string> available_isas();  // widest first
std::string active_isa();
void set_isa(const std::string& name);

int64_t logprob_forward(const ForwardArgs& args);
int64_t softmax_stats(const StatsArgs& args);
void softmax_grad(const GradArgs& args);
double read_sum(const float* data, int64_t n, int threads);

}  // namespace rlgen
