// Weight-only matrix products in groups of 32 inputs for decode: y = x @ W.T with
// W[n, k] = q[n, k] * s[n, g] + o[n, g] (g = k / 32), in cpumesh's blocked layouts, 16 rows a
// block, a block's codes one run of memory (quant.block_int4 / quant_groups.block_int8_groups):
//   int4_linear_blocked  q in 0..15, uint8 [N / 16, K / 32, 4, 2, 16, 2]: for each group, four
//      runs of 8 inputs, each two halves of 32 bytes; in run c, half t, row r's 2 bytes e hold
//      input c*8 + t*2 + e (low nibble) and c*8 + 4 + t*2 + e (high nibble).
//   int8_linear_grouped  q in 0..255, uint8 [N / 16, K / 32, 16, 16, 2]: for each group, 16
//      pairs of inputs, in pair p row r's 2 bytes e hold input p*2 + e.
// Either way a run of 32 codes widened to 16 bits is the 16 rows' pairs of inputs, a vector's
// 32-bit lanes, so no output needs a horizontal sum.
//   s  [N / 16, K / 32, P, 16] in x's dtype or float16: each group's 16 scales, then (P = 2)
//      its 16 offsets. int8 also takes P = 1, float16 scales alone, each offset -128 times its
//      scale: GGUF Q8_0 (w = d * q8 is q = q8 + 128, s = d, o = -128 d) in 34 bytes per 32
//      weights instead of 36.
//
// Each row of x is rounded to int16 with one scale (x ≈ xq * sx, as cpumesh's int8 kernel: 15
// bits of the row's largest input; 8-bit inputs per group, llama.cpp's way, cost SmolLM2 6 % of
// perplexity over 48 tokens), and
//   y[m, n] = sum_g (s[n, g] * sx[m] * sum_{k in g} q[n, k] * xq[m, k] + o[n, g] * sx[m] * sum_{k in g} xq[m, k])
// The integer dot products are exact: 16-bit pairs summed into 32-bit lanes (AVX-512 VNNI
// `vpdpwssd`, else `vpmaddwd` + add), 32 per group (255 * 32767 * 32 < 2^31); each group's sum
// is scaled into a float32 total. A thread takes a range of blocks; for one row of x (decode)
// int8 codes are read as 4 streams in step (dot_streams), else block by block, up to 4 rows
// of x a pass (dot_block).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {
using FVec = at::vec::Vectorized<float>;
constexpr int64_t kRows = 16;  // rows per block
constexpr int64_t kGroup = 32;  // inputs per group: one scale and one offset per row
constexpr int64_t kTile = 4;  // rows of x per pass over a block
constexpr float kLevels = 32767.0f;

template <typename T>
inline FVec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return FVec::loadu(p);
  } else {
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, FVec::size()));
  }
}

#if defined(__AVX512BW__)
inline __m512i dot2(__m512i acc, __m512i w, __m512i x) {  // acc += 2 int16 products per lane
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
inline __m512i widen(__m256i v) { return _mm512_cvtepu8_epi16(v); }
#elif defined(__AVX2__)
inline __m256i dot2(__m256i acc, __m256i w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
}
inline __m256i widen(__m128i v) { return _mm256_cvtepu8_epi16(v); }
#else
#error "group_linear needs AVX2 or AVX-512 (built with the flags of inductor's vector ISA)"
#endif

// The rows of x as int16 (rounded to nearest), each row's scale, and the scale times each
// group's sum of codes (what the group's offsets multiply). A row holding a NaN or an infinity
// gets scale NaN, so its outputs are NaN, as a float product's.
struct Activations {
  std::vector<int16_t> xq;  // [M, K]
  std::vector<float> sx;  // [M]
  std::vector<float> sums;  // [M, K / 32]
  int64_t K, groups;
  const int16_t* row(int64_t m) const { return xq.data() + m * K; }
};

template <typename T>
Activations quantize(const T* x, int64_t M, int64_t K) {
  const int64_t groups = K / kGroup;
  Activations a{std::vector<int16_t>(M * K), std::vector<float>(M),
                std::vector<float>(M * groups), K, groups};
  for (int64_t m = 0; m < M; ++m) {
    const T* in = x + m * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float mag = std::abs(float(in[k]));
      amax = std::isnan(mag) || mag > amax ? mag : amax;
    }
    int16_t* out = a.xq.data() + m * K;
    if (!std::isfinite(amax)) {
      std::fill(out, out + K, int16_t(0));
      a.sx[m] = std::numeric_limits<float>::quiet_NaN();
      std::fill(a.sums.begin() + m * groups, a.sums.begin() + (m + 1) * groups, a.sx[m]);
      continue;
    }
    const float inv = amax > 0.0f ? kLevels / amax : 0.0f;
    a.sx[m] = amax / kLevels;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t i = g * kGroup; i < (g + 1) * kGroup; ++i) {
        out[i] = int16_t(std::nearbyint(float(in[i]) * inv));
        sum += out[i];
      }
      a.sums[m * groups + g] = a.sx[m] * float(sum);
    }
  }
  return a;
}

