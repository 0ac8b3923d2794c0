// Products for few-row steps on AVX2 or AVX-512 (models/panel.py): y = x @ w.T (+ bias) with the weight packed once
// into panels of 16 output columns laid out [panel][K][16], so a panel streams from memory once per call. A register
// block of R rows x P panels is fed by 16 weights per panel and R broadcasts per input. The weights are float32,
// bfloat16 widened to float32 (weights it holds exactly, such as a bf16 adapter's: half the bytes), both against
// float32 x, or int8 (a quarter of the bytes) against bfloat16 x, scaled per output column at the end and rounded to
// bfloat16 values.
// Every output is one chain of multiply-adds in a fixed order, whatever block computes it: a row's output does not
// depend on the rows beside it, nor on the build. float32 and bfloat16 weights: one FMA per input, in order. int8
// weights: over pairs of inputs, by FMAs or VDPBF16PS with the same sums (below, "int8 weights").
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kCols = 16;  // output columns per panel
constexpr int64_t kChunkBytes = 256 << 10;  // panels a thread runs every row block against before moving on

// The vector unit: 16 columns are one 16-float register (AVX-512, 32 registers) or two 8-float ones (AVX2, 16).
constexpr int kVecs = kCols / kLanes;
#if defined(__AVX512F__)
constexpr int64_t kRows = 8;  // a verify step of stride 4 (7 rows) in one pass: its int8 weights widened once
constexpr int kPanelsPerBlock[kRows + 1] = {0, 8, 6, 4, 3, 2, 2, 2, 2};  // 8-16 accumulators, <= 26 registers
// block-coded panels: each panel also holds its scales and rebuilt weights in registers
constexpr int kCodedPanelsPerBlock[kRows + 1] = {0, 4, 4, 3, 2, 2, 2, 2, 2};
inline Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec flag_nan(Vec seen, Vec x) {  // lanes where x is NaN set to 1
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), seen, _mm512_set1_ps(1.f));
}
inline Vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p) {  // bfloat16: the upper half of a float32
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
inline Vec load_half(const uint8_t* p) {  // float16
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline std::pair<Vec, Vec> load_nibbles(const uint8_t* p) {  // bytes' low and high 4 bits
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4))};
}
inline Vec vabs(Vec v) { return _mm512_abs_ps(v); }
inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec clamp127(Vec v) { return _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), v)); }
inline void narrow_int8(Vec v, int8_t* p) {  // 16 integral floats to 16 bytes
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
}
inline Vec round_bf16(Vec v) {  // to the nearest bfloat16 value, ties to even (a NaN stays a NaN)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                                     _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(r), v);
}
#else
constexpr int64_t kRows = 3;
constexpr int kPanelsPerBlock[kRows + 1] = {0, 4, 3, 2};  // 8, 12, 12 accumulators of AVX2's 16 registers
constexpr int kCodedPanelsPerBlock[kRows + 1] = {0, 2, 1, 1};
inline Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec flag_nan(Vec seen, Vec x) {  // lanes where x is NaN set to 1
  return _mm256_blendv_ps(seen, _mm256_set1_ps(1.f), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline Vec load(const int8_t* p) {  // 8 bytes widened: two such halves beat one 16-byte load and a shuffle
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p) {  // bfloat16: the upper half of a float32
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
inline Vec load_half(const uint8_t* p) {  // float16
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline std::pair<Vec, Vec> load_nibbles(const uint8_t* p) {  // bytes' low and high 4 bits
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}
inline Vec vabs(Vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec clamp127(Vec v) { return _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-127.f), v)); }
inline void narrow_int8(Vec v, int8_t* p) {  // 8 integral floats to 8 bytes
  const __m256i i = _mm256_cvtps_epi32(v);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}
inline Vec round_bf16(Vec v) {  // to the nearest bfloat16 value, ties to even (a NaN stays a NaN)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))),
                                     _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
#endif

// int8 weights are summed over pairs of inputs: per pair, the odd input's product is added to the float32 sum, then
// the even one's, each addition rounded. That is VDPBF16PS (AVX512-BF16: two bfloat16 products per float32 lane,
// twice an FMA's work per instruction; measured to round so on this project's CPUs) and two FMAs in that order, so
// both compute the same sums, and every machine does. Int8 panels (`pack`) hold a step's pair as two rows of 16
// columns, [panel][K/2][2][16], for FMAs; on AVX512-BF16 builds a second copy (`pack_pairs`) holds each column's
// pair side by side, [panel][K/2][16][2], for VDPBF16PS. An odd K's last pair is padded with a zero.
constexpr int64_t kPair = 2;
// Rows from which int8 products take VDPBF16PS where they have the paired copy: one row (an AR step) is bound by
// memory, and widening weights to bfloat16 pairs costs more there than FMAs do (2-core AVX-512 EPYC: 7-12% slower);
// from 2 rows on the pairs win (4 rows: 0.6-0.8x the FMAs' time, 7 rows: 0.6-0.7x).
constexpr int64_t kPairRows = 2;

// A step of a chain. float32 and bfloat16 weights: one input, one FMA. X: how x is read (kXs of them per step).
template <typename W>
struct Feed {
  static constexpr int64_t kSpan = 1;
  static constexpr int64_t kXs = 1;
  using X = float;
  using In = Vec;
  static In broadcast(const X* p) { return ::broadcast(p); }
  static Vec madd(In x, const W* w, Vec acc) { return fmadd(x, load(w), acc); }
};

template <>
struct Feed<int8_t> {  // a pair of inputs as two FMAs, the odd one first
  static constexpr int64_t kSpan = kPair;
  static constexpr int64_t kXs = kPair;
  using X = float;
  struct In { Vec even, odd; };
  static In broadcast(const X* p) { return {::broadcast(p), ::broadcast(p + 1)}; }
  static Vec madd(In x, const int8_t* w, Vec acc) { return fmadd(x.even, load(w), fmadd(x.odd, load(w + kCols), acc)); }
};

#if defined(__AVX512BF16__)
constexpr bool kHasPairs = true;
struct PairedInt8 { int8_t value; };  // int8 weights in `pack_pairs`' layout

template <>
struct Feed<PairedInt8> {  // a pair of bfloat16 inputs in one 32-bit word (low half the even input)
  static constexpr int64_t kSpan = kPair;
  static constexpr int64_t kXs = 1;
  using X = uint32_t;
  using In = __m512bh;
  static In broadcast(const X* p) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(*p)); }
  static Vec madd(In x, const PairedInt8* w, Vec acc) {  // 16 columns x 2 inputs, widened in order to bf16 pairs
    const auto* b = reinterpret_cast<const __m128i*>(w);
    const Vec lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b)));
    const Vec hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1)));
    return _mm512_dpbf16_ps(acc, _mm512_cvtne2ps_pbh(hi, lo), x);
  }
};
#else
constexpr bool kHasPairs = false;
#endif

