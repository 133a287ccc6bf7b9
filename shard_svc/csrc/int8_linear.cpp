// Weight-only int8 matrix product for decode: y = x @ (q * s[:, None]).T for a few rows of x,
// with q in one of two layouts:
//   rows     [N, K] as stored (any shape);
//   blocked  [N / 16, K / 2, 16, 2]: 16 rows at a time, their inputs in pairs (block_int8 packs
//            it; needs N % 16 == 0, K even). A block streams as one run of memory and a vector
//            holds its 16 rows, so no output needs a horizontal sum: SmolLM2's 120 layer products
//            (576 wide) 3.9 ms against 5.5 in rows and 4.2 by inductor's C++ int8 GEMM
//            template (AMD EPYC, 2 threads, bench-style interleaved runs).
//
// Each row of x is quantized to int16 with one scale (x ≈ xq * sx, |xq| <= 32767: 15 bits of the
// row's largest input, where bfloat16 keeps 8 of each; SmolLM2's quality was the same either way,
// BENCHMARKS.md), and each output is an exact integer dot product of xq with the
// int8 weight row, scaled once: y[m, n] = sx[m] * s[n] * sum_k xq[m, k] * q[n, k]. The integer
// products are 16-bit pairs summed into 32-bit lanes (AVX-512 VNNI `vpdpwssd`, else `vpmaddwd`
// + add, AVX-512 BW or AVX2), so a weight costs a load, a sign extension and half an
// instruction: the weights stream at memory speed (a float FMA per weight, after a conversion,
// ran at two thirds of it on this AMD EPYC). Each thread reads one contiguous run of weight rows,
// one row at a time, for every row of x (tiles of 4 rows of x: the weight row is read once per
// tile, from L1 after the first).
//
// Exactness (rows): each of a row's two accumulators gathers, per lane, at most kFlush / kStep
// products of |xq * q| <= 32767 * 127 (AVX2: 128 of them, 5.3e8) before the two are added
// (1.1e9 < 2^31) and their lanes are widened to a 64-bit total: no overflow for any K.
// (blocked): a lane is one output and gathers at most kBlockFlush products (2.1e9 < 2^31) before
// it is added into a float32 total (rounding 2^-24 of the sum: below x's own 2^-16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {
using FVec = at::vec::Vectorized<float>;
constexpr int64_t kFlush = 2048;  // inputs summed in 32-bit lanes before the 64-bit total
constexpr int64_t kTileRows = 4;  // rows of x per pass over a weight row
constexpr int64_t kBlock = 16;  // rows per block of the blocked layout
constexpr int64_t kBlockFlush = 512;  // inputs summed in a blocked lane before the float total
constexpr float kLevels = 32767.0f;

#if defined(__AVX512BW__)
using IVec = __m512i;
constexpr int64_t kStep = 32;  // int16 inputs per vector
inline IVec zero() { return _mm512_setzero_si512(); }
inline IVec load_x(const int16_t* p) { return _mm512_loadu_si512(p); }
inline IVec load_q(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline IVec add(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
#if defined(__AVX512VNNI__)
inline IVec dot(IVec acc, IVec x, IVec q) { return _mm512_dpwssd_epi32(acc, x, q); }
#else
inline IVec dot(IVec acc, IVec x, IVec q) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, q)); }
#endif
inline void store_int16(int16_t* p, __m512 v) {  // |v| <= 32767
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
}
inline int64_t sum(IVec v) {  // lanes widened to 64 bits first
  const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
  const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}
#elif defined(__AVX2__)
using IVec = __m256i;
constexpr int64_t kStep = 16;
inline IVec zero() { return _mm256_setzero_si256(); }
inline IVec load_x(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec load_q(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline IVec add(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline IVec dot(IVec acc, IVec x, IVec q) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, q)); }
inline void store_int16(int16_t* p, __m256 v) {  // |v| <= 32767
  const __m256i i = _mm256_cvtps_epi32(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
}
inline int64_t sum(IVec v) {  // lanes widened to 64 bits first
  const __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                     _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#else
#error "int8_linear needs AVX2 or AVX-512 (built with the flags of inductor's vector ISA)"
#endif

// dots[m] = sum_k x[m, k] * q[k] for M rows of x (row stride ldx): two accumulators per row.
template <int M>
void dot_rows(const int16_t* x, int64_t ldx, const int8_t* q, int64_t K, int64_t* dots) {
  constexpr int64_t kPair = 2 * kStep;
  const int64_t vector_end = K / kPair * kPair;
  int64_t total[M] = {};
  int64_t k = 0;
  while (k < vector_end) {
    const int64_t stop = std::min(vector_end, k + kFlush);
    IVec acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = zero();
    for (; k < stop; k += kPair) {
      const IVec q0 = load_q(q + k), q1 = load_q(q + k + kStep);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = dot(acc[m][0], load_x(x + m * ldx + k), q0);
        acc[m][1] = dot(acc[m][1], load_x(x + m * ldx + k + kStep), q1);
      }
    }
    for (int m = 0; m < M; ++m) total[m] += sum(add(acc[m][0], acc[m][1]));
  }
  for (; k < K; ++k)
    for (int m = 0; m < M; ++m) total[m] += int64_t(x[m * ldx + k]) * q[k];
  for (int m = 0; m < M; ++m) dots[m] = total[m];
}

template <typename T>
inline FVec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return FVec::loadu(p);
  } else {
    return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, FVec::size()));
  }
}

