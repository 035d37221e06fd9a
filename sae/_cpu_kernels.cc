// CPU kernels for the sparse parts of a TopK SAE training step, called from JAX through the XLA FFI.
//
// XLA's CPU top_k, gathers and scatter-adds run far below memory speed; these loops do the same work in one pass
// each. Every kernel is deterministic: rows (or latents) are split across threads, and the accumulation order of each
// output element does not depend on the number of threads.
//
//   psm_sae_topk_bias   (pre [B,S] f32, bias [S] f32) -> (vals [B,k] f32, idx [B,k] s32)
//                       top k of pre + bias per row, sorted descending; ties keep the lower index first; NaN ranks
//                       above everything (as XLA's top_k) so that it propagates
//   psm_sae_gather_sum  (vals [B,k], idx [B,k], W [S,D]) -> out [B,D]        out[b] = sum_j vals[b,j] W[idx[b,j]]
//   psm_sae_gather_dot  (g [B,D], idx [B,k], W [S,D]) -> out [B,k]           out[b,j] = <g[b], W[idx[b,j]]>
//   psm_sae_scatter2    (idx [B,k], c1 [B,k], r1 [B,D], c2 [B,k], r2 [B,D]) -> (a1 [S,D], a2 [S,D], s2 [S])
//                       a1[s] = sum_{idx[b,j]=s} c1[b,j] r1[b]; a2 likewise with c2, r2; s2[s] = sum c2[b,j]
//                       (S is taken from a1's shape)


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "../psm_jax/native/cpu_threads.h"

namespace ffi = xla::ffi;

namespace {

using psm::ParallelFor;

inline float Key(float x) { return std::isnan(x) ? std::numeric_limits<float>::infinity() : x; }

}  // namespace

static ffi::Error TopkBias(ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> vals,
                          ffi::ResultBuffer<ffi::S32> idx) {
  auto pd = pre.dimensions();
  auto vd = vals->dimensions();
  if (pd.size() != 2 || vd.size() != 2 || bias.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("psm_sae_topk_bias: expected pre [B,S], bias [S], vals [B,k]");
  const int64_t B = pd[0], S = pd[1], k = vd[1];
  if (bias.dimensions()[0] != S || vd[0] != B || k < 1 || k > S)
    return ffi::Error::InvalidArgument("psm_sae_topk_bias: shape mismatch");
  const float* p = pre.typed_data();
  const float* bs = bias.typed_data();
  float* vo = vals->typed_data();
  int32_t* io = idx->typed_data();
  // Per row: (1) one vectorised pass writes the keys (pre + bias) and the maxima of n_groups strided groups
  // (group j = {j, j + n_groups, ...}, about kGroup elements each); (2) a bisection on the group maxima finds a
  // threshold `thr` that at least k of them reach: the k-th largest key is >= thr, since those k maxima are k
  // distinct elements; (3) the keys >= thr of the groups whose maximum reaches thr are collected and (4) partially
  // sorted by (key desc, index asc). A row with a NaN takes a scalar path with NaN ranked as +inf.
  constexpr int64_t kGroup = 16;
  const int64_t n_groups = std::max<int64_t>(1, (S + kGroup - 1) / kGroup);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  ParallelFor(B, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> key(S), gmax(n_groups);
    std::vector<std::pair<float, int32_t>> cand;
    cand.reserve(4 * k * kGroup);
    const auto before = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    float* __restrict kp = key.data();
    float* __restrict gp = gmax.data();
    const float* __restrict bias_p = bs;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict row = p + r * S;
      int nan = 0;
#pragma omp simd reduction(| : nan)
      for (int64_t j = 0; j < n_groups; ++j) {
        const float v = row[j] + bias_p[j];
        kp[j] = v;
        gp[j] = v;
        nan |= (v != v);
      }
      for (int64_t lo = n_groups; lo < S; lo += n_groups) {
        const int64_t len = std::min(n_groups, S - lo);
#pragma omp simd reduction(| : nan)
        for (int64_t j = 0; j < len; ++j) {
          const float v = row[lo + j] + bias_p[lo + j];
          kp[lo + j] = v;
          gp[j] = gp[j] > v ? gp[j] : v;
          nan |= (v != v);
        }
      }
      float thr = -kInf;
      if (nan) {  // rare: exact keys with NaN -> +inf, every element a candidate
        for (int64_t i = 0; i < S; ++i) kp[i] = Key(kp[i]);
      } else if (n_groups > k) {
        float lo = gp[0], hi = gp[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
        for (int64_t j = 0; j < n_groups; ++j) {
          lo = gp[j] < lo ? gp[j] : lo;
          hi = gp[j] > hi ? gp[j] : hi;
        }
        thr = lo;  // invariant: at least k group maxima are >= thr
        for (int it = 0; it < 24 && lo < hi; ++it) {
          const float mid = lo + 0.5f * (hi - lo);
          if (!(mid > lo && mid < hi)) break;  // no float strictly between (or infinities)
          int64_t count = 0;
#pragma omp simd reduction(+ : count)
          for (int64_t j = 0; j < n_groups; ++j) count += gp[j] >= mid;
          if (count >= k) {
            thr = lo = mid;
            if (count <= 2 * k) break;
          } else {
            hi = mid;
          }
        }
      }
      cand.clear();
      if (thr == -kInf) {
        for (int64_t i = 0; i < S; ++i) cand.emplace_back(kp[i], static_cast<int32_t>(i));
      } else {
        for (int64_t j = 0; j < n_groups; ++j) {
          if (!(gp[j] >= thr)) continue;
          for (int64_t i = j; i < S; i += n_groups)
            if (kp[i] >= thr) cand.emplace_back(kp[i], static_cast<int32_t>(i));
        }
      }
      if (static_cast<int64_t>(cand.size()) > k) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
      std::sort(cand.begin(), cand.begin() + k, before);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = cand[j].second;
        vo[r * k + j] = row[i] + bs[i];
        io[r * k + j] = i;
      }
    }
  });
  return ffi::Error::Success();
}