// [panels, steps, 16 x span] from w [out, in]: a step's `span` inputs as rows of 16 columns, or (`interleaved`) side
// by side for each column
at::Tensor panels_of(const at::Tensor& w, int64_t span, bool interleaved) {
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kCols - 1) / kCols, steps = (k + span - 1) / span;
  at::Tensor padded = at::zeros({panels * kCols, steps * span}, w.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(w);
  return padded.view({panels, kCols, steps, span})
      .permute({0, 2, interleaved ? 1 : 3, interleaved ? 3 : 1})
      .reshape({panels, steps, kCols * span})
      .contiguous();
}

at::Tensor pack(const at::Tensor& w) {
  const auto t = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && (t == at::kFloat || t == at::kBFloat16 || t == at::kChar) && w.device().is_cpu(),
              "idlm_panel::pack takes a 2-D float32, bfloat16 or int8 CPU weight [out, in]");
  return panels_of(w, t == at::kChar ? kPair : 1, false);
}

at::Tensor pack_pairs(const at::Tensor& w) {
  TORCH_CHECK(kHasPairs, "idlm_panel::pack_pairs needs a build for AVX512-BF16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.device().is_cpu(),
              "idlm_panel::pack_pairs takes a 2-D int8 CPU weight [out, in]");
  return panels_of(w, kPair, true);
}

// Where a product's outputs go: y [rows, ldy] from its first column on, `cols` columns of it; int8 products are then
// multiplied by per-column `scales` and (`round`) rounded to bfloat16 values
struct Out {
  float* y;
  int64_t ldy, cols;
  const float* scales;
  bool round;
  Out at(int64_t row, int64_t panel) const {
    return {y + row * ldy + panel * kCols, ldy, cols - panel * kCols, scales ? scales + panel * kCols : nullptr,
            round};
  }
};

// Weights read ahead of their use (bytes, into L1): without it a verify step's products wait on memory (2-core
// AVX-512 EPYC, int8, 7 rows: 0.85x the time with it; Intel Xeon, float32 weights from DRAM, 7 rows: 0.81x; 1 row:
// no change; 2048 or 4096 bytes ahead: the same)
constexpr int64_t kAhead = 1024;

// A register block's sums to y: int8 products' first multiplied by their columns' scales and rounded
template <int R, int P>
inline void store_block(Vec (&acc)[R][P][kVecs], const Out& out) {
  for (int p = 0; p < P; ++p) {
    if (out.scales != nullptr) {  // int8: per output column
      for (int v = 0; v < kVecs; ++v) {
        const Vec s = load(out.scales + p * kCols + v * kLanes);
        for (int r = 0; r < R; ++r) acc[r][p][v] = mul(acc[r][p][v], s);
      }
    }
    if (out.round) {
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kVecs; ++v) acc[r][p][v] = round_bf16(acc[r][p][v]);
    }
    const int64_t c = std::min(kCols, out.cols - p * kCols);
    for (int r = 0; r < R; ++r) {
      float* y = out.y + r * out.ldy + p * kCols;
      if (c == kCols) {
        for (int v = 0; v < kVecs; ++v) store(y + v * kLanes, acc[r][p][v]);
      } else {  // the last panel of a weight whose out features are not a multiple of 16
        float tail[kCols];
        for (int v = 0; v < kVecs; ++v) store(tail + v * kLanes, acc[r][p][v]);
        std::memcpy(y, tail, c * sizeof(float));
      }
    }
  }
}

// One register block: R rows x P panels, R * P * kVecs accumulators. Each output is one chain of multiply-adds over
// the inputs in order, whatever R and P: blocks only decide how many chains run side by side (a single row needs
// several panels at once, or its chains wait on the latency at every step) and how many rows share each widened
// weight. `depth`: steps of Feed<W>::kSpan inputs.
template <int R, int P, typename W>
inline void block(const typename Feed<W>::X* x, int64_t depth, const W* panel, const Out& out) {
  constexpr int64_t kStep = kCols * Feed<W>::kSpan;  // weights per panel per step
  Vec acc[R][P][kVecs];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < kVecs; ++v) acc[r][p][v] = zero();
  for (int64_t i = 0; i < depth; ++i) {
    typename Feed<W>::In xi[R];
    for (int r = 0; r < R; ++r) xi[r] = Feed<W>::broadcast(x + (r * depth + i) * Feed<W>::kXs);
    for (int p = 0; p < P; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(panel + (p * depth + i) * kStep) + kAhead, _MM_HINT_T0);
      for (int v = 0; v < kVecs; ++v) {
        const W* w = panel + (p * depth + i) * kStep + v * kLanes;
        for (int r = 0; r < R; ++r) acc[r][p][v] = Feed<W>::madd(xi[r], w, acc[r][p][v]);
      }
    }
  }
  store_block<R, P>(acc, out);
}

// ---- block-coded float32 weights: GGUF Q4_1 and Q8_0 blocks, rebuilt bit for bit ----
// A float32 weight that is exactly GGUF blocks dequantized (the embedded model's checkpoint is its GGUF's Q4_1 and
// Q8_0 weights made float32; models/block_codes.py finds the codes) is kept as those blocks: per 32 inputs of a
// column, a float16 scale d and codes q, Q4_1 4-bit q and a float16 offset m (w = d q + m), Q8_0 8-bit signed q
// (w = d q). d q is exact in float32 (an 11-bit significand times at most 8 bits), so FMA(q, d, m) and d q are the
// float32 weight bit for bit, and each weight then meets the float32 chain of `block`: the same outputs as the
// float32 panels, from 0.625 (Q4_1) or 1.06 (Q8_0) bytes a weight instead of 4. Panels [panel][K / 32][bytes]: the 16
// columns' d (32 bytes), Q4_1's m (32 bytes), then the codes, Q4_1 two inputs per byte (low 4 bits the even input)
// as 16 rows of 16 bytes, Q8_0 32 rows of 16 bytes.
constexpr int64_t kCodeBlock = 32;                                  // inputs per scale
constexpr int64_t kQ4Bytes = 4 * kCols + kCodeBlock / 2 * kCols;    // 320
constexpr int64_t kQ8Bytes = 2 * kCols + kCodeBlock * kCols;        // 544

bool coded_panels(const at::Tensor& panels) {
  return panels.dim() == 3 && panels.scalar_type() == at::kByte &&
         (panels.size(2) == kQ4Bytes || panels.size(2) == kQ8Bytes);
}

