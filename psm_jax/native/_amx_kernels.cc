// bf16 matrix multiply, gated MLP and attention on Intel AMX tiles, called from JAX through the XLA FFI. bf16
// values travel as their bit patterns (u16 buffers), so that XLA's CPU float normalisation leaves them alone.
//
//   psm_amx_matmul     (a [M,K], b [K,N]; attr transpose_b: b is [N,K]) -> c [M,N]   c = a @ b (a @ b^T), f32 sums
//   psm_amx_gated      (a [M,K], w_gate [K,N], w_up [K,N]) -> c [M,N]   c = silu(a @ w_gate) * (a @ w_up), f32 epilogue
//   psm_amx_attention  (q [B,T,H,d], k [B,S,KV,d], v [B,S,KV,d], bias [B,T,S] f32; attr scale) -> o [B,T,H,d]
//                      grouped-query attention: head h reads K/V head h / (H / KV); softmax(scale q.k + bias) in f32,
//                      probabilities rounded to bf16 for the value product (as the XLA path does)
//
// XLA's CPU dots run bf16 no faster than f32 (no AMX); the tile unit multiplies 16x32 by 32x16 bf16 blocks per
// instruction: about 2.5x XLA's f32 GEMM on the same cores; torch's oneDNN gets 3.5x more again (room to grow;
// benchmarks/gemm.py).
// Requirements (checked, and by the Python caller before it chooses this path): M, K, N multiples of 32.
//
// Work split: each thread owns a contiguous range of 32-column blocks of c, repacks its columns of b once into the
// tile layout (16 rows of 32 bf16 = 16 k-pairs x 16 columns, one contiguous 1 KiB block per (column block, k block)),
// and sweeps a's rows in panels that stay in L2. The f32 accumulators are rounded to bf16 (nearest even) on store.
// Each output element is one f32 sum in k order, the same whatever the thread count (deterministic).

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__)
#define PSM_HAVE_AMX 1
#include <immintrin.h>
#else
#define PSM_HAVE_AMX 0
#endif

namespace ffi = xla::ffi;

namespace {

using psm::ParallelFor;

#if PSM_HAVE_AMX

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask the kernel for the AMX tile-data state
constexpr long kXfeatureXtiledata = 18;

bool RequestTilePermission() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] { ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0; });
  return ok;
}

struct TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void ConfigureTiles() {  // per thread: 8 tiles of 16 rows x 64 bytes
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Columns [n0, n1) of b ([K,N], or [N,K] when b_t: a @ b^T) into blocks [n16][K/32][16 k-pairs][16 columns][2].
void PackB(const uint16_t* b, bool b_t, int64_t K, int64_t N, int64_t n0, int64_t n1, uint16_t* out) {
  const int64_t kb = K / 32;
  alignas(64) uint16_t order[32];
  for (int j = 0; j < 16; ++j) {
    order[2 * j] = static_cast<uint16_t>(j);            // word j of the first operand (row k)
    order[2 * j + 1] = static_cast<uint16_t>(32 + j);   // word j of the second (row k + 1)
  }
  const __m512i interleave = _mm512_load_si512(reinterpret_cast<const void*>(order));
  for (int64_t n = n0; n < n1; n += 16) {
    uint16_t* blk_n = out + ((n - n0) / 16) * kb * 512;
    for (int64_t k = 0; k < K; k += 2) {
      uint16_t* dst = blk_n + (k / 32) * 512 + ((k % 32) / 2) * 32;
      if (b_t) {  // row n of b holds column n: its k-pair is two adjacent words
        for (int64_t j = 0; j < 16; ++j) std::memcpy(dst + 2 * j, b + (n + j) * K + k, 2 * sizeof(uint16_t));
        continue;
      }
      // interleave 16 columns of rows k and k + 1 in one permute
      const __m512i r0 = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k * N + n)));
      const __m512i r1 = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (k + 1) * N + n)));
      _mm512_storeu_si512(reinterpret_cast<void*>(dst), _mm512_permutex2var_epi16(r0, interleave, r1));
    }
  }
}

// c[m0:m0+32, n:n+32] from 2x2 tiles; f32 tile buffer -> bf16 rows.
inline void StoreBf16(const float* acc, uint16_t* c, int64_t N) {
  for (int64_t r = 0; r < 32; ++r) {
    const __m512 lo = _mm512_loadu_ps(acc + r * 32);
    const __m512 hi = _mm512_loadu_ps(acc + r * 32 + 16);
    const __m512bh packed = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(reinterpret_cast<void*>(c + r * N), reinterpret_cast<__m512i>(packed));
  }
}