inline int32_t pair(const int16_t* p) {  // two int16 inputs as one 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A block's codes for one group of 32 inputs.
template <int Bits>
constexpr int64_t group_bytes() { return kRows * kGroup * Bits / 8; }

// Group g's 16 scales and offsets, h-th vector of them: P parts per group (see above).
template <int P, typename S>
inline std::pair<FVec, FVec> scale_offset(const S* s, int64_t g, int64_t h) {
  constexpr int64_t W = FVec::size();
  const S* sg = s + g * P * kRows + h * W;
  const FVec scale = load_float(sg);
  if constexpr (P == 2) {
    return {scale, load_float(sg + kRows)};
  } else {
    return {scale, scale * FVec(-128.0f)};  // exact: a power of two
  }
}

// out[m * 16 + r] = row r of the block (16 rows, every group) times row m of x, for MT rows.
template <int Bits, int MT, int P, typename S>
void dot_block(const Activations& a, int64_t m0, const uint8_t* q, const S* s, float* out) {
  constexpr int64_t W = FVec::size();  // 16 (AVX-512) or 8 (AVX2) rows per float vector
  constexpr int64_t H = kRows / W;
  FVec total[MT][H];
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < H; ++h) total[m][h] = FVec(0.0f);
  for (int64_t g = 0; g < a.groups; ++g) {
    const uint8_t* codes = q + g * group_bytes<Bits>();
#if defined(__AVX512BW__)
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512i acc[MT][1];
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_setzero_si512();
    if constexpr (Bits == 8) {  // a 64-byte run holds pairs 2c and 2c + 1
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(codes + c * 64);
        const __m512i w0 = widen(_mm512_castsi512_si256(v)), w1 = widen(_mm512_extracti64x4_epi64(v, 1));
        for (int m = 0; m < MT; ++m) {
          const int16_t* xg = a.row(m0 + m) + g * kGroup + c * 4;
          acc[m][0] = dot2(acc[m][0], w0, _mm512_set1_epi32(pair(xg)));
          acc[m][0] = dot2(acc[m][0], w1, _mm512_set1_epi32(pair(xg + 2)));
        }
      }
    } else for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(codes + c * 64);
      const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      const __m512i w[4] = {widen(_mm512_castsi512_si256(lo)), widen(_mm512_extracti64x4_epi64(lo, 1)),
                            widen(_mm512_castsi512_si256(hi)), widen(_mm512_extracti64x4_epi64(hi, 1))};
      for (int m = 0; m < MT; ++m) {
        const int16_t* xg = a.row(m0 + m) + g * kGroup + c * 8;
        for (int i = 0; i < 4; ++i) acc[m][0] = dot2(acc[m][0], w[i], _mm512_set1_epi32(pair(xg + 2 * i)));
      }
    }
    auto as_float = [](__m512i v) { return FVec(_mm512_cvtepi32_ps(v)); };
#else  // AVX2: a half's 16 rows in two vectors of 8
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256i acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    if constexpr (Bits == 8) {  // a 32-byte run is pair p: rows 0-7 in its low half
      for (int p = 0; p < 16; ++p) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
        const __m256i w[2] = {widen(_mm256_castsi256_si128(v)), widen(_mm256_extracti128_si256(v, 1))};
        for (int m = 0; m < MT; ++m) {
          const __m256i xp = _mm256_set1_epi32(pair(a.row(m0 + m) + g * kGroup + p * 2));
          for (int h = 0; h < 2; ++h) acc[m][h] = dot2(acc[m][h], w[h], xp);
        }
      }
    } else for (int c = 0; c < 4; ++c) {
      for (int t = 0; t < 2; ++t) {  // inputs c*8 + t*2 + (0, 1) and c*8 + 4 + t*2 + (0, 1)
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64 + t * 32));
        const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        for (int h = 0; h < 2; ++h) {
          const __m256i wl = widen(h ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo));
          const __m256i wh = widen(h ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi));
          for (int m = 0; m < MT; ++m) {
            const int16_t* xg = a.row(m0 + m) + g * kGroup + c * 8 + t * 2;
            acc[m][h] = dot2(acc[m][h], wl, _mm256_set1_epi32(pair(xg)));
            acc[m][h] = dot2(acc[m][h], wh, _mm256_set1_epi32(pair(xg + 4)));
          }
        }
      }
    }
    auto as_float = [](__m256i v) { return FVec(_mm256_cvtepi32_ps(v)); };
