// Products for few-row steps on AVX2 or AVX-512 (models/panel.py): y = x @ w.T (+ bias) with float32 x, the weight
// packed once into panels of 16 output columns laid out [panel][K][16], so a panel streams from memory once per call. A
// register block of R rows x P panels is fed by 16 weights per panel and R broadcasts per input. The weights are
// float32, bfloat16 widened to float32 (weights it holds exactly, such as a bf16 adapter's: half the bytes), or int8
// widened to float32 in registers and scaled per output column at the end (a quarter of the bytes).
// Every output is one FMA chain over the inputs in order, whatever block computes it and whichever instruction set
// the build targets: a row's output does not depend on the rows beside it, nor on the machine's vector width.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace {

constexpr int64_t kCols = 16;  // output columns per panel
constexpr int64_t kChunkBytes = 256 << 10;  // panels a thread runs every row block against before moving on

// The vector unit: 16 columns are one 16-float register (AVX-512, 32 registers) or two 8-float ones (AVX2, 16).
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kVecs = 1;
constexpr int64_t kRows = 8;  // a verify step of stride 4 (7 rows) in one pass: its int8 weights widened once
constexpr int kPanelsPerBlock[kRows + 1] = {0, 8, 6, 4, 3, 2, 2, 2, 2};  // 8-16 accumulators, <= 26 registers
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p) {  // bfloat16: the upper half of a float32
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#else
using Vec = __m256;
constexpr int kVecs = 2;
constexpr int64_t kRows = 3;
constexpr int kPanelsPerBlock[kRows + 1] = {0, 4, 3, 2};  // 8, 12, 12 accumulators of AVX2's 16 registers
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const int8_t* p) {  // 8 bytes widened: two such halves beat one 16-byte load and a shuffle
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p) {  // bfloat16: the upper half of a float32
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#endif
constexpr int kLanes = kCols / kVecs;

// f(std::integral_constant<int, n>) for a run-time 1 <= n <= N: block shapes are compile-time constants
template <int N, typename F>
inline void dispatch(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return dispatch<N - 1>(n, std::forward<F>(f));
  }
  f(std::integral_constant<int, N>{});
}