// q int8 [out, K] (Q4_1: 0 .. 15), d float16 [out, K / 32], m (Q4_1 only) float16 [out, K / 32] -> panels
at::Tensor pack_codes(const at::Tensor& q, const at::Tensor& d, const c10::optional<at::Tensor>& m) {
  const bool q4 = m.has_value() && m->defined();
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.size(1) % kCodeBlock == 0 && q.device().is_cpu(),
              "idlm_panel::pack_codes takes int8 codes [out, K] with K a multiple of ", kCodeBlock);
  const int64_t n = q.size(0), k = q.size(1), blocks = k / kCodeBlock, panels = (n + kCols - 1) / kCols;
  const auto scales_fit = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kHalf && t.dim() == 2 && t.size(0) == n && t.size(1) == blocks;
  };
  TORCH_CHECK(scales_fit(d) && (!q4 || scales_fit(*m)),
              "idlm_panel::pack_codes takes float16 scales (and offsets) [out, K / ", kCodeBlock, "]");
  const int64_t bytes = q4 ? kQ4Bytes : kQ8Bytes, codes_at = q4 ? 4 * kCols : 2 * kCols;
  at::Tensor out = at::zeros({panels, blocks, bytes}, q.options().dtype(at::kByte));
  const at::Tensor qc = q.contiguous(), dc = d.contiguous(), mc = q4 ? m->contiguous() : at::Tensor();
  const int8_t* qp = qc.const_data_ptr<int8_t>();
  const auto* dp = static_cast<const uint16_t*>(dc.const_data_ptr());
  const auto* mp = q4 ? static_cast<const uint16_t*>(mc.const_data_ptr()) : nullptr;
  uint8_t* op = out.data_ptr<uint8_t>();
  for (int64_t c = 0; c < n; ++c) {
    const int64_t lane = c % kCols;
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* blk = op + ((c / kCols) * blocks + b) * bytes;
      std::memcpy(blk + 2 * lane, dp + c * blocks + b, 2);
      if (q4) std::memcpy(blk + 2 * kCols + 2 * lane, mp + c * blocks + b, 2);
      for (int64_t i = 0; i < kCodeBlock; ++i) {
        const int8_t v = qp[c * k + b * kCodeBlock + i];
        TORCH_CHECK(!q4 || (v >= 0 && v < 16), "idlm_panel::pack_codes: a 4-bit code out of 0 .. 15");
        if (q4)
          blk[codes_at + i / 2 * kCols + lane] |= static_cast<uint8_t>(v << (4 * (i % 2)));
        else
          blk[codes_at + i * kCols + lane] = static_cast<uint8_t>(v);
      }
    }
  }
  return out;
}

// Codes read ahead of their use (a cache line of them every 4 rows of 16 bytes)
inline void ahead(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + kAhead, _MM_HINT_T0); }

// `block` for block-coded panels: each block of 32 inputs rebuilds its 16 columns' weights in registers, then every
// row's chain takes them in input order, as `block` does the float32 ones
template <int R, int P, bool Q4>
inline void coded_block(const float* x, int64_t blocks, const uint8_t* panel, const Out& out) {
  constexpr int64_t kBytes = Q4 ? kQ4Bytes : kQ8Bytes, kCodesAt = Q4 ? 4 * kCols : 2 * kCols;
  const int64_t depth = blocks * kCodeBlock;
  Vec acc[R][P][kVecs];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < kVecs; ++v) acc[r][p][v] = zero();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kCodeBlock;
    const uint8_t* blk[P];
    Vec d[P][kVecs], m[P][kVecs];
    for (int p = 0; p < P; ++p) {
      blk[p] = panel + (p * blocks + b) * kBytes;
      for (int v = 0; v < kVecs; ++v) {
        d[p][v] = load_half(blk[p] + 2 * v * kLanes);
        if constexpr (Q4) m[p][v] = load_half(blk[p] + 2 * kCols + 2 * v * kLanes);
      }
    }
    if constexpr (Q4) {
      for (int64_t j = 0; j < kCodeBlock / 2; ++j) {  // inputs 2j (the low 4 bits) and 2j + 1
        Vec lo[P][kVecs], hi[P][kVecs];
        for (int p = 0; p < P; ++p) {
          if (j % 4 == 0) ahead(blk[p] + kCodesAt + j * kCols);
          for (int v = 0; v < kVecs; ++v) {
            const auto [l, h] = load_nibbles(blk[p] + kCodesAt + j * kCols + v * kLanes);
            lo[p][v] = fmadd(l, d[p][v], m[p][v]);
            hi[p][v] = fmadd(h, d[p][v], m[p][v]);
          }
        }
        for (int r = 0; r < R; ++r) {
          const Vec x0 = broadcast(x + r * depth + i0 + 2 * j), x1 = broadcast(x + r * depth + i0 + 2 * j + 1);
          for (int p = 0; p < P; ++p)
            for (int v = 0; v < kVecs; ++v) acc[r][p][v] = fmadd(x1, hi[p][v], fmadd(x0, lo[p][v], acc[r][p][v]));
        }
      }
    } else {
      for (int64_t j = 0; j < kCodeBlock; ++j) {
        Vec w[P][kVecs];
        for (int p = 0; p < P; ++p) {
          if (j % 4 == 0) ahead(blk[p] + kCodesAt + j * kCols);
          for (int v = 0; v < kVecs; ++v)
            w[p][v] = mul(load(reinterpret_cast<const int8_t*>(blk[p] + kCodesAt + j * kCols + v * kLanes)), d[p][v]);
        }
        for (int r = 0; r < R; ++r) {
          const Vec xj = broadcast(x + r * depth + i0 + j);
          for (int p = 0; p < P; ++p)
            for (int v = 0; v < kVecs; ++v) acc[r][p][v] = fmadd(xj, w[p][v], acc[r][p][v]);
        }
      }
    }
  }
  store_block<R, P>(acc, out);
}

// Panels [begin, end) of a product with m rows on this thread: walked in chunks that stay in the thread's L2 cache
// while every block of up to MaxRows rows runs against the chunk, PerBlock[R] panels at a time for a block of R rows
// (then the 1 .. PerBlock[R] - 1 left). `run(rows, panels, r, p)` runs the register block of `rows` rows from row r
// against `panels` panels from panel p (both std::integral_constant).
template <int64_t MaxRows, const int (&PerBlock)[MaxRows + 1], typename Run>
void walk(int64_t m, int64_t panel_bytes, int64_t begin, int64_t end, Run&& run) {
  const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, panel_bytes));
  const int64_t step = m <= MaxRows ? end - begin : per_chunk;  // one row block: no chunk needs to stay cached
  for (int64_t p0 = begin; p0 < end; p0 += step) {
    const int64_t count = std::min(step, end - p0);
    for (int64_t r = 0; r < m; r += MaxRows) {
      dispatch<MaxRows>(std::min(MaxRows, m - r), [&](auto rows) {
        constexpr int P = PerBlock[decltype(rows)::value];
        int64_t j = 0;
        for (; j + P <= count; j += P) run(rows, std::integral_constant<int, P>{}, r, p0 + j);
        if constexpr (P > 1) {
          if (j < count) dispatch<P - 1>(count - j, [&](auto panels) { run(rows, panels, r, p0 + j); });
        }
      });
    }
  }
}

// Panels [begin, end) of y [m, ...] = x [m, depth steps] @ w.T on this thread, `out` at the weight's panel 0
template <typename W>
void panel_range(const typename Feed<W>::X* xp, int64_t m, int64_t depth, const W* pp, int64_t begin, int64_t end,
                 const Out& out) {
  const int64_t panel_size = depth * kCols * Feed<W>::kSpan;
  auto run = [&](auto rows, auto panels, int64_t r, int64_t p) {
    block<decltype(rows)::value, decltype(panels)::value, W>(xp + r * depth * Feed<W>::kXs, depth,
                                                             pp + p * panel_size, out.at(r, p));
  };
  walk<kRows, kPanelsPerBlock>(m, panel_size * sizeof(W), begin, end, run);
}