#endif
    for (int h = 0; h < H; ++h) {
      const auto [scale, offset] = scale_offset<P>(s, g, h);
      for (int m = 0; m < MT; ++m) {
        total[m][h] = at::vec::fmadd(as_float(acc[m][h]), scale * FVec(a.sx[m0 + m]), total[m][h]);
        total[m][h] = at::vec::fmadd(offset, FVec(a.sums[(m0 + m) * a.groups + g]), total[m][h]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < H; ++h) total[m][h].store(out + m * kRows + h * W);
}

// One row of x against kStreams blocks of int8 codes at once, group by group: that many streams
// of memory per thread instead of one. A decode step's products are one row of x, and one
// stream did not draw the memory's bandwidth (AVX-512, 16 matrices of the 1B's shapes in huge
// pages, interleaved in one process; GB/s for 1 / 4 streams: 1 thread 23.2 / 28.4, 2 threads
// 46.4 / 58.9 while this machine's memory read 60, 31 / 33 while it read 35).
constexpr int kStreams = 4;

template <int P, typename S>
void dot_streams(const Activations& a, const uint8_t* const* qs, const S* const* ss, float* out) {
  constexpr int64_t W = FVec::size();
  constexpr int64_t H = kRows / W;
  FVec total[kStreams][H];
  for (int j = 0; j < kStreams; ++j)
    for (int h = 0; h < H; ++h) total[j][h] = FVec(0.0f);
  const FVec sx(a.sx[0]);
  for (int64_t g = 0; g < a.groups; ++g) {
    const int16_t* xg = a.row(0) + g * kGroup;
#if defined(__AVX512BW__)
    __m512i acc[kStreams][1];
    for (int j = 0; j < kStreams; ++j) acc[j][0] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {  // as dot_block's: a 64-byte run holds pairs 2c and 2c + 1
      const __m512i x0 = _mm512_set1_epi32(pair(xg + c * 4)), x1 = _mm512_set1_epi32(pair(xg + c * 4 + 2));
      for (int j = 0; j < kStreams; ++j) {
        const __m512i v = _mm512_loadu_si512(qs[j] + g * group_bytes<8>() + c * 64);
        acc[j][0] = dot2(acc[j][0], widen(_mm512_castsi512_si256(v)), x0);
        acc[j][0] = dot2(acc[j][0], widen(_mm512_extracti64x4_epi64(v, 1)), x1);
      }
    }
    auto as_float = [](__m512i v) { return FVec(_mm512_cvtepi32_ps(v)); };
#else  // as dot_block's: a 32-byte run is pair p, rows 0-7 in its low half
    __m256i acc[kStreams][2];
    for (int j = 0; j < kStreams; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_si256();
    for (int p = 0; p < 16; ++p) {
      const __m256i xp = _mm256_set1_epi32(pair(xg + p * 2));
      for (int j = 0; j < kStreams; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs[j] + g * group_bytes<8>() + p * 32));
        acc[j][0] = dot2(acc[j][0], widen(_mm256_castsi256_si128(v)), xp);
        acc[j][1] = dot2(acc[j][1], widen(_mm256_extracti128_si256(v, 1)), xp);
      }
    }
    auto as_float = [](__m256i v) { return FVec(_mm256_cvtepi32_ps(v)); };
#endif
    const FVec sums(a.sums[g]);
    for (int j = 0; j < kStreams; ++j) {
      for (int h = 0; h < H; ++h) {
        const auto [scale, offset] = scale_offset<P>(ss[j], g, h);
        total[j][h] = at::vec::fmadd(as_float(acc[j][h]), scale * sx, total[j][h]);
        total[j][h] = at::vec::fmadd(offset, sums, total[j][h]);
      }
    }
  }
  for (int j = 0; j < kStreams; ++j)
    for (int h = 0; h < H; ++h) total[j][h].store(out + j * kRows + h * W);
}