at::Tensor pack(const at::Tensor& w) {
  const auto t = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && (t == at::kFloat || t == at::kBFloat16 || t == at::kChar) && w.device().is_cpu(),
              "idlm_panel::pack takes a 2-D float32, bfloat16 or int8 CPU weight [out, in]");
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kCols - 1) / kCols;
  at::Tensor padded = at::zeros({panels * kCols, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  return padded.view({panels, kCols, k}).transpose(1, 2).contiguous();  // [panels, K, 16]
}

// One register block: R rows x P panels, R * P * kVecs accumulators. Each output is one FMA chain over k in order,
// whatever R and P: blocks only decide how many chains run side by side (a single row needs several panels at once,
// or its chains wait on the FMA latency at every k) and how many rows share each widened weight.
template <int R, int P, typename W>
inline void block(const float* x, int64_t k, const W* panel, const float* scales, float* y, int64_t ldy,
                  int64_t cols) {
  Vec acc[R][P][kVecs];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < kVecs; ++v) acc[r][p][v] = zero();
  for (int64_t i = 0; i < k; ++i) {
    Vec xi[R];
    for (int r = 0; r < R; ++r) xi[r] = broadcast(x + r * k + i);
    for (int p = 0; p < P; ++p) {
      for (int v = 0; v < kVecs; ++v) {
        const Vec w = load(panel + (p * k + i) * kCols + v * kLanes);
        for (int r = 0; r < R; ++r) acc[r][p][v] = fmadd(xi[r], w, acc[r][p][v]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    if (scales != nullptr) {  // int8: per output column
      for (int v = 0; v < kVecs; ++v) {
        const Vec s = load(scales + p * kCols + v * kLanes);
        for (int r = 0; r < R; ++r) acc[r][p][v] = mul(acc[r][p][v], s);
      }
    }
    const int64_t c = std::min(kCols, cols - p * kCols);
    for (int r = 0; r < R; ++r) {
      float* out = y + r * ldy + p * kCols;
      if (c == kCols) {
        for (int v = 0; v < kVecs; ++v) store(out + v * kLanes, acc[r][p][v]);
      } else {  // the last panel of a weight whose out features are not a multiple of 16
        float tail[kCols];
        for (int v = 0; v < kVecs; ++v) store(tail + v * kLanes, acc[r][p][v]);
        std::memcpy(out, tail, c * sizeof(float));
      }
    }
  }
}

// R rows against `count` consecutive panels, P(R) panels per block; `cols`: output columns from the first panel on
template <int R, typename W>
void row_block(const float* x, int64_t k, const W* panel, int64_t count, const float* scales, float* y, int64_t ldy,
               int64_t cols) {
  constexpr int P = kPanelsPerBlock[R];
  auto run = [&](int64_t j, auto panels) {
    block<R, decltype(panels)::value>(x, k, panel + j * k * kCols, scales ? scales + j * kCols : nullptr,
                                      y + j * kCols, ldy, cols - j * kCols);
  };
  int64_t j = 0;
  for (; j + P <= count; j += P) run(j, std::integral_constant<int, P>{});
  if constexpr (P > 1) {
    if (j < count) dispatch<P - 1>(count - j, [&](auto panels) { run(j, panels); });  // the 1 .. P - 1 left
  }
}

// y [rows, out] = x @ w.T (* scales). Each thread takes a range of panels and walks it in chunks that stay in its L2
// cache while every block of up to kRows rows runs against the chunk.
template <typename W>
at::Tensor product(const at::Tensor& x, const at::Tensor& panels, const float* scales, int64_t out_features,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.dim() == 3 && panels.size(2) == kCols &&
                  x.size(-1) == panels.size(1) && panels.is_contiguous(),
              "idlm_panel: float32 x [..., K] and panels [ceil(out/16), K, 16] from idlm_panel::pack");
  TORCH_CHECK(out_features > (panels.size(0) - 1) * kCols && out_features <= panels.size(0) * kCols,
              "idlm_panel: out_features does not match the panels");
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1), n = out_features;
  const at::Tensor xc = x.reshape({m, k}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const W* pp = static_cast<const W*>(panels.const_data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, k * kCols * sizeof(W)));
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    const int64_t step = m <= kRows ? end - begin : per_chunk;  // one row block: no chunk needs to stay cached
    for (int64_t p0 = begin; p0 < end; p0 += step) {
      const int64_t count = std::min(step, end - p0);
      const W* panel = pp + p0 * k * kCols;
      const float* s = scales ? scales + p0 * kCols : nullptr;
      for (int64_t r = 0; r < m; r += kRows) {
        dispatch<kRows>(std::min(kRows, m - r), [&](auto rows) {
          row_block<decltype(rows)::value>(xp + r * k, k, panel, count, s, yp + r * n + p0 * kCols, n, n - p0 * kCols);
        });
      }
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.view(shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                  const c10::optional<at::Tensor>& bias) {
  if (panels.scalar_type() == at::kBFloat16)  // weights that bfloat16 holds exactly: half the bytes, the same sums
    return product<uint16_t>(x, panels, nullptr, out_features, bias);
  TORCH_CHECK(panels.scalar_type() == at::kFloat,
              "idlm_panel::linear takes float32 or bfloat16 panels (idlm_panel::pack)");
  return product<float>(x, panels, nullptr, out_features, bias);
}

// int8 weights per output channel: y = (x @ q.T) * scales, summed in float32 (scales padded to the panels)
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scales, int64_t out_features,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(panels.scalar_type() == at::kChar, "idlm_panel::linear_int8 takes int8 panels (idlm_panel::pack of int8 weights)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 1 &&
                  scales.size(0) == panels.size(0) * kCols,
              "idlm_panel::linear_int8 takes float32 scales padded to 16 x panels");
  return product<int8_t>(x, panels, scales.data_ptr<float>(), out_features, bias);
}

// y[rows] += (x[rows] @ a.T) @ b.T in place (every row when rows is None): a frozen adapter's delta on the rows its
// gate opens, in one call where the graph would otherwise gather, run two products, add and scatter (a verify step
// has one such group per fused projection). The sums are linear's, so the delta is bit for bit the two products'. The
// few gated rows are copied and added by plain loops (aten's index_select and index_add cost 8 and 17 us a call).
void add_lora(at::Tensor y, const at::Tensor& x, const at::Tensor& a_panels, int64_t rank, const at::Tensor& b_panels,
              const c10::optional<at::Tensor>& rows) {
  const int64_t n = y.size(-1), k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == m * n,
              "idlm_panel::add_lora: contiguous float32 y [..., out] with one row per row of x");
  const at::Tensor xs = x.reshape({m, k}).contiguous();
  const bool gated = rows.has_value() && rows->defined();
  TORCH_CHECK(!gated || (rows->scalar_type() == at::kLong && rows->dim() == 1),
              "idlm_panel::add_lora: rows are 1-D int64");
  const at::Tensor index = gated ? rows->contiguous() : at::Tensor();
  const int64_t* ip = gated ? index.const_data_ptr<int64_t>() : nullptr;
  const int64_t g = gated ? index.numel() : m;
  auto row = [&](int64_t i) { return gated ? ip[i] : i; };
  at::Tensor picked = xs;
  if (gated) {
    picked = at::empty({g, k}, xs.options());
    for (int64_t i = 0; i < g; ++i) {
      TORCH_CHECK(ip[i] >= 0 && ip[i] < m, "idlm_panel::add_lora: row ", ip[i], " out of ", m);
      std::memcpy(picked.data_ptr<float>() + i * k, xs.const_data_ptr<float>() + ip[i] * k, k * sizeof(float));
    }
  }
  const at::Tensor delta = linear(linear(picked, a_panels, rank, c10::nullopt), b_panels, n, c10::nullopt);
  const float* dp = delta.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < g; ++i) {  // distinct rows: one addition per output, as y[rows] + delta
    float* out = yp + row(i) * n;
    for (int64_t j = 0; j < n; ++j) out[j] += dp[i * n + j];
  }
}

}  // namespace

TORCH_LIBRARY(idlm_panel, m) {
  m.def("pack(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor panels, int out_features, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor panels, Tensor scales, int out_features, Tensor? bias) -> Tensor");
  m.def("add_lora(Tensor(a!) y, Tensor x, Tensor a_panels, int rank, Tensor b_panels, Tensor? rows) -> ()");
}

TORCH_LIBRARY_IMPL(idlm_panel, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
  m.impl("add_lora", &add_lora);
}