// y = x [m, depth steps] @ w.T (`out`), each thread a range of the panels
template <typename W>
void product(const typename Feed<W>::X* xp, int64_t m, int64_t depth, const at::Tensor& panels, const Out& out) {
  const W* pp = static_cast<const W*>(panels.const_data_ptr());
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    panel_range<W>(xp, m, depth, pp, begin, end, out);
  });
}

// The checks and the output every product shares: y [..., out] for x [..., K] against panels of `depth` steps
at::Tensor output(const at::Tensor& x, const at::Tensor& panels, int64_t depth, int64_t out_features) {
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.size(1) == depth,
              "idlm_panel: x [..., K] does not match the panels (idlm_panel::pack of a [out, K] weight)");
  TORCH_CHECK(out_features > (panels.size(0) - 1) * kCols && out_features <= panels.size(0) * kCols,
              "idlm_panel: out_features does not match the panels");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return at::empty(shape, x.options().dtype(at::kFloat));
}

void add_bias(at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) y.add_(*bias);
}

// Panels [begin, end) of x [m, k] float32 @ w.T for float32 or bfloat16 panels (weights that bfloat16 holds exactly:
// half the bytes, the same sums) or block-coded ones (`pack_codes`: the same sums again)
void float_range(const float* x, int64_t m, int64_t k, const at::Tensor& panels, int64_t begin, int64_t end,
                 const Out& out) {
  if (coded_panels(panels)) {
    const int64_t blocks = panels.size(1), bytes = panels.size(2);
    const uint8_t* pp = panels.const_data_ptr<uint8_t>();
    auto run = [&](auto rows, auto count, int64_t r, int64_t p) {
      constexpr int R = decltype(rows)::value, P = decltype(count)::value;
      if (bytes == kQ4Bytes)
        coded_block<R, P, true>(x + r * k, blocks, pp + p * blocks * bytes, out.at(r, p));
      else
        coded_block<R, P, false>(x + r * k, blocks, pp + p * blocks * bytes, out.at(r, p));
    };
    walk<kRows, kCodedPanelsPerBlock>(m, blocks * bytes, begin, end, run);
  } else if (panels.scalar_type() == at::kBFloat16)
    panel_range<uint16_t>(x, m, k, static_cast<const uint16_t*>(panels.const_data_ptr()), begin, end, out);
  else
    panel_range<float>(x, m, k, panels.const_data_ptr<float>(), begin, end, out);
}

bool float_panels(const at::Tensor& panels) {
  return panels.size(-1) == kCols && (panels.scalar_type() == at::kFloat || panels.scalar_type() == at::kBFloat16);
}

// A frozen adapter's delta, y[rows] += (x[rows] @ a.T) @ b.T (every row when rows is None), on the rows its gate
// opens: by `add_lora` on a product's output, or inside the product's own call (`linear`, `linear_w8a8`), each thread
// adding it to the columns it has just stored: one operator call and one fork-join per projection group instead of
// two of each (fixed costs that were most of the adapter's time in a verify step). b is
// block-diagonal (a fused group's parts each have their own output and rank columns) and given by its blocks alone:
// block j, `b_panels[j]` (`pack` of its [out, rank] weight), reads columns blocks[3j + 2] .. + its rank of
// h = x @ a.T and adds to y's columns blocks[3j] .. + blocks[3j + 1]; the zeros between blocks are neither read nor
// multiplied. h is computed as the call starts, on the calling thread (a few rows by a few dozen columns). The sums
// are linear's and each output gets one addition, so y is bit for bit the product's plus the two products' delta (up
// to the sign of a zero), whichever thread adds which columns. The few gated rows are copied and added by plain
// loops (aten's index_select and index_add cost 8 and 17 us a call).
class Delta {
 public:
  Delta(const at::Tensor& x, int64_t n, const at::Tensor& a_panels, int64_t rank, at::TensorList b_panels,
        at::IntArrayRef blocks, const c10::optional<at::Tensor>& rows)
      : n_(n), b_(b_panels), blocks_(blocks), from_(b_panels.size() + 1, 0) {
    const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
    TORCH_CHECK(x.scalar_type() == at::kFloat && float_panels(a_panels) && a_panels.dim() == 3 &&
                    a_panels.is_contiguous() && a_panels.size(1) == k && rank > (a_panels.size(0) - 1) * kCols &&
                    rank <= a_panels.size(0) * kCols,
                "idlm_panel: an adapter takes float32 x [..., K] and A's panels ([rank, K])");
    TORCH_CHECK(blocks.size() == 3 * b_panels.size(), "idlm_panel: an adapter's B has three numbers per block");
    for (size_t j = 0; j < b_panels.size(); ++j) {
      const at::Tensor& b = b_panels[j];
      const int64_t col = blocks[3 * j], cols = blocks[3 * j + 1], h0 = blocks[3 * j + 2];
      TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && float_panels(b) && col >= 0 && col + cols <= n &&
                      cols > (b.size(0) - 1) * kCols && cols <= b.size(0) * kCols && h0 >= 0 &&
                      h0 + b.size(1) <= rank,
                  "idlm_panel: the adapter's block ", j, " does not fit y or the rank");
      from_[j + 1] = from_[j] + b.size(1);
    }
    gated_ = rows.has_value() && rows->defined();
    TORCH_CHECK(!gated_ || (rows->scalar_type() == at::kLong && rows->dim() == 1),
                "idlm_panel: an adapter's rows are 1-D int64");
    if (gated_) index_ = rows->contiguous();
    g_ = gated_ ? index_.numel() : m;
    // the gated rows of x, h = x @ a.T, and each block's columns of h as [g, its rank]
    std::vector<float> picked(g_ * k), h(g_ * rank);
    const at::Tensor xs = x.contiguous();
    const float* xp = xs.const_data_ptr<float>();
    for (int64_t i = 0; i < g_; ++i) {
      TORCH_CHECK(row(i) >= 0 && row(i) < m, "idlm_panel: adapter row ", row(i), " out of ", m);
      std::memcpy(picked.data() + i * k, xp + row(i) * k, k * sizeof(float));
    }
    float_range(picked.data(), g_, k, a_panels, 0, a_panels.size(0), {h.data(), rank, rank, nullptr, false});
    hb_.resize(g_ * from_.back());
    for (size_t j = 0; j < b_panels.size(); ++j)
      for (int64_t i = 0; i < g_; ++i)
        std::memcpy(hb_.data() + g_ * from_[j] + i * (from_[j + 1] - from_[j]), h.data() + i * rank + blocks[3 * j + 2],
                    (from_[j + 1] - from_[j]) * sizeof(float));
  }

  // y [m, n]'s columns [c0, c1) of the gated rows += the delta's
  void add(float* y, int64_t c0, int64_t c1) const {
    std::vector<float> delta;
    for (size_t j = 0; j < b_.size() && g_ > 0; ++j) {
      const int64_t col = blocks_[3 * j], cols = blocks_[3 * j + 1];
      const int64_t lo = std::max(c0, col) - col, hi = std::min(c1, col + cols) - col;
      if (lo >= hi) continue;
      const int64_t p0 = lo / kCols, p1 = (hi + kCols - 1) / kCols, width = (p1 - p0) * kCols;
      delta.resize(g_ * width);  // the block's panels p0 .. p1 of the delta, as [g, width] from panel p0 on
      float_range(hb_.data() + g_ * from_[j], g_, from_[j + 1] - from_[j], b_[j], p0, p1,
                  {delta.data() - p0 * kCols, width, cols, nullptr, false});
      for (int64_t i = 0; i < g_; ++i) {
        float* out = y + row(i) * n_ + col;
        const float* d = delta.data() + i * width - p0 * kCols;
        for (int64_t c = lo; c < hi; ++c) out[c] += d[c];
      }
    }
  }

 private:
  int64_t row(int64_t i) const { return gated_ ? index_.const_data_ptr<int64_t>()[i] : i; }

  int64_t n_, g_ = 0;
  at::TensorList b_;
  at::IntArrayRef blocks_;
  std::vector<int64_t> from_;  // each block's first column of hb
  bool gated_ = false;
  at::Tensor index_;
  std::vector<float> hb_;
};