static ffi::Error GatherSum(ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> W,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto vd = vals.dimensions();
  auto wd = W.dimensions();
  if (vd.size() != 2 || wd.size() != 2 || idx.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("psm_sae_gather_sum: expected vals [B,k], idx [B,k], W [S,D]");
  const int64_t B = vd[0], k = vd[1], S = wd[0], D = wd[1];
  const float* v = vals.typed_data();
  const int32_t* ix = idx.typed_data();
  const float* w = W.typed_data();
  float* o = out->typed_data();
  std::atomic<bool> bad{false};
  ParallelFor(B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* ob = o + b * D;
      std::fill(ob, ob + D, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t s = ix[b * k + j];
        if (s < 0 || s >= S) {
          bad.store(true, std::memory_order_relaxed);
          continue;
        }
        const float c = v[b * k + j];
        const float* ws = w + int64_t{s} * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ob[d] += c * ws[d];
      }
    }
  });
  if (bad.load()) return ffi::Error::InvalidArgument("psm_sae_gather_sum: index out of range");
  return ffi::Error::Success();
}

static ffi::Error GatherDot(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> W,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto gd = g.dimensions();
  auto id = idx.dimensions();
  auto wd = W.dimensions();
  if (gd.size() != 2 || id.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("psm_sae_gather_dot: expected g [B,D], idx [B,k], W [S,D]");
  const int64_t B = gd[0], D = gd[1], k = id[1], S = wd[0];
  const float* gp = g.typed_data();
  const int32_t* ix = idx.typed_data();
  const float* w = W.typed_data();
  float* o = out->typed_data();
  std::atomic<bool> bad{false};
  ParallelFor(B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* gb = gp + b * D;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t s = ix[b * k + j];
        if (s < 0 || s >= S) {
          bad.store(true, std::memory_order_relaxed);
          o[b * k + j] = 0.0f;
          continue;
        }
        const float* ws = w + int64_t{s} * D;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += gb[d] * ws[d];
        o[b * k + j] = acc;
      }
    }
  });
  if (bad.load()) return ffi::Error::InvalidArgument("psm_sae_gather_dot: index out of range");
  return ffi::Error::Success();
}

static ffi::Error Scatter2(ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> c1, ffi::Buffer<ffi::F32> r1,
                          ffi::Buffer<ffi::F32> c2, ffi::Buffer<ffi::F32> r2, ffi::ResultBuffer<ffi::F32> a1,
                          ffi::ResultBuffer<ffi::F32> a2, ffi::ResultBuffer<ffi::F32> s2) {
  auto id = idx.dimensions();
  auto rd = r1.dimensions();
  auto ad = a1->dimensions();
  if (id.size() != 2 || rd.size() != 2 || ad.size() != 2)
    return ffi::Error::InvalidArgument("psm_sae_scatter2: expected idx [B,k], rows [B,D], out [S,D]");
  const int64_t B = id[0], k = id[1], D = rd[1], S = ad[0];
  const int32_t* ix = idx.typed_data();
  const float* c1p = c1.typed_data();
  const float* c2p = c2.typed_data();
  const float* r1p = r1.typed_data();
  const float* r2p = r2.typed_data();
  float* a1p = a1->typed_data();
  float* a2p = a2->typed_data();
  float* s2p = s2->typed_data();
  // counting sort of the B*k entries by latent (stable: entry order within a latent)
  std::vector<int64_t> start(S + 1, 0);
  const int64_t n = B * k;
  for (int64_t e = 0; e < n; ++e) {
    const int32_t s = ix[e];
    if (s < 0 || s >= S) return ffi::Error::InvalidArgument("psm_sae_scatter2: index out of range");
    ++start[s + 1];
  }
  for (int64_t s = 0; s < S; ++s) start[s + 1] += start[s];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int32_t> order(n);
  for (int64_t e = 0; e < n; ++e) order[fill[ix[e]]++] = static_cast<int32_t>(e);
  ParallelFor(S, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float* o1 = a1p + s * D;
      float* o2 = a2p + s * D;
      std::fill(o1, o1 + D, 0.0f);
      std::fill(o2, o2 + D, 0.0f);
      float sum2 = 0.0f;
      for (int64_t q = start[s]; q < start[s + 1]; ++q) {
        const int64_t e = order[q];
        const int64_t b = e / k;
        const float x1 = c1p[e], x2 = c2p[e];
        const float* __restrict p1 = r1p + b * D;
        const float* __restrict p2 = r2p + b * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          o1[d] += x1 * p1[d];
          o2[d] += x2 * p2[d];
        }
        sum2 += x2;
      }
      s2p[s] = sum2;
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmSaeTopkBias, TopkBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmSaeGatherSum, GatherSum,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmSaeGatherDot, GatherDot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmSaeScatter2, Scatter2,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