template <int Bits, int P, typename T, typename S>
void product(const T* x, const uint8_t* q, const S* s, T* y, int64_t M, int64_t N, int64_t K) {
  const Activations a = quantize(x, M, K);
  const int64_t groups = a.groups;
  at::parallel_for(0, N / kRows, 1, [&](int64_t b0, int64_t b1) {
    float out[kTile * kRows];
    int64_t b = b0;
    static_assert(kStreams <= kTile, "out holds kTile blocks' outputs");
    if constexpr (Bits == 8) {  // one row of x: the range in kStreams parts, read in step
      const int64_t part = M == 1 ? (b1 - b0) / kStreams : 0;
      for (int64_t i = 0; i < part; ++i) {
        const uint8_t* qs[kStreams];
        const S* ss[kStreams];
        for (int j = 0; j < kStreams; ++j) {
          const int64_t bj = b0 + j * part + i;
          qs[j] = q + bj * groups * group_bytes<8>();
          ss[j] = s + bj * groups * P * kRows;
        }
        dot_streams<P>(a, qs, ss, out);
        for (int j = 0; j < kStreams; ++j)
          for (int64_t r = 0; r < kRows; ++r) y[(b0 + j * part + i) * kRows + r] = T(out[j * kRows + r]);
      }
      b += kStreams * part;  // the rest (fewer than kStreams blocks) one at a time
    }
    for (; b < b1; ++b) {
      const uint8_t* block = q + b * groups * group_bytes<Bits>();
      const S* scales = s + b * groups * P * kRows;
      for (int64_t m = 0; m < M; m += kTile) {
        const int64_t rows = std::min(kTile, M - m);
        switch (rows) {
          case 4: dot_block<Bits, 4, P>(a, m, block, scales, out); break;
          case 3: dot_block<Bits, 3, P>(a, m, block, scales, out); break;
          case 2: dot_block<Bits, 2, P>(a, m, block, scales, out); break;
          default: dot_block<Bits, 1, P>(a, m, block, scales, out);
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t r = 0; r < kRows; ++r) y[(m + i) * N + b * kRows + r] = T(out[i * kRows + r]);
      }
    }
  });
}

// x [..., K] @ W.T, W in one of the blocked layouts above (q's shape names it), s
// [N / 16, K / 32, 2, 16] in x's dtype or float16, or for int8 [N / 16, K / 32, 1, 16] in float16.
template <int Bits>
at::Tensor group_linear(const char* op, const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.scalar_type() == at::kByte, op, ": q must be uint8, got ", q.scalar_type());
  if constexpr (Bits == 4) {
    TORCH_CHECK(q.dim() == 6 && q.size(2) == 4 && q.size(3) == 2 && q.size(4) == kRows && q.size(5) == 2, op,
                ": q must be [N / 16, K / 32, 4, 2, 16, 2], got ", q.sizes());
  } else {
    TORCH_CHECK(q.dim() == 5 && q.size(2) == 16 && q.size(3) == kRows && q.size(4) == 2, op,
                ": q must be [N / 16, K / 32, 16, 16, 2], got ", q.sizes());
  }
  const int64_t N = q.size(0) * kRows, K = q.size(1) * kGroup;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x's last dimension must be ", K, ", got ",
              x.sizes());
  const bool scales_only = Bits == 8 && s.dim() == 4 && s.size(2) == 1;  // offsets -128 x scale
  TORCH_CHECK(s.dim() == 4 && s.size(0) == q.size(0) && s.size(1) == q.size(1) &&
                  (s.size(2) == 2 || scales_only) && s.size(3) == kRows,
              op, ": s must be [", q.size(0), ", ", q.size(1), Bits == 8 ? ", 2 or 1, 16]" : ", 2, 16]",
              ", got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == x.scalar_type() || s.scalar_type() == at::kHalf, op,
              ": s must be in x's dtype or float16, got ", s.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(!scales_only || s.scalar_type() == at::kHalf, op,
              ": scales alone (s [..., 1, 16]) must be float16, got ", s.scalar_type());
  // x's rows read in place and y made in its final shape: a decode step makes ~120 of these
  // calls, and each reshape or view is one more trip through the dispatcher
  const auto xc = x.contiguous();
  const auto qc = q.contiguous();
  const auto sc = s.contiguous();
  const int64_t M = xc.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    if constexpr (Bits == 8) {
      if (scales_only) {
        product<8, 1>(xc.data_ptr<scalar_t>(), qc.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(),
                      y.data_ptr<scalar_t>(), M, N, K);
        return;
      }
    }
    if (sc.scalar_type() == x.scalar_type()) {
      product<Bits, 2>(xc.data_ptr<scalar_t>(), qc.data_ptr<uint8_t>(), sc.data_ptr<scalar_t>(),
                       y.data_ptr<scalar_t>(), M, N, K);
    } else {
      product<Bits, 2>(xc.data_ptr<scalar_t>(), qc.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(),
                       y.data_ptr<scalar_t>(), M, N, K);
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float(0)); break;
    case at::kBFloat16: run(at::BFloat16(0)); break;
    case at::kHalf: run(at::Half(0)); break;
    default: TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return y;
}

at::Tensor int4_linear_blocked(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  return group_linear<4>("int4_linear_blocked", x, q, s);
}

at::Tensor int8_linear_grouped(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  return group_linear<8>("int8_linear_grouped", x, q, s);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(cpumesh_kernels, m) {
  m.def("int4_linear_blocked(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("int8_linear_grouped(Tensor x, Tensor q, Tensor s) -> Tensor");
}
TORCH_LIBRARY_IMPL(cpumesh_kernels, CPU, m) {
  m.impl("int4_linear_blocked", &int4_linear_blocked);
  m.impl("int8_linear_grouped", &int8_linear_grouped);
}
