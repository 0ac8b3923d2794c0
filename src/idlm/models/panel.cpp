// Products for few-row steps on AVX2 (models/panel.py): y = x @ w.T (+ bias) with float32 x, the weight packed once
// into panels of 16 output columns laid out [panel][K][16], so a panel streams from memory once per call. A register
// block of R rows x P panels (R <= 3, 8-12 accumulators) is fed by 16 weights per panel and R broadcasts per input.
// The weights are float32, or int8 widened to float32 in registers and scaled per output column at the end (a
// quarter of the bytes). Every output is one FMA chain over the inputs in order, whatever block computes it: a row's
// output does not depend on the rows beside it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <tuple>

namespace {

constexpr int64_t kCols = 16;  // output columns per panel: two 8-float registers
constexpr int64_t kRows = 3;   // rows per register block at most
constexpr int kPanelsPerBlock[kRows + 1] = {0, 4, 3, 2};  // panels per block of R rows: 8, 12, 12 accumulators
constexpr int64_t kChunkBytes = 256 << 10;  // panels a thread runs every row block against before moving on

at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar) && w.device().is_cpu(),
              "idlm_panel::pack takes a 2-D float32 or int8 CPU weight [out, in]");
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kCols - 1) / kCols;
  at::Tensor padded = at::zeros({panels * kCols, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  return padded.view({panels, kCols, k}).transpose(1, 2).contiguous();  // [panels, K, 16]
}

// 16 weights of one input row of a panel as two 8-float registers: float32 as stored, or int8 widened
inline void load16(const float* p, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(p);
  w1 = _mm256_loadu_ps(p + 8);
}

inline void load16(const int8_t* p, __m256& w0, __m256& w1) {
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
}

// One register block: R rows x P panels, 2 * R * P accumulators (at most 12 of AVX2's 16 registers). Each output is
// one FMA chain over k in order, whatever R and P: blocks only decide how many chains run side by side (a single
// row needs several panels at once, or its two chains wait on the FMA latency at every k).
template <int R, int P, typename W>
inline void block(const float* x, int64_t k, const W* panel, const float* scales, float* y, int64_t ldy,
                  int64_t cols) {
  __m256 acc[R][P][2];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    __m256 xi[R];
    for (int r = 0; r < R; ++r) xi[r] = _mm256_broadcast_ss(x + r * k + i);
    for (int p = 0; p < P; ++p) {
      __m256 w0, w1;
      load16(panel + (p * k + i) * kCols, w0, w1);
      for (int r = 0; r < R; ++r) {
        acc[r][p][0] = _mm256_fmadd_ps(xi[r], w0, acc[r][p][0]);
        acc[r][p][1] = _mm256_fmadd_ps(xi[r], w1, acc[r][p][1]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    if (scales != nullptr) {  // int8: per output column
      const __m256 s0 = _mm256_loadu_ps(scales + p * kCols), s1 = _mm256_loadu_ps(scales + p * kCols + 8);
      for (int r = 0; r < R; ++r) {
        acc[r][p][0] = _mm256_mul_ps(acc[r][p][0], s0);
        acc[r][p][1] = _mm256_mul_ps(acc[r][p][1], s1);
      }
    }
    const int64_t c = std::min(kCols, cols - p * kCols);
    for (int r = 0; r < R; ++r) {
      float* out = y + r * ldy + p * kCols;
      if (c == kCols) {
        _mm256_storeu_ps(out, acc[r][p][0]);
        _mm256_storeu_ps(out + 8, acc[r][p][1]);
      } else {  // the last panel of a weight whose out features are not a multiple of 16
        alignas(32) float tail[kCols];
        _mm256_store_ps(tail, acc[r][p][0]);
        _mm256_store_ps(tail + 8, acc[r][p][1]);
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
  int64_t j = 0;
  auto at = [&](int64_t jj) { return std::make_tuple(panel + jj * k * kCols, scales ? scales + jj * kCols : nullptr,
                                                     y + jj * kCols, cols - jj * kCols); };
  for (; j + P <= count; j += P) {
    auto [pj, sj, yj, cj] = at(j);
    block<R, P>(x, k, pj, sj, yj, ldy, cj);
  }
  if (j < count) {
    auto [pj, sj, yj, cj] = at(j);
    switch (count - j) {  // fewer panels than a block takes: 1 .. P - 1
      case 1: block<R, 1>(x, k, pj, sj, yj, ldy, cj); break;
      case 2: block<R, 2>(x, k, pj, sj, yj, ldy, cj); break;
      default: block<R, 3>(x, k, pj, sj, yj, ldy, cj); break;
    }
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
  const W* pp = panels.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, k * kCols * sizeof(W)));
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    const int64_t step = m <= kRows ? end - begin : per_chunk;  // one row block: no chunk needs to stay cached
    for (int64_t p0 = begin; p0 < end; p0 += step) {
      const int64_t count = std::min(step, end - p0);
      const W* panel = pp + p0 * k * kCols;
      const float* s = scales ? scales + p0 * kCols : nullptr;
      for (int64_t r = 0; r < m; r += kRows) {
        const float* xr = xp + r * k;
        float* yr = yp + r * n + p0 * kCols;
        switch (std::min(kRows, m - r)) {
          case 1: row_block<1>(xr, k, panel, count, s, yr, n, n - p0 * kCols); break;
          case 2: row_block<2>(xr, k, panel, count, s, yr, n, n - p0 * kCols); break;
          default: row_block<3>(xr, k, panel, count, s, yr, n, n - p0 * kCols); break;
        }
      }
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.view(shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(panels.scalar_type() == at::kFloat, "idlm_panel::linear takes float32 panels (idlm_panel::pack)");
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

}  // namespace

TORCH_LIBRARY(idlm_panel, m) {
  m.def("pack(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor panels, int out_features, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor panels, Tensor scales, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(idlm_panel, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
}