// A row of x as int16 (rounded to nearest, as the scalar tail's nearbyint) and its scale; a row
// holding a NaN or an infinity gets scale NaN (so its outputs are NaN, as a float product's).
template <typename T>
void quantize_row(const T* row, int64_t K, int16_t* xq, float* sx) {
  constexpr int64_t W = FVec::size();
  const int64_t vector_end = K / W * W;
  FVec vmax(0.0f);  // at::vec::maximum propagates NaN
  for (int64_t k = 0; k < vector_end; k += W) vmax = at::vec::maximum(vmax, load_float(row + k).abs());
  float amax = at::vec::vec_reduce_all<float>(
      [](const FVec& a, const FVec& b) { return at::vec::maximum(a, b); }, vmax);
  for (int64_t k = vector_end; k < K; ++k) {
    const float v = std::abs(float(row[k]));
    amax = std::isnan(v) || v > amax ? v : amax;
  }
  if (!std::isfinite(amax)) {
    std::fill(xq, xq + K, int16_t(0));
    *sx = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  *sx = amax / kLevels;
  const float inv = amax > 0.0f ? kLevels / amax : 0.0f;
  for (int64_t k = 0; k < vector_end; k += W) store_int16(xq + k, load_float(row + k) * FVec(inv));
  for (int64_t k = vector_end; k < K; ++k) xq[k] = int16_t(std::nearbyint(float(row[k]) * inv));
}

// out[m, i] = sum_k x[m, k] * q[block row i, k] for MT rows of x (row stride ldx, int16 pairs
// read as int32) and one block of the blocked layout.
template <int MT>
void dot_block(const int16_t* x, int64_t ldx, const int8_t* block, int64_t K, float* out) {
  const int64_t pairs = K / 2;
  const int32_t* xp[MT];
  for (int m = 0; m < MT; ++m) xp[m] = reinterpret_cast<const int32_t*>(x + m * ldx);
#if defined(__AVX512BW__)
  __m512 total[MT];
  for (int m = 0; m < MT; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs;) {
    const int64_t stop = std::min(pairs, p + kBlockFlush / 2);
    __m512i acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = zero();
    for (; p < stop; p += 2) {
      const __m512i q0 = load_q(block + p * 2 * kBlock);
      const bool two = p + 1 < stop;
      const __m512i q1 = two ? load_q(block + (p + 1) * 2 * kBlock) : zero();
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = dot(acc[m][0], _mm512_set1_epi32(xp[m][p]), q0);
        if (two) acc[m][1] = dot(acc[m][1], _mm512_set1_epi32(xp[m][p + 1]), q1);
      }
    }
    for (int m = 0; m < MT; ++m)
      total[m] = _mm512_add_ps(total[m], _mm512_cvtepi32_ps(add(acc[m][0], acc[m][1])));
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + m * kBlock, total[m]);
#else  // AVX2: the 16 rows in two vectors of 8
  __m256 total[MT][2];
  for (int m = 0; m < MT; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs;) {
    const int64_t stop = std::min(pairs, p + kBlockFlush / 2);
    __m256i acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = zero();
    for (; p < stop; ++p) {
      const int8_t* pair = block + p * 2 * kBlock;
      const __m256i lo = load_q(pair), hi = load_q(pair + kBlock);
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_set1_epi32(xp[m][p]);
        acc[m][0] = dot(acc[m][0], xv, lo);
        acc[m][1] = dot(acc[m][1], xv, hi);
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int h = 0; h < 2; ++h)
        total[m][h] = _mm256_add_ps(total[m][h], _mm256_cvtepi32_ps(acc[m][h]));
  }
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + m * kBlock + h * 8, total[m][h]);
#endif
}

