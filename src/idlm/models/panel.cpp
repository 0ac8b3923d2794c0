// Products for few-row steps on AVX2 (models/panel.py): y = x @ w.T (+ bias) with float32 x, the weight packed once
// into panels of 16 output columns laid out [panel][K][16], so a panel streams from memory once per call and a
// register block of 4 rows x 16 columns (8 accumulators) is fed by 16 weights and 4 broadcasts per input. The
// weights are float32, or int8 widened to float32 in registers and scaled per output column at the end (a quarter
// of the bytes). Every row is summed in the same order whatever the row count: a row's output does not depend on
// the rows beside it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kCols = 16;  // output columns per panel: two 8-float registers
constexpr int64_t kRows = 4;   // rows per register block

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
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
}

template <int R, typename W>
void block(const float* x, int64_t k, const W* panel, const float* scales, float* y, int64_t ldy, int64_t cols) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_setzero_ps();
    hi[r] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    __m256 w0, w1;
    load16(panel + i * kCols, w0, w1);
    for (int r = 0; r < R; ++r) {
      const __m256 xi = _mm256_broadcast_ss(x + r * k + i);
      lo[r] = _mm256_fmadd_ps(xi, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xi, w1, hi[r]);
    }
  }
  if (scales != nullptr) {  // int8: per output column
    const __m256 s0 = _mm256_loadu_ps(scales), s1 = _mm256_loadu_ps(scales + 8);
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm256_mul_ps(lo[r], s0);
      hi[r] = _mm256_mul_ps(hi[r], s1);
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == kCols) {
      _mm256_storeu_ps(y + r * ldy, lo[r]);
      _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
    } else {  // the last panel of a weight whose out features are not a multiple of 16
      alignas(32) float tail[kCols];
      _mm256_store_ps(tail, lo[r]);
      _mm256_store_ps(tail + 8, hi[r]);
      std::memcpy(y + r * ldy, tail, cols * sizeof(float));
    }
  }
}

template <typename W>
void rows_block(int64_t r, const float* x, int64_t k, const W* panel, const float* scales, float* y, int64_t ldy,
                int64_t cols) {
  switch (r) {
    case 1: block<1>(x, k, panel, scales, y, ldy, cols); break;
    case 2: block<2>(x, k, panel, scales, y, ldy, cols); break;
    case 3: block<3>(x, k, panel, scales, y, ldy, cols); break;
    default: block<4>(x, k, panel, scales, y, ldy, cols); break;
  }
}

// y [rows, out] = x @ w.T (* scales): every panel once, all rows against it in blocks of kRows
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
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min(kCols, n - p * kCols);
      for (int64_t r = 0; r < m; r += kRows)  // the panel stays in cache across the row blocks
        rows_block(std::min(kRows, m - r), xp + r * k, k, pp + p * k * kCols,
                   scales ? scales + p * kCols : nullptr, yp + r * n + p * kCols, n, cols);
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
