// Decode attention over the KV cache as it is stored: one query token per row, the G query
// heads of each KV head together, every row's history read in place through its slot index
// (no gathered copy of K and V), the history split into chunks so that every core works even
// at batch 1, the chunks combined by their log-sum-exp. float32 arithmetic throughout; K, V
// and q in the cache's dtype (float32, bfloat16 or float16), at::vec for the vector ISA the
// build names (shard_svc/decode_attention.py builds it with inductor's flags).
//
//   out[b, h, g] = softmax_t(scale * q[b, h, g] . K[h, index[b, t]]) @ V[h, index[b, t]]
//   over t < lengths[b];  q, out: [B, Hkv, G, D];  K, V: [Hkv, slots, D];  index: [B, L]
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kTile = 4;       // query heads per work item (their accumulators in registers)
constexpr int64_t kMaxChunk = 512;  // history tokens per work item at most
// head_dim / Vec::size() compiled for (D = 16 ... 128 on AVX-512, 8 ... 128 on AVX2, 80, 96)
constexpr int64_t kVectors[] = {1, 2, 4, 5, 6, 8, 10, 12, 16};

template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, Vec::size()));
  }
}

// One work item: GT query heads (q, scaled, float [GT, NV * W]) over n history tokens.
// Writes each head's max score m, sum of exp l and unnormalized output acc [GT, D].
template <typename T, int NV, int GT>
void attend_chunk(const float* q, const T* k, const T* v, int64_t k_row, int64_t v_row,
                  const int64_t* slots, int64_t n, float* s, float* m, float* l, float* acc) {
  constexpr int64_t W = Vec::size();
  Vec qv[GT][NV];
  for (int g = 0; g < GT; ++g)
    for (int j = 0; j < NV; ++j) qv[g][j] = Vec::loadu(q + (g * NV + j) * W);
  float top[GT];
  std::fill(top, top + GT, -std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < n; ++t) {  // scores: each key read once for the GT heads
    const T* key = k + slots[t] * k_row;
    Vec kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = load_float(key + j * W);
    for (int g = 0; g < GT; ++g) {
      Vec dot = qv[g][0] * kv[0];
      for (int j = 1; j < NV; ++j) dot = at::vec::fmadd(qv[g][j], kv[j], dot);
      const float x = at::vec::vec_reduce_all<float>(std::plus<Vec>(), dot);
      s[g * n + t] = x;
      top[g] = std::max(top[g], x);
    }
  }
  for (int g = 0; g < GT; ++g) {  // s := exp(s - max), l := its sum
    float* sg = s + g * n;
    const Vec vtop(top[g]);
    Vec vsum(0.f);
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const Vec e = (Vec::loadu(sg + i) - vtop).exp_u20();
      e.store(sg + i);
      vsum = vsum + e;
    }
    float sum = at::vec::vec_reduce_all<float>(std::plus<Vec>(), vsum);
    for (; i < n; ++i) {
      sg[i] = std::exp(sg[i] - top[g]);
      sum += sg[i];
    }
    m[g] = top[g];
    l[g] = sum;
  }
  Vec a[GT][NV];
  for (int g = 0; g < GT; ++g)
    for (int j = 0; j < NV; ++j) a[g][j] = Vec(0.f);
  for (int64_t t = 0; t < n; ++t) {  // values: each read once for the GT heads
    const T* value = v + slots[t] * v_row;
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = load_float(value + j * W);
    for (int g = 0; g < GT; ++g) {
      const Vec p(s[g * n + t]);
      for (int j = 0; j < NV; ++j) a[g][j] = at::vec::fmadd(p, vv[j], a[g][j]);
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int j = 0; j < NV; ++j) a[g][j].store(acc + (g * NV + j) * W);
}

template <typename T, int NV>
using ChunkFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, const int64_t*,
                         int64_t, float*, float*, float*, float*);

template <typename T, int NV>
ChunkFn<T, NV> chunk_fn(int64_t gt) {
  switch (gt) {
    case 1: return attend_chunk<T, NV, 1>;
    case 2: return attend_chunk<T, NV, 2>;
    case 3: return attend_chunk<T, NV, 3>;
    default: return attend_chunk<T, NV, 4>;
  }
}

