// Grouped-query attention for a few query tokens over a KV cache, in f32, called from JAX through the XLA FFI.
//
//   psm_decode_attention (q [B,T,H,d] f32, k [L,B,S,KV,d], v [L,B,S,KV,d] both f32 or both bf16, bias [B,T,S] f32,
//                         layer s32 []; attrs scale, softcap) -> o [B,T,H,d] f32
//   attention over layer `layer` of the stacked K/V (a whole KV cache, read where it lies: no per-layer slice is
//   copied); head h reads K/V head h / (H / KV); o = softmax(cap(scale q.k) + bias) v, cap(x) = softcap tanh(x /
//   softcap) when softcap > 0.
//
// Why: when decoding, T is 1 and XLA's CPU code lays each layer's cached K and V out again for its batched dots on
// every step, then runs those dots at a few GFLOP/s; this kernel reads the cache where it lies. Each (batch, query
// token) task reads each slot's K and V rows (all KV heads, contiguous) once, and skips
// the slots its bias masks (a cache is mostly empty early in a generation).
//
// A bf16 cache holds half the bytes; each slot's row is widened to f32 as it is read (bf16 is the high half of an
// f32), so the arithmetic is the f32 path's on the rounded values. Reading half the bytes does not make a step
// faster on a 2-core EPYC (`decode_bf16_cache_speedup`): the loop is not bound by reading the cache there.
//
// A slot is masked when its bias is below -1e37 (the model writes the dtype's minimum there). A query row with no
// unmasked slot gets what XLA's softmax gives it: every score equals the minimum, so the mean of all of V.
// Sums run in slot order within a task, whatever the thread count (deterministic).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMaskedBelow = -1e37f;

// A cached element as f32: an f32 itself, or a bf16 given as its raw bits.
inline float Widen(float x) { return x; }
inline float Widen(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &word, sizeof x);
  return x;
}

// A slot's row (all KV heads) as f32: an f32 row itself, or a bf16 row widened once into `buf`, so that the heads
// sharing a KV head do not widen it again.
inline const float* RowAsFloat(const float* row, int64_t, float*) { return row; }
inline const float* RowAsFloat(const uint16_t* row, int64_t n, float* buf) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buf[j] = Widen(row[j]);
  return buf;
}

inline float Dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += a[j] * b[j];
  return acc;
}

// exp(x) for x <= 0 (softmax after subtracting the row's maximum) in plain arithmetic that the compiler vectorises:
// x = n ln2 + r with |r| <= ln2/2, exp(r) from a degree-7 polynomial, 2^n from the float's exponent bits. Relative
// error about 1e-7; below -87.3 (where exp underflows float) it returns 0.
inline float ExpNonPositive(float x) {
  const float clamped = std::max(x, -87.3f);
  const float n = std::floor(clamped * 1.44269504f + 0.5f);
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.3f ? 0.f : p * two_n;
}

inline void Axpy(float a, const float* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}

struct Shapes {
  int64_t B, T, H, d, S, KV;
};

// One (batch b, query token t): every query head. A slot's K (and later V) row holds all KV heads side by side
// ([KV, d], contiguous), so each row is read once, in order, by one task.
template <typename Elem>
void Task(const float* q, const Elem* k, const Elem* v, const float* bias, float* o, const Shapes& n, float scale,
          float softcap, int64_t b, int64_t t, std::vector<float>& scores, std::vector<int32_t>& slots,
          std::vector<float>& widened) {
  const int64_t H = n.H, G = n.H / n.KV, d = n.d, S = n.S, row = n.KV * n.d;
  widened.resize(row);
  const float* bias_row = bias + (b * n.T + t) * S;
  const float* q0 = q + (b * n.T + t) * H * d;
  float* o0 = o + (b * n.T + t) * H * d;
  slots.clear();
  for (int64_t s = 0; s < S; ++s)
    if (bias_row[s] >= kMaskedBelow) slots.push_back(static_cast<int32_t>(s));
  std::fill(o0, o0 + H * d, 0.f);
  if (slots.empty()) {  // XLA: all scores equal the minimum -> uniform weights over every slot
    for (int64_t s = 0; s < S; ++s) {
      const float* vs = RowAsFloat(v + (b * S + s) * row, row, widened.data());
      for (int64_t h = 0; h < H; ++h) Axpy(1.f / S, vs + (h / G) * d, o0 + h * d, d);
    }
    return;
  }
  const int64_t m = static_cast<int64_t>(slots.size());
  scores.resize(H * m);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t s = slots[i];
    const float* ks = RowAsFloat(k + (b * S + s) * row, row, widened.data());
    for (int64_t h = 0; h < H; ++h) {
      float x = Dot(q0 + h * d, ks + (h / G) * d, d) * scale;
      if (softcap > 0.f) x = std::tanh(x / softcap) * softcap;
      scores[h * m + i] = x + bias_row[s];
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* sh = scores.data() + h * m;
    const float mx = *std::max_element(sh, sh + m);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < m; ++i) {
      sh[i] = ExpNonPositive(sh[i] - mx);
      total += sh[i];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) sh[i] *= inv;
  }
  for (int64_t i = 0; i < m; ++i) {
    const float* vs = RowAsFloat(v + (b * S + slots[i]) * row, row, widened.data());
    for (int64_t h = 0; h < H; ++h) Axpy(scores[h * m + i], vs + (h / G) * d, o0 + h * d, d);
  }
}

// Every (batch, query token) task over layer `l` of the stacked K/V, split across the CPU's threads.
template <typename Elem>
void Run(const float* q, const Elem* k, const Elem* v, const float* bias, float* o, const Shapes& n, int64_t l,
         float scale, float softcap) {
  const int64_t per_layer = n.B * n.S * n.KV * n.d;
  const Elem* kl = k + l * per_layer;
  const Elem* vl = v + l * per_layer;
  psm::ParallelFor(n.B * n.T, 2, [=](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    std::vector<float> widened;
    std::vector<int32_t> slots;
    slots.reserve(n.S);
    for (int64_t task = t0; task < t1; ++task)
      Task(q, kl, vl, bias, o, n, scale, softcap, task / n.T, task % n.T, scores, slots, widened);
  });
}

}  // namespace

static ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                  ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> layer,
                                  ffi::ResultBuffer<ffi::F32> o, float scale, float softcap) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  auto bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || bd.size() != 3 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "psm_decode_attention: expected q [B,T,H,d], k, v [L,B,S,KV,d], bias [B,T,S] and a scalar layer");
  const ffi::DataType kv_type = k.element_type();
  if (v.element_type() != kv_type || (kv_type != ffi::DataType::F32 && kv_type != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("psm_decode_attention: expected k and v both f32 or both bf16");
  const Shapes n{qd[0], qd[1], qd[2], qd[3], kd[2], kd[3]};
  for (int i = 0; i < 5; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("psm_decode_attention: k and v differ in shape");
  if (kd[1] != n.B || kd[4] != n.d || bd[0] != n.B || bd[1] != n.T || bd[2] != n.S || n.KV < 1 || n.H % n.KV)
    return ffi::Error::InvalidArgument("psm_decode_attention: shape mismatch");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("psm_decode_attention: layer outside the stack");
  if (kv_type == ffi::DataType::F32)
    Run(q.typed_data(), k.typed_data<float>(), v.typed_data<float>(), bias.typed_data(), o->typed_data(), n, l,
        scale, softcap);
  else
    Run(q.typed_data(), k.reinterpret_data<uint16_t>(), v.reinterpret_data<uint16_t>(), bias.typed_data(),
        o->typed_data(), n, l, scale, softcap);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