std::optional<Delta> delta_of(const at::Tensor& x, int64_t n, const c10::optional<at::Tensor>& a_panels, int64_t rank,
                              at::TensorList b_panels, at::IntArrayRef blocks, const c10::optional<at::Tensor>& rows) {
  if (!a_panels.has_value() || !a_panels->defined()) return std::nullopt;
  return std::optional<Delta>(std::in_place, x, n, *a_panels, rank, b_panels, blocks, rows);
}

// Once a thread has stored panels [begin, end) of y [m, n]: their columns' bias, then an adapter's delta (the order
// of the separate calls: a product with its bias, then `add_lora`)
void finish(float* y, int64_t m, int64_t n, const at::Tensor& bias, const std::optional<Delta>& delta, int64_t begin,
            int64_t end) {
  const int64_t c0 = begin * kCols, c1 = std::min(end * kCols, n);
  if (bias.defined()) {
    const float* b = bias.const_data_ptr<float>();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = c0; c < c1; ++c) y[r * n + c] += b[c];
  }
  if (delta) delta->add(y, c0, c1);
}

at::Tensor float_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->numel() == n, "idlm_panel: the bias has ", bias->numel(), " values for ", n, " outputs");
  return bias->to(at::kFloat).contiguous().view({n});
}

// y [..., out] = x [..., K] @ w.T (+ bias) (+ an adapter's delta, `Delta`), float32 x, float32, bfloat16 or
// block-coded panels
at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_a, int64_t lora_rank,
                  at::TensorList lora_b, at::IntArrayRef lora_blocks, const c10::optional<at::Tensor>& lora_rows) {
  const bool coded = coded_panels(panels);
  TORCH_CHECK(x.scalar_type() == at::kFloat && (float_panels(panels) || coded),
              "idlm_panel::linear takes float32 x and float32, bfloat16 or block-coded panels (idlm_panel::pack, "
              "idlm_panel::pack_codes)");
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  at::Tensor y = output(x, panels, !coded ? k : k % kCodeBlock == 0 ? k / kCodeBlock : -1, out_features);
  const at::Tensor xc = x.reshape({m, k}).contiguous(), b = float_bias(bias, out_features);
  const std::optional<Delta> delta = delta_of(xc, out_features, lora_a, lora_rank, lora_b, lora_blocks, lora_rows);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    float_range(xc.const_data_ptr<float>(), m, k, panels, begin, end, {yp, out_features, out_features, nullptr, false});
    finish(yp, m, out_features, b, delta, begin, end);
  });
  return y;
}

// x [m, k] bfloat16 as `depth` steps of kPair inputs per row in Feed<W>'s form (an odd K's last pair padded with a
// zero): float32 for FMAs, bfloat16 pairs in 32-bit words for VDPBF16PS (x's own bytes when K is even)
template <typename W>
const typename Feed<W>::X* pairs_of(const uint16_t* xb, int64_t m, int64_t k, int64_t depth,
                                    std::vector<typename Feed<W>::X>& buffer) {
  using X = typename Feed<W>::X;
  constexpr bool as_words = std::is_same_v<X, uint32_t>;
  if (as_words && k % 2 == 0) return reinterpret_cast<const X*>(xb);
  buffer.assign(m * depth * Feed<W>::kXs, X{});
  uint16_t* words = reinterpret_cast<uint16_t*>(buffer.data());
  float* floats = reinterpret_cast<float*>(buffer.data());
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      if (as_words) {
        words[r * depth * kPair + i] = xb[r * k + i];
      } else {
        const uint32_t bits = uint32_t{xb[r * k + i]} << 16;
        std::memcpy(floats + r * depth * kPair + i, &bits, sizeof(float));
      }
    }
  }
  return buffer.data();
}

template <typename W>
void int8_product(const uint16_t* xb, int64_t m, int64_t k, int64_t depth, const at::Tensor& panels, const Out& out) {
  std::vector<typename Feed<W>::X> buffer;
  product<W>(pairs_of<W>(xb, m, k, depth, buffer), m, depth, panels, out);
}

// int8 weights per output channel against bfloat16 x: y = (x @ q.T) * scales summed in float32 (scales padded to the
// panels) and rounded to bfloat16 values (returned as float32, so a consumer in float32 needs no cast), by FMAs on
// `panels` (`pack`), or from kPairRows rows by VDPBF16PS on `pairs` (`pack_pairs`) when given: the same sums
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& pairs,
                       const at::Tensor& scales, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && panels.scalar_type() == at::kChar &&
                  panels.size(-1) == kCols * kPair,
              "idlm_panel::linear_int8 takes bfloat16 x and int8 panels (idlm_panel::pack of int8 weights)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 1 &&
                  scales.size(0) == panels.size(0) * kCols,
              "idlm_panel::linear_int8 takes float32 scales padded to 16 x panels");
  const bool paired = pairs.has_value() && pairs->defined();
  TORCH_CHECK(!paired || (kHasPairs && pairs->sizes() == panels.sizes() && pairs->is_contiguous()),
              "idlm_panel::linear_int8: pairs are idlm_panel::pack_pairs of the panels' weight");
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1), depth = (k + kPair - 1) / kPair;
  at::Tensor y = output(x, panels, depth, out_features);
  const at::Tensor xc = x.reshape({m, k}).contiguous();
  const auto* xb = static_cast<const uint16_t*>(xc.const_data_ptr());
  const Out out{y.data_ptr<float>(), out_features, out_features, scales.const_data_ptr<float>(), true};
  if (paired && m >= kPairRows) {  // paired: a build with the instruction (checked above)
#if defined(__AVX512BF16__)
    int8_product<PairedInt8>(xb, m, k, depth, *pairs, out);
#endif
  } else {
    int8_product<int8_t>(xb, m, k, depth, panels, out);
  }
  add_bias(y, bias);
  return y;
}

