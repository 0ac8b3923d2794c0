// Attention of a step's query rows (decode rows and prefill chunks) over the paged KV pool (models/attention.py
// PagedAttention), read in place: the keys and values of each sequence are found through its block table, never
// gathered into a copy.
// Each (sequence, query head, row) is one work item, computed alone, in the same order whatever rows
// share the call: scores of kLanes keys at a time (one vector of partial products per key, then the vectors summed
// lane-wise into one of kLanes scores), the masked keys at -inf, the largest score taken off, exp, their sum, then
// the values weighted. So a row's output does not depend on the rows or sequences beside it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
// lane j of the result: the sum of v[j]'s lanes
inline Vec lane_sums(Vec v[kLanes]) {
  Vec a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: keys 4i .. 4i + 3, each the sum of that lane's 4 floats
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // [keys 8i..8i+3 lanes 0+2, 1+3, keys 8i+4.. lanes 0+2, 1+3]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
inline Vec mask_bias(const bool* m) {  // 0 where m, else -inf, for kLanes keys
  const __mmask16 seen = _mm512_test_epi32_mask(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m))), _mm512_set1_epi32(0xFF));
  return _mm512_mask_blend_ps(seen, set1(-std::numeric_limits<float>::infinity()), zero());
}
inline Vec times_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
inline Vec zero_below(Vec e, Vec x, float bound) {  // e where x >= bound, else 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(bound), _CMP_GE_OQ), e);
}
#else
inline Vec lane_sums(Vec v[kLanes]) {
  const Vec s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // keys 0-3, each half
  const Vec s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // keys 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}
inline Vec mask_bias(const bool* m) {  // 0 where m, else -inf, for kLanes keys
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bytes, _mm256_setzero_si256()));
  return _mm256_and_ps(hidden, set1(-std::numeric_limits<float>::infinity()));
}
inline Vec times_pow2(Vec p, Vec n) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
inline Vec zero_below(Vec e, Vec x, float bound) { return _mm256_and_ps(e, _mm256_cmp_ps(x, set1(bound), _CMP_GE_OQ)); }
#endif

// e^x for x <= 0 (scores less their maximum): 2^n e^r with |r| <= ln 2 / 2 and e^r by its Taylor polynomial of degree
// 7 (relative error below 2e-7); 0 below -87 (e^-87 < 2e-38, where float32 leaves its normal range), and so for -inf
inline Vec exp_nonpositive(Vec x) {
  const Vec xc = vmax(x, set1(-87.f));
  const Vec n = vround(mul(xc, set1(1.44269504088896341f)));
  Vec r = fmadd(n, set1(-0.693145751953125f), xc);  // ln 2 in two parts: n * hi is exact
  r = fmadd(n, set1(-1.428606765330187e-06f), r);
  Vec p = set1(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = fmadd(p, r, set1(c));
  return zero_below(times_pow2(p, n), x, -87.f);
}

constexpr int kMaxVecs = 16;  // head dims up to kMaxVecs x kLanes floats

// One row of one query head: q (times `scale`) against the keys and values at `slot` (S of them), `m` its mask.
// V: the head dim in vectors, a constant so that the row's vectors and sums stay in registers.
// Keys after the row's last visible one are not read: each would add an exact zero (a weight of e^-inf), so a row
// of a prefill chunk, whose later keys are masked, computes what the same row of a one-row step computes, bit for
// bit, at half a causal chunk's work.
template <int V>
void attend_row(const float* q, float scale, const float* kp, const float* vp, const int64_t* slot, const bool* m,
                int64_t S, float* scores, float* o) {
  while (S > 0 && !m[S - 1]) --S;
  Vec qv[V];
  for (int c = 0; c < V; ++c) qv[c] = mul(load(q + c * kLanes), set1(scale));
  Vec best = set1(-std::numeric_limits<float>::infinity());
  for (int64_t k0 = 0; k0 < S; k0 += kLanes) {
    Vec bias;
    int64_t n = kLanes;
    if (k0 + kLanes <= S) {
      bias = mask_bias(m + k0);
    } else {  // the last keys: a partial vector
      n = S - k0;
      alignas(64) float tail[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) tail[j] = j < n && m[k0 + j] ? 0.f : -std::numeric_limits<float>::infinity();
      bias = load(tail);
    }
    Vec part[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      Vec sum = zero();
      if (j < n) {
        const float* key = kp + slot[k0 + j];
        for (int c = 0; c < V; ++c) sum = fmadd(qv[c], load(key + c * kLanes), sum);
      }
      part[j] = sum;
    }
    const Vec sc = add(lane_sums(part), bias);
    store(scores + k0, sc);
    best = vmax(best, sc);
  }
  const float top = hmax(best);
  if (top == -std::numeric_limits<float>::infinity()) {  // no key to attend to
    std::fill(o, o + V * kLanes, 0.f);
    return;
  }
  // the values weighted: even and odd keys in two sums (one chain would wait on the FMA latency at every key)
  Vec total = zero(), acc[2][V];
  for (int c = 0; c < V; ++c) acc[0][c] = acc[1][c] = zero();
  for (int64_t k0 = 0; k0 < S; k0 += kLanes) {
    const Vec e = exp_nonpositive(add(load(scores + k0), set1(-top)));
    total = add(total, e);
    alignas(64) float w[kLanes];
    store(w, e);
    const int64_t n = std::min<int64_t>(kLanes, S - k0);
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      const Vec w0 = set1(w[j]), w1 = set1(w[j + 1]);
      const float* v0 = vp + slot[k0 + j];
      const float* v1 = vp + slot[k0 + j + 1];
      for (int c = 0; c < V; ++c) {
        acc[0][c] = fmadd(w0, load(v0 + c * kLanes), acc[0][c]);
        acc[1][c] = fmadd(w1, load(v1 + c * kLanes), acc[1][c]);
      }
    }
    if (j < n) {
      const Vec w0 = set1(w[j]);
      const float* v0 = vp + slot[k0 + j];
      for (int c = 0; c < V; ++c) acc[0][c] = fmadd(w0, load(v0 + c * kLanes), acc[0][c]);
    }
  }
  const Vec inv = set1(1.f / hsum(total));
  for (int c = 0; c < V; ++c) store(o + c * kLanes, mul(add(acc[0][c], acc[1][c]), inv));
}