template <typename T, int NV>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& index, const int64_t* len, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), L = index.size(1);
  const int64_t slots = k.size(1), tiles = (G + kTile - 1) / kTile;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* ip = index.data_ptr<int64_t>();
  int64_t most = 1;
  for (int64_t b = 0; b < B; ++b) most = std::max(most, len[b]);
  // chunks per (row, head, tile): at least 4 work items per thread where the history allows
  const int64_t want = (4 * at::get_num_threads() + B * H * tiles - 1) / (B * H * tiles);
  const int64_t chunk = std::clamp<int64_t>((most + want - 1) / want, 64, kMaxChunk);
  const int64_t C = (most + chunk - 1) / chunk, items = B * H * tiles * C;
  std::vector<float> m(items * kTile, -std::numeric_limits<float>::infinity());
  std::vector<float> l(items * kTile, 0.f), acc(items * kTile * D, 0.f);
  std::atomic<bool> in_range{true};
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(kTile * D), s(kTile * chunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % C, tile = item / C % tiles, h = item / (C * tiles) % H;
      const int64_t b = item / (C * tiles * H);
      const int64_t t0 = c * chunk, t1 = std::min(len[b], t0 + chunk);
      const int64_t g0 = tile * kTile, gt = std::min(kTile, G - g0);
      if (t0 >= t1) continue;
      const int64_t* row = ip + b * L + t0;
      if (!std::all_of(row, row + (t1 - t0), [&](int64_t x) { return x >= 0 && x < slots; })) {
        in_range = false;
        continue;
      }
      const T* qh = qp + ((b * H + h) * G + g0) * D;
      for (int64_t i = 0; i < gt * D; ++i) qf[i] = static_cast<float>(qh[i]) * static_cast<float>(scale);
      chunk_fn<T, NV>(gt)(qf.data(), kp + h * k.stride(0), vp + h * v.stride(0), k.stride(1),
                          v.stride(1), row, t1 - t0, s.data(), m.data() + item * kTile,
                          l.data() + item * kTile, acc.data() + item * kTile * D);
    }
  });
  TORCH_CHECK(in_range.load(), "decode_attention: a slot index outside the cache's ", slots,
              " slots");
  T* op = out.data_ptr<T>();
  std::vector<float> o(D);
  for (int64_t bh = 0; bh < B * H; ++bh) {  // combine each head's chunks
    for (int64_t g = 0; g < G; ++g) {
      const int64_t tile = g / kTile, gi = g % kTile;
      auto at = [&](int64_t c) { return (bh * tiles + tile) * C + c; };
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t c = 0; c < C; ++c) top = std::max(top, m[at(c) * kTile + gi]);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = at(c) * kTile + gi;
        if (l[i] == 0.f) continue;
        const float w = std::exp(m[i] - top);
        total += w * l[i];
        for (int64_t d = 0; d < D; ++d) o[d] += w * acc[i * D + d];
      }
      for (int64_t d = 0; d < D; ++d) op[(bh * G + g) * D + d] = static_cast<T>(o[d] / total);
    }
  }
}

template <typename T>
void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& index, const int64_t* len, double scale, at::Tensor& out) {
  switch (q.size(3) / Vec::size()) {  // the head sizes of VECTORS (below)
    case 1: return attend<T, 1>(q, k, v, index, len, scale, out);
    case 2: return attend<T, 2>(q, k, v, index, len, scale, out);
    case 4: return attend<T, 4>(q, k, v, index, len, scale, out);
    case 5: return attend<T, 5>(q, k, v, index, len, scale, out);
    case 6: return attend<T, 6>(q, k, v, index, len, scale, out);
    case 8: return attend<T, 8>(q, k, v, index, len, scale, out);
    case 10: return attend<T, 10>(q, k, v, index, len, scale, out);
    case 12: return attend<T, 12>(q, k, v, index, len, scale, out);
    case 16: return attend<T, 16>(q, k, v, index, len, scale, out);
  }
}
}  // namespace

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& index_in, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 3 && v.dim() == 3 && index_in.dim() == 2,
              "decode_attention: q [B, Hkv, G, D], k and v [Hkv, slots, D], index [B, L]");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3);
  TORCH_CHECK(k.size(0) == H && v.size(0) == H && k.size(2) == D && v.size(2) == D &&
                  v.size(1) == k.size(1) && k.stride(2) == 1 && v.stride(2) == 1,
              "decode_attention: k and v must be [Hkv, slots, D] with unit stride in D");
  TORCH_CHECK(k.scalar_type() == q_in.scalar_type() && v.scalar_type() == q_in.scalar_type(),
              "decode_attention: q, k and v of one dtype");
  const int64_t vecs = D / Vec::size();
  TORCH_CHECK(D % Vec::size() == 0 && std::find(std::begin(kVectors), std::end(kVectors), vecs) !=
                                          std::end(kVectors),
              "decode_attention: head_dim ", D, " is not 1, 2, 4, 5, 6, 8, 10, 12 or 16 vectors "
              "of ", Vec::size(), " floats");
  TORCH_CHECK(index_in.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  index_in.size(0) == B && lengths.numel() == B,
              "decode_attention: index int64 [B, L], lengths int64 [B]");
  const auto q = q_in.contiguous();
  const auto index = index_in.contiguous();
  const auto len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= index.size(1), "decode_attention: row ", b,
                " has length ", lp[b], ", not 1..", index.size(1));
  auto out = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] { dispatch<scalar_t>(q, k, v, index, lp, scale, out); });
  return out;
}

TORCH_LIBRARY(cpumesh_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor index, Tensor lengths, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpumesh_kernels, CPU, m) { m.impl("decode_attention", &decode_attention); }
