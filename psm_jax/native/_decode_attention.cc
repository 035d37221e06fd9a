// Grouped-query attention for a few query tokens over a KV cache, in f32, called from JAX through the XLA FFI.
//
//   psm_decode_attention (q [B,T,H,d], k [L,B,S,KV,d], v [L,B,S,KV,d], bias [B,T,S], all f32, layer s32 [];
//                         attrs scale, softcap) -> o [B,T,H,d] f32
//   attention over layer `layer` of the stacked K/V (a whole KV cache, read where it lies: no per-layer slice is
//   copied); head h reads K/V head h / (H / KV); o = softmax(cap(scale q.k) + bias) v, cap(x) = softcap tanh(x /
//   softcap) when softcap > 0.
//
// Why: when decoding, T is 1 and XLA's CPU code lays each layer's cached K and V out again for its batched dots on
// every step, then runs those dots at a few GFLOP/s; reading the cache where it lies is bound by memory bandwidth
// instead. Each (batch, KV head, query token) task reads its K and V rows once for the whole head group, and skips
// the slots its bias masks (a cache is mostly empty early in a generation).
//
// A slot is masked when its bias is below -1e37 (the model writes the dtype's minimum there). A query row with no
// unmasked slot gets what XLA's softmax gives it: every score equals the minimum, so the mean of all of V.
// Sums run in slot order within a task, whatever the thread count (deterministic).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMaskedBelow = -1e37f;

inline float Dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += a[j] * b[j];
  return acc;
}

inline void Axpy(float a, const float* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}

struct Shapes {
  int64_t B, T, H, d, S, KV;
};

// One (batch b, KV head kvh, query token t): the G = H / KV query heads that share the KV head.
void Task(const float* q, const float* k, const float* v, const float* bias, float* o, const Shapes& n, float scale,
          float softcap, int64_t b, int64_t kvh, int64_t t, std::vector<float>& scores, std::vector<int32_t>& slots) {
  const int64_t G = n.H / n.KV, d = n.d, S = n.S;
  const float* bias_row = bias + (b * n.T + t) * S;
  const float* q0 = q + ((b * n.T + t) * n.H + kvh * G) * d;
  float* o0 = o + ((b * n.T + t) * n.H + kvh * G) * d;
  slots.clear();
  for (int64_t s = 0; s < S; ++s)
    if (bias_row[s] >= kMaskedBelow) slots.push_back(static_cast<int32_t>(s));
  std::fill(o0, o0 + G * d, 0.f);
  if (slots.empty()) {  // XLA: all scores equal the minimum -> uniform weights over every slot
    for (int64_t s = 0; s < S; ++s)
      for (int64_t g = 0; g < G; ++g) Axpy(1.f / S, v + ((b * S + s) * n.KV + kvh) * d, o0 + g * d, d);
    return;
  }
  const int64_t m = static_cast<int64_t>(slots.size());
  scores.resize(G * m);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t s = slots[i];
    const float* ks = k + ((b * S + s) * n.KV + kvh) * d;
    for (int64_t g = 0; g < G; ++g) {
      float x = Dot(q0 + g * d, ks, d) * scale;
      if (softcap > 0.f) x = std::tanh(x / softcap) * softcap;
      scores[g * m + i] = x + bias_row[s];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * m;
    const float mx = *std::max_element(sg, sg + m);
    float total = 0.f;
    for (int64_t i = 0; i < m; ++i) total += (sg[i] = std::exp(sg[i] - mx));
    const float inv = 1.f / total;
    for (int64_t i = 0; i < m; ++i) sg[i] *= inv;
  }
  for (int64_t i = 0; i < m; ++i) {
    const float* vs = v + ((b * S + slots[i]) * n.KV + kvh) * d;
    for (int64_t g = 0; g < G; ++g) Axpy(scores[g * m + i], vs, o0 + g * d, d);
  }
}

}  // namespace

static ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                  ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> layer,
                                  ffi::ResultBuffer<ffi::F32> o, float scale, float softcap) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  auto bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || bd.size() != 3 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "psm_decode_attention: expected q [B,T,H,d], k, v [L,B,S,KV,d], bias [B,T,S] and a scalar layer");
  const Shapes n{qd[0], qd[1], qd[2], qd[3], kd[2], kd[3]};
  for (int i = 0; i < 5; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("psm_decode_attention: k and v differ in shape");
  if (kd[1] != n.B || kd[4] != n.d || bd[0] != n.B || bd[1] != n.T || bd[2] != n.S || n.KV < 1 || n.H % n.KV)
    return ffi::Error::InvalidArgument("psm_decode_attention: shape mismatch");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("psm_decode_attention: layer outside the stack");
  const int64_t per_layer = n.B * n.S * n.KV * n.d;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data() + l * per_layer;
  const float* vp = v.typed_data() + l * per_layer;
  const float* bp = bias.typed_data();
  float* op = o->typed_data();
  psm::ParallelFor(n.B * n.KV * n.T, 4, [=](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    std::vector<int32_t> slots;
    slots.reserve(n.S);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t t = task % n.T, kvh = (task / n.T) % n.KV, b = task / (n.T * n.KV);
      Task(qp, kp, vp, bp, op, n, scale, softcap, b, kvh, t, scores, slots);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