// The shared inner loop: rows of `a` in L2-sized panels against `pairs` pairs of packed 16-column blocks (b0, b1):
// the tiles accumulate a[m:m+32] @ [b0 | b1] for each 32-row block, stored to acc [32][32] (columns 0-15 from b0,
// 16-31 from b1) and handed to epilogue(acc, m, pair).
template <typename BlockOf, typename Epilogue>
void SweepBlockPairs(const uint16_t* a, int64_t M, int64_t K, int64_t pairs, BlockOf block_of, Epilogue epilogue) {
  alignas(64) float acc[32 * 32];
  ConfigureTiles();
  const int64_t kb = K / 32;
  const int64_t panel = std::max<int64_t>(32, ((int64_t{1} << 19) / (K * 2)) / 32 * 32);
  for (int64_t p0 = 0; p0 < M; p0 += panel) {
    const int64_t p1 = std::min(M, p0 + panel);
    for (int64_t j = 0; j < pairs; ++j) {
      const uint16_t* b0 = block_of(j, 0);
      const uint16_t* b1 = block_of(j, 1);
      for (int64_t m = p0; m < p1; m += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t* a0 = a + m * K;
        const uint16_t* a1 = a0 + 16 * K;
        for (int64_t q = 0; q < kb; ++q) {
          _tile_loadd(4, a0 + q * 32, K * 2);
          _tile_loadd(5, a1 + q * 32, K * 2);
          _tile_loadd(6, b0 + q * 512, 64);
          _tile_loadd(7, b1 + q * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, acc, 128);
        _tile_stored(1, acc + 16, 128);
        _tile_stored(2, acc + 16 * 32, 128);
        _tile_stored(3, acc + 16 * 32 + 16, 128);
        epilogue(acc, m, j);
      }
    }
  }
  _tile_release();
}

void MatmulColumns(const uint16_t* a, const uint16_t* b, bool b_t, uint16_t* c, int64_t M, int64_t K, int64_t N,
                   int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  std::vector<uint16_t> packed((n1 - n0) * K);
  PackB(b, b_t, K, N, n0, n1, packed.data());
  const int64_t blk = (K / 32) * 512;
  SweepBlockPairs(
      a, M, K, (n1 - n0) / 32, [&](int64_t j, int half) { return packed.data() + (2 * j + half) * blk; },
      [&](const float* acc, int64_t m, int64_t j) { StoreBf16(acc, c + m * N + n0 + 32 * j, N); });
}

// exp(x): 2^n * p(r), |r| <= ln2/2, degree-6 polynomial (rel. err ~1e-7); clamped to [-87, 88].
inline __m512 Exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline void RowToBf16(const float* src, uint16_t* dst, int64_t n) {  // n % 32 == 0
  for (int64_t i = 0; i < n; i += 32) {
    const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), reinterpret_cast<__m512i>(packed));
  }
}

// silu(a @ wg) * (a @ wu) for the columns [n0, n1) of this thread (the gated MLP of Llama-family models): both
// products of a 32 x 16 block stay in tiles (4 accumulators), the epilogue applies silu and the product in f32.
void GatedColumns(const uint16_t* a, const uint16_t* wg, const uint16_t* wu, uint16_t* c, int64_t M, int64_t K,
                  int64_t N, int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  std::vector<uint16_t> pg((n1 - n0) * K), pu((n1 - n0) * K);
  PackB(wg, false, K, N, n0, n1, pg.data());
  PackB(wu, false, K, N, n0, n1, pu.data());
  const int64_t blk = (K / 32) * 512;
  const __m512 one = _mm512_set1_ps(1.0f);
  SweepBlockPairs(
      a, M, K, (n1 - n0) / 16, [&](int64_t j, int half) { return (half ? pu : pg).data() + j * blk; },
      [&](const float* acc, int64_t m, int64_t j) {
        for (int64_t r = 0; r < 32; ++r) {  // row r: gate in columns 0-15, up in 16-31
          const __m512 gv = _mm512_load_ps(acc + r * 32);
          const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, Exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
          const __m512 out = _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_load_ps(acc + r * 32 + 16));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (m + r) * N + n0 + 16 * j),
                              reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(out)));
        }
      });
}