// out [B, Q, H, D] = softmax(q k^T / sqrt(D) + mask) v for each sequence b's rows, its keys and values those of the
// slots its table lists: key s at block tables[b][s / BS], offset s % BS, kv head h / (H / Hkv). mask [B, 1, Q, S]
// (true: may attend); S <= the table's blocks x BS. A row that may attend to no key gets zeros.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tables,
                     const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && k_pool.dim() == 4 &&
                  k_pool.scalar_type() == at::kFloat && v_pool.sizes() == k_pool.sizes() &&
                  v_pool.scalar_type() == at::kFloat && k_pool.is_contiguous() && v_pool.is_contiguous(),
              "idlm_panel::attention takes float32 q [B, Q, H, D] and contiguous float32 pools [blocks, BS, Hkv, D]");
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t BS = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D && D % kLanes == 0 && D <= kMaxVecs * kLanes && Hkv > 0 && H % Hkv == 0,
              "idlm_panel::attention: head dims must match, be a multiple of ", kLanes, " and at most ",
              kMaxVecs * kLanes, ", and the query heads a multiple of the kv heads");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kLong,
              "idlm_panel::attention takes int64 block tables [B, blocks]");
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == Q &&
                  mask.scalar_type() == at::kBool && mask.size(3) <= tables.size(1) * BS,
              "idlm_panel::attention takes a bool mask [B, 1, Q, S] with S <= blocks x block size");
  const int64_t S = mask.size(3), nb = tables.size(1), groups = H / Hkv;
  const at::Tensor qc = q.contiguous(), tc = tables.contiguous(), mc = mask.contiguous();
  const int64_t* tp = tc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * nb; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < k_pool.size(0), "idlm_panel::attention: block ", tp[i], " is not in the pool");
  at::Tensor out = at::empty({B, Q, H, D}, q.options());
  const float* qp = qc.const_data_ptr<float>();
  const bool* mp = mc.const_data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t padded = (S + kLanes - 1) / kLanes * kLanes;
  // each sequence's keys' first floats in a pool, for kv head 0 (the others: + kvh x D)
  std::vector<int64_t> slots(B * padded);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s0 = 0, blk = 0; s0 < S; s0 += BS, ++blk)
      for (int64_t s = s0; s < std::min(S, s0 + BS); ++s)
        slots[b * padded + s] = (tp[b * nb + blk] * BS + s - s0) * Hkv * D;
  // one work item per (sequence, head, row), in that order: threads get equal shares, neighbours share their keys
  dispatch<kMaxVecs>(D / kLanes, [&](auto vecs) {
    at::parallel_for(0, B * H * Q, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(padded);
      const float* kp = k_pool.const_data_ptr<float>();
      const float* vp = v_pool.const_data_ptr<float>();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (H * Q), h = item / Q % H, r = item % Q, head = h / groups * D;
        attend_row<decltype(vecs)::value>(qp + ((b * Q + r) * H + h) * D, scale, kp + head, vp + head,
                                          slots.data() + b * padded, mp + (b * Q + r) * S, S, scores.data(),
                                          op + ((b * Q + r) * H + h) * D);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idlm_panel, m) {
  m.def("attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(idlm_panel, CPU, m) { m.impl("attention", &attention); }