// The rows of x as int16 [M, ldx] (rows start on cache lines: torch's allocator aligns to 64
// bytes; a vector load of x that straddles two lines cost the rows kernel ~10 %), and their scales.
struct QuantizedRows {
  at::Tensor xq;  // owns `data`
  int16_t* data;
  int64_t ldx;
  std::vector<float> sx;
  const int16_t* row(int64_t m) const { return data + m * ldx; }
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t ldx = (K + 31) / 32 * 32;
  auto xq = at::empty({M, ldx}, at::kShort);
  QuantizedRows r{xq, xq.data_ptr<int16_t>(), ldx, std::vector<float>(M)};
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, r.data + m * ldx, &r.sx[m]);
  return r;
}

template <typename T>
void product(const T* x, const int8_t* q, const T* s, T* y, int64_t M, int64_t N, int64_t K) {
  const auto xq = quantize_rows(x, M, K);
  const auto& sx = xq.sx;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t dots[kTileRows];
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = q + n * K;
      const float scale = float(s[n]);
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows) {
        dot_rows<kTileRows>(xq.row(m), xq.ldx, row, K, dots);
        for (int64_t i = 0; i < kTileRows; ++i) y[(m + i) * N + n] = T(float(dots[i]) * sx[m + i] * scale);
      }
      for (; m < M; ++m) {
        dot_rows<1>(xq.row(m), xq.ldx, row, K, dots);
        y[m * N + n] = T(float(dots[0]) * sx[m] * scale);
      }
    }
  });
}

template <typename T>
void product_blocked(const T* x, const int8_t* q, const T* s, T* y, int64_t M, int64_t N, int64_t K) {
  const auto xq = quantize_rows(x, M, K);
  const auto& sx = xq.sx;
  at::parallel_for(0, N / kBlock, 1, [&](int64_t b0, int64_t b1) {
    float out[kTileRows * kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* block = q + b * kBlock * K;
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int64_t rows = std::min(kTileRows, M - m);
        const int16_t* xm = xq.row(m);
        switch (rows) {
          case 4: dot_block<4>(xm, xq.ldx, block, K, out); break;
          case 3: dot_block<3>(xm, xq.ldx, block, K, out); break;
          case 2: dot_block<2>(xm, xq.ldx, block, K, out); break;
          default: dot_block<1>(xm, xq.ldx, block, K, out);
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t r = 0; r < kBlock; ++r) {
            const int64_t n = b * kBlock + r;
            y[(m + i) * N + n] = T(out[i * kBlock + r] * sx[m + i] * float(s[n]));
          }
      }
    }
  });
}

// x [..., K] @ (q * s[:, None]).T, q [N, K] (rows) or [N / 16, K / 2, 16, 2] (blocked)
at::Tensor int8_product(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, bool blocked) {
  const char* op = blocked ? "int8_linear_blocked" : "int8_linear";
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": q must be int8, got ", q.scalar_type());
  TORCH_CHECK(blocked ? q.dim() == 4 && q.size(2) == kBlock && q.size(3) == 2 : q.dim() == 2, op,
              ": q must be ", blocked ? "[N / 16, K / 2, 16, 2]" : "[N, K]", ", got ", q.sizes());
  const int64_t N = blocked ? q.size(0) * kBlock : q.size(0), K = blocked ? q.size(1) * 2 : q.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x's last dimension must be ", K, ", got ",
              x.sizes());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N, op, ": s must be [", N, "], got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == x.scalar_type(), op, ": s and x must share a dtype, got ",
              s.scalar_type(), " and ", x.scalar_type());
  const auto xc = x.reshape({-1, K}).contiguous();
  const auto qc = q.contiguous();
  const auto sc = s.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({xc.size(0), N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    auto run = blocked ? product_blocked<scalar_t> : product<scalar_t>;
    run(xc.data_ptr<scalar_t>(), qc.data_ptr<int8_t>(), sc.data_ptr<scalar_t>(),
        y.data_ptr<scalar_t>(), xc.size(0), N, K);
  });
  return y.view(sizes);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  return int8_product(x, q, s, false);
}

at::Tensor int8_linear_blocked(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  return int8_product(x, q, s, true);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(cpumesh_kernels, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("int8_linear_blocked(Tensor x, Tensor q, Tensor s) -> Tensor");
}
TORCH_LIBRARY_IMPL(cpumesh_kernels, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_linear_blocked", &int8_linear_blocked);
}