// One (batch, kv head): every query head of the group, every block of 16 query rows.
void AttentionGroup(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias, uint16_t* o,
                    int64_t T, int64_t S, int64_t H, int64_t KV, int64_t d, float scale, int64_t b, int64_t kvh,
                    std::vector<uint16_t>& kp, std::vector<uint16_t>& vp, std::vector<float>& sc,
                    std::vector<uint16_t>& pr, std::vector<float>& ob) {
  const int64_t G = H / KV;
  // K^T as the B operand of q.k: k-pairs along d -> [d/2][S][2]; V as the B operand of p.v: pairs along S.
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* ks = k + ((b * S + s) * KV + kvh) * d;
    const uint16_t* vs = v + ((b * S + s) * KV + kvh) * d;
    for (int64_t j = 0; j < d; ++j) {
      kp[(j / 2) * S * 2 + s * 2 + (j & 1)] = ks[j];
      vp[(s / 2) * d * 2 + j * 2 + (s & 1)] = vs[j];
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = kvh * G + g;
    for (int64_t t0 = 0; t0 < T; t0 += 16) {
      const uint16_t* qa = q + ((b * T + t0) * H + h) * d;  // 16 rows, stride H * d
      for (int64_t c = 0; c < S; c += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t ks = 0; ks < d; ks += 32) {
          _tile_loadd(2, qa + ks, H * d * 2);
          _tile_loadd(3, kp.data() + (ks / 2) * S * 2 + c * 2, S * 4);
          _tile_loadd(4, kp.data() + (ks / 2) * S * 2 + (c + 16) * 2, S * 4);
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(1, 2, 4);
        }
        _tile_stored(0, sc.data() + c, S * 4);
        _tile_stored(1, sc.data() + c + 16, S * 4);
      }
      for (int64_t r = 0; r < 16; ++r) {
        float* row = sc.data() + r * S;
        const float* br = bias + (b * T + t0 + r) * S;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t s = 0; s < S; s += 16) {
          const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(row + s), vscale, _mm512_loadu_ps(br + s));
          _mm512_storeu_ps(row + s, x);
          mx = _mm512_max_ps(mx, x);
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; s += 16) {
          const __m512 e = Exp512(_mm512_sub_ps(_mm512_loadu_ps(row + s), m));
          _mm512_storeu_ps(row + s, e);
          sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t s = 0; s < S; s += 16) _mm512_storeu_ps(row + s, _mm512_mul_ps(_mm512_loadu_ps(row + s), inv));
        RowToBf16(row, pr.data() + r * S, S);
      }
      for (int64_t c = 0; c < d; c += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t ks = 0; ks < S; ks += 32) {
          _tile_loadd(2, pr.data() + ks, S * 2);
          _tile_loadd(3, vp.data() + (ks / 2) * d * 2 + c * 2, d * 4);
          _tile_loadd(4, vp.data() + (ks / 2) * d * 2 + (c + 16) * 2, d * 4);
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(1, 2, 4);
        }
        _tile_stored(0, ob.data() + c, d * 4);
        _tile_stored(1, ob.data() + c + 16, d * 4);
      }
      for (int64_t r = 0; r < 16; ++r) RowToBf16(ob.data() + r * d, o + ((b * T + t0 + r) * H + h) * d, d);
    }
  }
}

#endif  // PSM_HAVE_AMX

}  // namespace

// 1 when this library was compiled with AMX and the OS grants the tile state, else 0 (Python checks it first).
extern "C" int PsmAmxAvailable() {
#if PSM_HAVE_AMX
  return RequestTilePermission() ? 1 : 0;
#else
  return 0;
#endif
}

static ffi::Error AmxMatmul(ffi::Buffer<ffi::U16> a, ffi::Buffer<ffi::U16> b, ffi::ResultBuffer<ffi::U16> c,
                            bool b_t) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[b_t ? 1 : 0])
    return ffi::Error::InvalidArgument("psm_amx_matmul: expected a [M,K] and b [K,N] (or [N,K] with transpose_b)");
  const int64_t M = ad[0], K = ad[1], N = bd[b_t ? 0 : 1];
  if (M % 32 || K % 32 || N % 32)
    return ffi::Error::InvalidArgument("psm_amx_matmul: M, K and N must be multiples of 32");