// y[rows] += (x[rows] @ a.T) @ b.T in place (every row when rows is None): `Delta` on a product's output, for
// products that cannot add it themselves (int8's, oneDNN's)
void add_lora(at::Tensor y, const at::Tensor& x, const at::Tensor& a_panels, int64_t rank, at::TensorList b_panels,
              at::IntArrayRef blocks, const c10::optional<at::Tensor>& rows) {
  const int64_t n = y.size(-1), k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == m * n,
              "idlm_panel::add_lora: contiguous float32 y [..., out] with one row per row of x");
  const Delta delta(x, n, a_panels, rank, b_panels, blocks, rows);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    delta.add(yp, begin * kCols, std::min(end * kCols, n));
  });
}

// ---- w8a8: int8 weights against int8 activations, integer sums (llama.cpp's scheme: Q8 activations) ----
// y = sum over blocks b of 32 inputs of float(xq_b . wq_b) * xs_b, times the column's scale, where each row of x is
// quantized per block (xs_b = max |x_b| / 127, xq_b = round(x_b / xs_b), ties to even) as the call starts. A block's
// sum is an exact int32 (|.| <= 32 * 127 * 127), so it is the same number whichever instructions compute it; the
// blocks are then added to a float32 sum by one FMA each, in order, and scaled by one multiply: every build, row
// count and block shape computes a row's output bit for bit alike. Weights are packed [panel][K/4][16][4]: four
// consecutive inputs of a column in one 32-bit word, what VPDPBUSD multiplies (AVX512-VNNI: 64 products per
// instruction, with no widening, where the bf16 pairs above do 32 after widening). VPDPBUSD multiplies unsigned by
// signed bytes, so VNNI builds keep each weight + 128 (0..254) and take 128 x (the block's sum of xq) back off;
// AVX2 builds keep the signed weights and move x's sign onto them (|x| x sign(x) w by VPMADDUBSW: pairs reach at
// most 2 x 127 x 127, below its saturation).
constexpr int64_t kQuad = 4;  // inputs per 32-bit word
constexpr int64_t kBlock = 32;  // inputs per activation scale
constexpr int64_t kQuadsPerBlock = kBlock / kQuad;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kUnsignedWeights = true;
constexpr int64_t kRowsQ = 8;
constexpr int kPanelsPerBlockQ[kRowsQ + 1] = {0, 6, 4, 3, 3, 2, 2, 2, 2};
struct IAcc { __m512i v; };
struct FAcc { __m512 v; };
struct WReg { __m512i v; };
inline IAcc izero() { return {_mm512_setzero_si512()}; }
inline FAcc fzero() { return {_mm512_setzero_ps()}; }
inline WReg wload(const int8_t* p) { return {_mm512_loadu_si512(p)}; }
inline IAcc dot(IAcc acc, WReg w, int32_t x4) { return {_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(x4))}; }
inline FAcc block_sum(FAcc f, IAcc i, int32_t minus, float scale) {  // f + float(i - minus) * scale, one FMA
  return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i.v, _mm512_set1_epi32(minus))), _mm512_set1_ps(scale),
                          f.v)};
}
inline void fstore(float* p, FAcc f, const float* scales) { _mm512_storeu_ps(p, _mm512_mul_ps(f.v, _mm512_loadu_ps(scales))); }
#else
constexpr bool kUnsignedWeights = false;
constexpr int64_t kRowsQ = 2;
constexpr int kPanelsPerBlockQ[kRowsQ + 1] = {0, 2, 1};
struct IAcc { __m256i lo, hi; };
struct FAcc { __m256 lo, hi; };
struct WReg { __m256i lo, hi; };
inline IAcc izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline FAcc fzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline WReg wload(const int8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline __m256i dot8(__m256i acc, __m256i w, __m256i x) {  // 8 columns x 4 inputs
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
inline IAcc dot(IAcc acc, WReg w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {dot8(acc.lo, w.lo, x), dot8(acc.hi, w.hi, x)};
}
inline __m256 fma8(__m256 f, __m256i i, int32_t minus, float scale) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i, _mm256_set1_epi32(minus))), _mm256_set1_ps(scale), f);
}
inline FAcc block_sum(FAcc f, IAcc i, int32_t minus, float scale) {
  return {fma8(f.lo, i.lo, minus, scale), fma8(f.hi, i.hi, minus, scale)};
}
inline void fstore(float* p, FAcc f, const float* scales) {
  _mm256_storeu_ps(p, _mm256_mul_ps(f.lo, _mm256_loadu_ps(scales)));
  _mm256_storeu_ps(p + 8, _mm256_mul_ps(f.hi, _mm256_loadu_ps(scales + 8)));
}
#endif

// A row of x quantized: `blocks` of kBlock int8 inputs (as kQuadsPerBlock 32-bit words each), their scales, and what
// the unsigned weights add to each block's sum (128 x its sum of xq; 0 for signed weights)
struct QRows {
  std::vector<int32_t> words;
  std::vector<float> scales;
  std::vector<int32_t> minus;
};

// A whole block's inputs in registers: its largest magnitude by vector maxima, its quotients by the scale rounded to
// the nearest integer (ties to even: nearbyint's rule) and clamped, narrowed to int8. The same values as the scalar
// loop below bit for bit, in 0.1x its time (a verify step's 7 rows were some 1 ms of its 30 layers' products).
constexpr int kBlockVecs = kBlock / kLanes;
void quantize_block(const float* xb, int8_t* out, float& scale_out, int32_t& sum_out) {
  Vec x[kBlockVecs];
  Vec amax = zero();
  for (int v = 0; v < kBlockVecs; ++v) {
    x[v] = load(xb + v * kLanes);
    amax = vmax(amax, vabs(x[v]));
  }
  const float scale = hmax(amax) / 127.f;
  float sum = 0.f;  // of integers of at most 32 x 127 in magnitude: exact in any order
  if (scale > 0.f) {
    const Vec s = broadcast(&scale);
    for (int v = 0; v < kBlockVecs; ++v) {
      const Vec qv = clamp127(vround(vdiv(x[v], s)));
      narrow_int8(qv, out + v * kLanes);
      sum += hsum(qv);
    }
  } else {
    std::memset(out, 0, kBlock);
  }
  scale_out = scale;
  sum_out = static_cast<int32_t>(sum);
}

QRows quantize_rows(const float* x, int64_t m, int64_t k, int64_t blocks) {
  QRows q{std::vector<int32_t>(m * blocks * kQuadsPerBlock, 0), std::vector<float>(m * blocks, 0.f),
          std::vector<int32_t>(m * blocks, 0)};
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * k + b * kBlock;
      const int64_t n = std::min(kBlock, k - b * kBlock);
      if (n == kBlock) {
        int32_t sum = 0;
        quantize_block(xb, reinterpret_cast<int8_t*>(q.words.data() + (r * blocks + b) * kQuadsPerBlock),
                       q.scales[r * blocks + b], sum);
        q.minus[r * blocks + b] = kUnsignedWeights ? 128 * sum : 0;
        continue;
      }
      float amax = 0.f;
      for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 127.f;
      int8_t* out = reinterpret_cast<int8_t*>(q.words.data() + (r * blocks + b) * kQuadsPerBlock);
      int32_t sum = 0;
      if (scale > 0.f) {
        for (int64_t i = 0; i < n; ++i) {
          const float v = std::min(127.f, std::max(-127.f, std::nearbyint(xb[i] / scale)));
          out[i] = static_cast<int8_t>(v);
          sum += out[i];
        }
      }
      q.scales[r * blocks + b] = scale;
      q.minus[r * blocks + b] = kUnsignedWeights ? 128 * sum : 0;
    }
  }
  return q;
}

