// What a decode step hands the router of each row of its logits [B, V] (float32), in two passes
// over the row (ShardModel.top_k; torch's topk and logsumexp took ~0.2 ms of a SmolLM2 step,
// 49152 logits, 2 threads):
//   values, ids  the k largest logits, largest first (equal ones: lower index first);
//   lse, lse_t   log-sum-exp of the row and of the row / t[b].
// A row holding a NaN gets lse NaN (its top k are then not defined here: the caller asks torch).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {
using Vec = at::vec::Vectorized<float>;

// value, index [k]: the row's k largest, sorted by (value descending, index ascending)
void top_k_row(const float* x, int64_t V, int64_t k, float* value, int64_t* index) {
  int64_t filled = 0;
  auto insert = [&](float v, int64_t i) {
    int64_t at = filled < k ? filled++ : k - 1;
    while (at > 0 && v > value[at - 1]) {
      value[at] = value[at - 1];
      index[at] = index[at - 1];
      --at;
    }
    value[at] = v;
    index[at] = i;
  };
  constexpr int64_t W = Vec::size();
  const int64_t vector_end = V / W * W;
  for (int64_t i = 0; i < V; i += (i < vector_end ? W : 1)) {
    if (i < vector_end && filled == k) {  // skip a vector none of whose values enters
      const Vec threshold(value[k - 1]);
      const auto above = Vec::loadu(x + i) > threshold;
      if (above.zero_mask() == (1 << W) - 1) continue;
    }
    const int64_t stop = i < vector_end ? i + W : i + 1;
    for (int64_t j = i; j < stop; ++j)
      if (filled < k || x[j] > value[k - 1]) insert(x[j], j);
  }
}

// log(sum(exp(x / t))), as torch.logsumexp(x / t) computes it: x / t - max(x / t) exponentiated
float log_sum_exp(const float* x, int64_t V, float max, float t) {
  if (std::isinf(max)) return max;  // as torch: -inf (all -inf) or inf
  const float shift = max / t;  // = max(x / t): rounding keeps the order
  const Vec divisor(t), offset(shift);
  const float sum = at::vec::map_reduce_all<float>(
      [&](Vec v) { return (v / divisor - offset).exp(); }, [](Vec a, Vec b) { return a + b; }, x, V);
  return std::log(sum) + shift;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_k_lse(
    const at::Tensor& logits_in, int64_t k, const at::Tensor& temperature_in) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat,
              "top_k_lse: logits must be float32 [B, V], got ", logits_in.sizes(), " ",
              logits_in.scalar_type());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "top_k_lse: k must be 1..", V, ", got ", k);
  TORCH_CHECK(temperature_in.scalar_type() == at::kFloat && temperature_in.numel() == B,
              "top_k_lse: temperature must be float32 [", B, "]");
  const auto logits = logits_in.contiguous(), temperature = temperature_in.contiguous();
  auto values = at::empty({B, k}, logits.options());
  auto ids = at::empty({B, k}, logits.options().dtype(at::kLong));
  auto lse = at::empty({B}, logits.options()), lse_t = at::empty({B}, logits.options());
  const float* t = temperature.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = logits.data_ptr<float>() + b * V;
      const float max = at::vec::reduce_all<float>(
          [](Vec a, Vec c) { return at::vec::maximum(a, c); }, x, V);  // NaN if any
      float* value = values.data_ptr<float>() + b * k;
      top_k_row(x, V, k, value, ids.data_ptr<int64_t>() + b * k);
      const float plain = std::isnan(max) ? max : log_sum_exp(x, V, max, 1.0f);
      lse.data_ptr<float>()[b] = plain;
      lse_t.data_ptr<float>()[b] = t[b] == 1.0f || std::isnan(max) ? plain : log_sum_exp(x, V, max, t[b]);
    }
  });
  return {values, ids, lse, lse_t};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(cpumesh_kernels, m) {
  m.def("top_k_lse(Tensor logits, int k, Tensor temperature) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(cpumesh_kernels, CPU, m) { m.impl("top_k_lse", &top_k_lse); }