#if PSM_HAVE_AMX
  if (!RequestTilePermission()) return ffi::Error::Internal("psm_amx_matmul: the OS refused the AMX tile state");
  const auto* ap = reinterpret_cast<const uint16_t*>(a.typed_data());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.typed_data());
  auto* cp = reinterpret_cast<uint16_t*>(c->typed_data());
  ParallelFor(N / 32, 1, [=](int64_t j0, int64_t j1) { MatmulColumns(ap, bp, b_t, cp, M, K, N, j0 * 32, j1 * 32); });
  return ffi::Error::Success();
#else
  (void)b_t;
  return ffi::Error::Internal("psm_amx_matmul: compiled without AMX support");
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmAmxMatmul, AmxMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::U16>>()
                                  .Attr<bool>("transpose_b"));

static ffi::Error AmxAttention(ffi::Buffer<ffi::U16> q, ffi::Buffer<ffi::U16> k, ffi::Buffer<ffi::U16> v,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::U16> o, float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || bd.size() != 3 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("psm_amx_attention: expected q [B,T,H,d], k, v [B,S,KV,d], bias [B,T,S]");
  const int64_t B = qd[0], T = qd[1], H = qd[2], d = qd[3], S = kd[1], KV = kd[2];
  if (kd[0] != B || kd[3] != d || bd[0] != B || bd[1] != T || bd[2] != S || KV < 1 || H % KV)
    return ffi::Error::InvalidArgument("psm_amx_attention: shape mismatch");
  if (T % 16 || S % 32 || d % 32)
    return ffi::Error::InvalidArgument("psm_amx_attention: T must be a multiple of 16, S and d of 32");
#if PSM_HAVE_AMX
  if (!RequestTilePermission()) return ffi::Error::Internal("psm_amx_attention: the OS refused the AMX tile state");
  const auto* qp = reinterpret_cast<const uint16_t*>(q.typed_data());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.typed_data());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.typed_data());
  const float* bp = bias.typed_data();
  auto* op = reinterpret_cast<uint16_t*>(o->typed_data());
  ParallelFor(B * KV, 1, [=](int64_t t0, int64_t t1) {
    std::vector<uint16_t> kpk(S * d), vpk(S * d), pr(16 * S);
    std::vector<float> sc(16 * S), ob(16 * d);
    ConfigureTiles();
    for (int64_t task = t0; task < t1; ++task)
      AttentionGroup(qp, kp, vp, bp, op, T, S, H, KV, d, scale, task / KV, task % KV, kpk, vpk, sc, pr, ob);
    _tile_release();
  });
  return ffi::Error::Success();
#else
  (void)scale;
  return ffi::Error::Internal("psm_amx_attention: compiled without AMX support");
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmAmxAttention, AmxAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U16>>()
                                  .Attr<float>("scale"));

static ffi::Error AmxGated(ffi::Buffer<ffi::U16> a, ffi::Buffer<ffi::U16> wg, ffi::Buffer<ffi::U16> wu,
                           ffi::ResultBuffer<ffi::U16> c) {
  auto ad = a.dimensions();
  auto gd = wg.dimensions();
  if (ad.size() != 2 || gd.size() != 2 || wu.dimensions().size() != 2 || ad[1] != gd[0] ||
      wu.dimensions()[0] != gd[0] || wu.dimensions()[1] != gd[1])
    return ffi::Error::InvalidArgument("psm_amx_gated: expected a [M,K], w_gate and w_up [K,N]");
  const int64_t M = ad[0], K = ad[1], N = gd[1];
  if (M % 32 || K % 32 || N % 16)
    return ffi::Error::InvalidArgument("psm_amx_gated: M and K must be multiples of 32, N of 16");
#if PSM_HAVE_AMX
  if (!RequestTilePermission()) return ffi::Error::Internal("psm_amx_gated: the OS refused the AMX tile state");
  const auto* ap = reinterpret_cast<const uint16_t*>(a.typed_data());
  const auto* gp = reinterpret_cast<const uint16_t*>(wg.typed_data());
  const auto* up = reinterpret_cast<const uint16_t*>(wu.typed_data());
  auto* cp = reinterpret_cast<uint16_t*>(c->typed_data());
  ParallelFor(N / 16, 1, [=](int64_t j0, int64_t j1) { GatedColumns(ap, gp, up, cp, M, K, N, j0 * 16, j1 * 16); });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("psm_amx_gated: compiled without AMX support");
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsmAmxGated, AmxGated,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::U16>>());