// Row r, panel p of a w8a8 product's float32 sums into `out`, times the columns' scales (of a weight's last panel,
// only the columns it has)
inline void store_scaled(FAcc f, const Out& out, int64_t r, int64_t p) {
  float* y = out.y + r * out.ldy + p * kCols;
  const int64_t c = std::min(kCols, out.cols - p * kCols);
  if (c == kCols) {
    fstore(y, f, out.scales + p * kCols);
  } else {
    float tail[kCols];
    fstore(tail, f, out.scales + p * kCols);
    std::memcpy(y, tail, c * sizeof(float));
  }
}

// R rows x P panels: per block, kQuadsPerBlock VPDPBUSD (or their AVX2 form) per row and panel into exact int32 sums,
// then one FMA per row and panel into the float32 sums
template <int R, int P>
inline void qblock(const QRows& q, int64_t row0, int64_t blocks, const int8_t* panel, const Out& out) {
  constexpr int64_t kPanelBytes = kCols * kQuad;  // per panel per quad
  FAcc f[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) f[r][p] = fzero();
  for (int64_t b = 0; b < blocks; ++b) {
    IAcc acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = izero();
    const int32_t* xw = q.words.data() + (row0 * blocks + b) * kQuadsPerBlock;
    for (int64_t j = 0; j < kQuadsPerBlock; ++j) {
      const int64_t quad = b * kQuadsPerBlock + j;
      for (int p = 0; p < P; ++p) {
        const int8_t* w = panel + (p * blocks * kQuadsPerBlock + quad) * kPanelBytes;
        _mm_prefetch(reinterpret_cast<const char*>(w) + kAhead, _MM_HINT_T0);
        const WReg wr = wload(w);
        for (int r = 0; r < R; ++r) acc[r][p] = dot(acc[r][p], wr, xw[r * blocks * kQuadsPerBlock + j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t i = (row0 + r) * blocks + b;
      for (int p = 0; p < P; ++p) f[r][p] = block_sum(f[r][p], acc[r][p], q.minus[i], q.scales[i]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) store_scaled(f[r][p], out, r, p);
}

// AMX (Intel's tile unit, AVX512 CPUs with AMX-INT8): products of many rows (batched verify steps, prefill chunks)
// are bound by VPDPBUSD's throughput (rows x 8 quads per block and panel). TDPBSUD multiplies a tile of up to 16 rows
// x 32 inputs (one block: A, the rows' int8 words as they lie in QRows) by a panel's 8 quads x 16 columns of unsigned
// weights (B, the panel's bytes as packed: [quad][16 columns x 4]) into int32 sums in one instruction: the same
// integers as the VPDPBUSD chains, then the same float32 sums per block in the same order (`block_sum`), so a row's
// outputs are the same bits by either unit. Each block's sums go through memory to be converted (the per-block
// activation scales), which caps the gain: 28 rows 0.77x VNNI's time, 16 rows 0.79x, 12 0.89x, 7 1.06x (Xeon model
// 167, 2026-12-06). Used from kAmxRows rows, where the OS grants the tile state (`amx_ready`).
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__)
constexpr int64_t kAmxRows = 10;
constexpr int64_t kAmxMaxRows = 16;  // rows of a tile
constexpr int kAmxPanels = 4;  // per group: C tiles 0-3, A tile 4, B tiles 5-6

bool amx_ready() {  // asks Linux once for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void amx_configure(int64_t m) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(m);
    cfg.colsb[t] = kCols * 4;
  }
  cfg.rows[4] = static_cast<uint8_t>(m);
  cfg.colsb[4] = kBlock;
  for (int t = 5; t < 7; ++t) {
    cfg.rows[t] = kQuadsPerBlock;
    cfg.colsb[t] = kCols * kQuad;
  }
  _tile_loadconfig(&cfg);
}

// m rows from row0 against np <= kAmxPanels panels, tiles configured for m rows
void amx_block(const QRows& q, int64_t row0, int64_t m, int64_t blocks, const int8_t* panel, int64_t panel_bytes,
               int np, const Out& out) {
  constexpr int64_t kTileBytes = kQuadsPerBlock * kCols * kQuad;  // a panel's block of weights
  constexpr int kLd = kCols * 4;
  alignas(64) int32_t sums[kAmxPanels][kAmxMaxRows][kCols];
  FAcc f[kAmxPanels][kAmxMaxRows];
  for (int p = 0; p < np; ++p)
    for (int64_t r = 0; r < m; ++r) f[p][r] = fzero();
  const int8_t* a = reinterpret_cast<const int8_t*>(q.words.data() + row0 * blocks * kQuadsPerBlock);
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* w = panel + b * kTileBytes;
    _tile_loadd(4, a + b * kBlock, blocks * kBlock);
    _tile_zero(0);
    _tile_loadd(5, w, kCols * kQuad);
    _tile_dpbsud(0, 4, 5);
    if (np > 1) {
      _tile_zero(1);
      _tile_loadd(6, w + panel_bytes, kCols * kQuad);
      _tile_dpbsud(1, 4, 6);
    }
    if (np > 2) {
      _tile_zero(2);
      _tile_loadd(5, w + 2 * panel_bytes, kCols * kQuad);
      _tile_dpbsud(2, 4, 5);
    }
    if (np > 3) {
      _tile_zero(3);
      _tile_loadd(6, w + 3 * panel_bytes, kCols * kQuad);
      _tile_dpbsud(3, 4, 6);
    }
    _tile_stored(0, sums[0], kLd);
    if (np > 1) _tile_stored(1, sums[1], kLd);
    if (np > 2) _tile_stored(2, sums[2], kLd);
    if (np > 3) _tile_stored(3, sums[3], kLd);
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = (row0 + r) * blocks + b;
      for (int p = 0; p < np; ++p)
        f[p][r] = block_sum(f[p][r], {_mm512_load_si512(sums[p][r])}, q.minus[i], q.scales[i]);
    }
  }
  for (int p = 0; p < np; ++p)
    for (int64_t r = 0; r < m; ++r) store_scaled(f[p][r], out, r, p);
}

// panels [begin, end) of all m rows on this thread: chunks of panels kept in L2 while each 16-row block runs
void amx_range(const QRows& q, int64_t m, int64_t blocks, const int8_t* panels, int64_t panel_bytes, int64_t begin,
               int64_t end, const Out& out) {
  const int64_t per_chunk = std::max<int64_t>(kAmxPanels, kChunkBytes / panel_bytes / kAmxPanels * kAmxPanels);
  int64_t configured = 0;
  for (int64_t p0 = begin; p0 < end; p0 += per_chunk) {
    const int64_t p1 = std::min(end, p0 + per_chunk);
    for (int64_t r = 0; r < m; r += kAmxMaxRows) {
      const int64_t rows = std::min(kAmxMaxRows, m - r);
      if (rows != configured) amx_configure(configured = rows);
      for (int64_t p = p0; p < p1; p += kAmxPanels)
        amx_block(q, r, rows, blocks, panels + p * panel_bytes, panel_bytes,
                  static_cast<int>(std::min<int64_t>(kAmxPanels, p1 - p)), out.at(r, p));
    }
  }
  _tile_release();
}
#endif

at::Tensor pack_w8a8(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.device().is_cpu(),
              "idlm_panel::pack_w8a8 takes a 2-D int8 CPU weight [out, in]");
  const int64_t k = w.size(1), padded = (k + kBlock - 1) / kBlock * kBlock;
  at::Tensor wp = at::constant_pad_nd(w, {0, padded - k});
  if (kUnsignedWeights) wp = (wp.to(at::kShort) + 128).to(at::kByte).view(at::kChar);  // the bits of w + 128
  return panels_of(wp, kQuad, true);
}

// y [..., out] = w8a8 product of x [..., K] float32 and `pack_w8a8` panels with float32 per-column scales (padded
// to 16 x panels)
at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scales, int64_t out_features,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_a,
                       int64_t lora_rank, at::TensorList lora_b, at::IntArrayRef lora_blocks,
                       const c10::optional<at::Tensor>& lora_rows) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.scalar_type() == at::kChar && panels.size(-1) == kCols * kQuad,
              "idlm_panel::linear_w8a8 takes float32 x and int8 panels (idlm_panel::pack_w8a8)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 1 &&
                  scales.size(0) == panels.size(0) * kCols,
              "idlm_panel::linear_w8a8 takes float32 scales padded to 16 x panels");
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1), blocks = (k + kBlock - 1) / kBlock;
  at::Tensor y = output(x, panels, blocks * kQuadsPerBlock, out_features);
  const at::Tensor xc = x.reshape({m, k}).contiguous();
  const QRows q = quantize_rows(xc.const_data_ptr<float>(), m, k, blocks);
  const auto* pp = static_cast<const int8_t*>(panels.const_data_ptr());
  const int64_t panel_bytes = blocks * kBlock * kCols;
  const Out out{y.data_ptr<float>(), out_features, out_features, scales.const_data_ptr<float>(), false};
  auto run = [&](auto rows, auto panels_now, int64_t r, int64_t p) {
    qblock<decltype(rows)::value, decltype(panels_now)::value>(q, r, blocks, pp + p * panel_bytes, out.at(r, p));
  };
  const at::Tensor b = float_bias(bias, out_features);
  const std::optional<Delta> delta = delta_of(xc, out_features, lora_a, lora_rank, lora_b, lora_blocks, lora_rows);
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__)
  const bool tiles = m >= kAmxRows && amx_ready();
#else
  const bool tiles = false;
#endif
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__)
    if (tiles)
      amx_range(q, m, blocks, pp, panel_bytes, begin, end, out);
    else
#endif
      walk<kRowsQ, kPanelsPerBlockQ>(m, panel_bytes, begin, end, run);
    finish(out.y, m, out_features, b, delta, begin, end);
  });
  return y;
}

// ---- argmax: the LM head's greedy choice ----
// The index of each row's largest value: the first of equal ones (-0 equals +0), the first NaN if the row has one
// (torch.argmax's rule). aten's reduction took 73 us for one row of the embedded model's 49,152 logits and 290 us for
// the 7 rows of a verify step (2-core Xeon, 2026-12-06); this reads a row twice, a vector maximum then a scan for
// its first index, rows split between threads.
int64_t row_argmax(const float* p, int64_t n) {
  constexpr int64_t kStep = 4 * kCols;  // four 16-float maxima side by side
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
  if (n >= kStep) {
    Vec acc[4][kVecs], seen_nan[kVecs];
    for (int v = 0; v < kVecs; ++v) seen_nan[v] = zero();
    for (int a = 0; a < 4; ++a)
      for (int v = 0; v < kVecs; ++v) acc[a][v] = broadcast(&best);
    for (; i + kStep <= n; i += kStep) {
      for (int a = 0; a < 4; ++a) {
        for (int v = 0; v < kVecs; ++v) {
          const Vec x = load(p + i + a * kCols + v * kLanes);
          seen_nan[v] = flag_nan(seen_nan[v], x);
          acc[a][v] = vmax(acc[a][v], x);
        }
      }
    }
    float lanes[kCols];
    for (int a = 0; a < 4; ++a)
      for (int v = 0; v < kVecs; ++v) {
        store(lanes + v * kLanes, acc[a][v]);
        for (int64_t l = 0; l < kLanes; ++l) best = std::max(best, lanes[v * kLanes + l]);
      }
    for (int v = 0; v < kVecs; ++v) {
      store(lanes, seen_nan[v]);
      for (int64_t l = 0; l < kLanes; ++l) nan = nan || lanes[l] != 0.f;
    }
  }
  for (; i < n; ++i) {
    nan = nan || std::isnan(p[i]);
    best = std::max(best, p[i]);
  }
  for (int64_t j = 0; j < n; ++j)
    if (nan ? std::isnan(p[j]) : p[j] == best) return j;
  return 0;  // unreachable: n > 0, and the scan meets `best` (or the NaN) in the row
}

at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) > 0,
              "idlm_panel::argmax takes float32 x [..., n] with n > 0");
  const int64_t n = x.size(-1), m = x.numel() / n;
  const at::Tensor xc = x.reshape({m, n}).contiguous();
  at::Tensor out = at::empty({m}, x.options().dtype(at::kLong));
  const float* xp = xc.const_data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * n, n);
  });
  return out.view(x.sizes().slice(0, x.dim() - 1));
}

}  // namespace

TORCH_LIBRARY(idlm_panel, m) {
  m.def("pack(Tensor w) -> Tensor");
  m.def("pack_codes(Tensor q, Tensor d, Tensor? m) -> Tensor");
  m.def("linear(Tensor x, Tensor panels, int out_features, Tensor? bias, Tensor? lora_a, int lora_rank, "
        "Tensor[] lora_b, int[] lora_blocks, Tensor? lora_rows) -> Tensor");
  m.def("pack_pairs(Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor panels, Tensor? pairs, Tensor scales, int out_features, Tensor? bias) -> Tensor");
  m.def("pack_w8a8(Tensor w) -> Tensor");
  m.def("linear_w8a8(Tensor x, Tensor panels, Tensor scales, int out_features, Tensor? bias, Tensor? lora_a, "
        "int lora_rank, Tensor[] lora_b, int[] lora_blocks, Tensor? lora_rows) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("add_lora(Tensor(a!) y, Tensor x, Tensor a_panels, int rank, Tensor[] b_panels, int[] blocks, Tensor? rows) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(idlm_panel, CPU, m) {
  m.impl("pack", &pack);
  m.impl("pack_codes", &pack_codes);
  m.impl("linear", &linear);
  m.impl("pack_pairs", &pack_pairs);
  m.impl("linear_int8", &linear_int8);
  m.impl("pack_w8a8", &pack_w8a8);
  m.impl("linear_w8a8", &linear_w8a8);
  m.impl("add_lora", &add_lora);
  m.impl("argmax", &argmax);
}
