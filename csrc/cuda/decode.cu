// Decode attention (flash-decoding, split KV) and sampling on CUDA; contracts in ../decode.h.
// Neither function reads a device value on the host, so both can be captured in CUDA graphs.
//
// Attention. Grid (B * Hkv * head tiles, splits), 128 threads. A CTA owns one KV head and a tile
// of G <= 4 of its query heads (all of them when Hq / Hkv <= 4), so each K / V row is read once
// per tile. G = 8 took 246-255 registers for 16-bit caches (ptxas, sm_90: 2 CTAs per SM), and
// capping it with __launch_bounds__ spilled in the inner loop; G <= 4 stays at <= 168 with no
// spill. A larger group takes several tiles, consecutive in blockIdx.x so that they run together
// and the later tiles' K / V reads hit L2 (to measure on a GPU: bench_generation's decode rows).
// The visible range [start, end) of a sequence is cut on the device into `splits` chunks
// (>= MIN_CHUNK positions each, so short sequences leave late splits empty): the host only knows
// S_max, and picks `splits` from S_max, B * Hkv * tiles and the SM count so the grid covers the
// GPU a few times over. Inside a CTA a row group of L lanes reads one row
// with 16-byte packs (L = packs per row rounded up to a power of two, at most 32), so a warp
// reads 32 / L rows at a time and the dot product is an L-lane shuffle reduction. Each row group
// keeps an fp32 online softmax (base 2, scale * log2(e) folded into q) for its G heads over every
// RG-th position, two positions per step so four row loads are in flight before any math; row
// groups are merged by shuffles, then warps through shared memory. With one split the CTA writes
// out in q's dtype; otherwise it writes a normalised fp32 partial and its log2-sum-exp, and a
// combine kernel weights the splits by exp2(lse - max).
//
// New token: split 0 / tile 0 of each (b, kv head) copies k_new / v_new into the caches at
// cache_seqlens[b], and whichever split owns that position reads k_new / v_new (not the cache)
// for it. No CTA ever reads the cache row being written, so this is race-free under any CTA
// order, in one launch. Values out of range (validated in Python) are clamped for memory safety.
//
// Sampling. One CTA of 1024 threads per row; z = logit / T, an IEEE float32 division (__fdiv_rn,
// whatever the compiler's division flags), as the contract and the torch reference compute it,
// so ties and the top-k value match the reference bit for bit (x * (1 / T) can differ by 1 ulp).
// Pass 1: online max m and S = sum exp(z - m). Thresholds are keys (z's bits mapped to an
// order-preserving uint32, -0.0 taken as +0.0: they tie, as in the reference): the kept set
// is {key >= max(Tk, Tp)}, where Tk is the largest t with #(key >= t) >= k (the k-th largest
// key: ties kept) and Tp the largest t with mass(key >= t) >= top_p * S (mass(key > Tp) <
// top_p, and Tp's own token is kept). Both are found by a 256-ary bisection (radix select), 4 passes of a shared histogram of the elements
// matching the prefix found so far. Masses are accumulated as 2^-40 fixed-point uint64: integer
// atomics commute, so the selection is deterministic run to run (float atomics are not), and
// the truncation (< 2^-22 over 256k tokens) is far below any meaningful top_p gap. The walk
// then scans chunks of the row in index order (block prefix sum over 4 consecutive elements
// per thread): one pass for the kept total W, one to find the first index whose cumulative kept
// mass exceeds u * W; if rounding leaves no crossing, the last kept index is returned.
// Non-finite z (the rule: rlhf_kernels/reference/sample.py): pass 1 also counts NaN and +inf. An
// error row (NaN, or -inf everywhere) gets token -1 / -2 and log-prob NaN and its CTA stops
// there (the decision is block-uniform); in a row holding +inf every later read sees z = 0 at
// the +inf tokens and -inf elsewhere (load_z), m = 0 and S = their count.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../decode.h"

namespace {

constexpr float NEG_INF = -__builtin_huge_valf();
constexpr float POS_INF = __builtin_huge_valf();

template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T x[N];
};

// ----------------------------------------------------------------------------------- attention
constexpr int ATT_THREADS = 128, ATT_WARPS = ATT_THREADS / 32;
constexpr int MIN_CHUNK = 128;  // positions per split at least: below that the combine dominates
constexpr int MAX_SPLITS = 64;  // one lane of the combine's warp per two splits

template <typename T, int D>
struct Layout {
  static constexpr int N = Pack<T>::N, PACKS = D / N;
  static constexpr int L = PACKS > 16 ? 32 : PACKS > 8 ? 16 : PACKS > 4 ? 8 : PACKS > 2 ? 4 : 2;
  static constexpr int PPL = (PACKS + L - 1) / L;  // packs per lane
  static constexpr int E = PPL * N;                // elements per lane
  static constexpr int RG = ATT_WARPS * (32 / L);  // row groups per CTA
};

template <typename T>
struct AttnParams {
  const T *q, *k_new, *v_new;
  T *k_cache, *v_cache, *out;
  const int *seqlens, *starts;
  float *o_part, *lse_part;
  int Hq, Hkv, S, group, splits, tiles;
  float scale_log2;
};

template <typename T, int D>
__device__ __forceinline__ void load_row(const T* row, int lane_r, float (&v)[Layout<T, D>::E]) {
  using Lo = Layout<T, D>;
#pragma unroll
  for (int j = 0; j < Lo::PPL; ++j) {
    const int c = lane_r + j * Lo::L;
    Pack<T> p;
    if (c < Lo::PACKS) p = reinterpret_cast<const Pack<T>*>(row)[c];
#pragma unroll
    for (int n = 0; n < Lo::N; ++n) v[j * Lo::N + n] = c < Lo::PACKS ? float(p.x[n]) : 0.f;
  }
}

// a * exp2(ma - m) with -inf - (-inf) kept out of exp2 (an empty state has a = 0 anyway)
__device__ __forceinline__ float rescale(float ma, float m) {
  return ma == NEG_INF ? 0.f : exp2f(ma - m);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(ATT_THREADS) decode_split_kernel(AttnParams<T> p) {
  using Lo = Layout<T, D>;
  constexpr int E = Lo::E, L = Lo::L;
  const int tile = blockIdx.x % p.tiles, bkv = blockIdx.x / p.tiles, split = blockIdx.y;
  const int b = bkv / p.Hkv, kvh = bkv % p.Hkv;
  const int h0 = kvh * p.group + tile * G;  // first query head of this tile
  const int gcount = min(G, p.group - tile * G);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, lane_r = lane & (L - 1);

  const bool has_new = p.k_new != nullptr;
  const int len = p.seqlens[b];
  const int start = max(p.starts ? p.starts[b] : 0, 0);
  const int end = min(len + (has_new ? 1 : 0), p.S);
  const int pos_new = has_new && len >= 0 && len < p.S ? len : -1;
  const int64_t n = max(end - start, 0);
  const int64_t chunk = max((n + p.splits - 1) / p.splits, int64_t{MIN_CHUNK});
  const int lo = static_cast<int>(min(start + split * chunk, int64_t{p.S}));
  const int hi = static_cast<int>(min(int64_t{end}, lo + chunk));

  const int64_t bk = static_cast<int64_t>(b) * p.Hkv + kvh;
  const T* kc = p.k_cache + bk * p.S * D;
  const T* vc = p.v_cache + bk * p.S * D;
  const T* kn = has_new ? p.k_new + bk * D : nullptr;
  const T* vn = has_new ? p.v_new + bk * D : nullptr;
  if (pos_new >= 0 && split == 0 && tile == 0) {
    for (int c = tid; c < Lo::PACKS; c += ATT_THREADS) {
      reinterpret_cast<Pack<T>*>(p.k_cache + (bk * p.S + pos_new) * D)[c] =
          reinterpret_cast<const Pack<T>*>(kn)[c];
      reinterpret_cast<Pack<T>*>(p.v_cache + (bk * p.S + pos_new) * D)[c] =
          reinterpret_cast<const Pack<T>*>(vn)[c];
    }
  }

  float q[G][E], acc[G][E], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int gg = min(g, gcount - 1);  // heads past the group repeat the last one, unwritten
    load_row<T, D>(p.q + (static_cast<int64_t>(b) * p.Hq + h0 + gg) * D, lane_r, q[g]);
#pragma unroll
    for (int e = 0; e < E; ++e) q[g][e] *= p.scale_log2, acc[g][e] = 0.f;
    m[g] = NEG_INF, l[g] = 0.f;
  }

  // the trip count must be warp-uniform (shuffles below): step on the warp's first row
  for (int wb = lo + warp * (32 / L); wb < hi; wb += 2 * Lo::RG) {
    const int p0 = wb + lane / L, p1 = p0 + Lo::RG;
    const bool ok0 = p0 < hi, ok1 = p1 < hi;
    const int r0 = ok0 ? p0 : wb, r1 = ok1 ? p1 : wb;  // wb < hi: a safe row to reload
    float k0[E], k1[E], v0[E], v1[E];
    load_row<T, D>(r0 == pos_new ? kn : kc + static_cast<int64_t>(r0) * D, lane_r, k0);
    load_row<T, D>(r1 == pos_new ? kn : kc + static_cast<int64_t>(r1) * D, lane_r, k1);
    load_row<T, D>(r0 == pos_new ? vn : vc + static_cast<int64_t>(r0) * D, lane_r, v0);
    load_row<T, D>(r1 == pos_new ? vn : vc + static_cast<int64_t>(r1) * D, lane_r, v1);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s0 = fmaf(q[g][e], k0[e], s0), s1 = fmaf(q[g][e], k1[e], s1);
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) {
        s0 += __shfl_xor_sync(0xffffffffu, s0, off);
        s1 += __shfl_xor_sync(0xffffffffu, s1, off);
      }
      const float mn = fmaxf(m[g], fmaxf(ok0 ? s0 : NEG_INF, ok1 ? s1 : NEG_INF));
      const float a = rescale(m[g], mn);  // mn = -inf only while nothing was seen: all 0
      const float e0 = ok0 ? exp2f(s0 - mn) : 0.f, e1 = ok1 ? exp2f(s1 - mn) : 0.f;
      l[g] = l[g] * a + e0 + e1;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] = fmaf(acc[g][e], a, fmaf(e0, v0[e], e1 * v1[e]));
      m[g] = mn;
    }
  }

  // merge the row groups of a warp (lanes with the same lane_r hold the same elements)
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int off = L; off < 32; off <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float lo_ = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float mn = fmaxf(m[g], mo), a = rescale(m[g], mn), ao = rescale(mo, mn);
      l[g] = l[g] * a + lo_ * ao;
#pragma unroll
      for (int e = 0; e < E; ++e)
        acc[g][e] = acc[g][e] * a + __shfl_xor_sync(0xffffffffu, acc[g][e], off) * ao;
      m[g] = mn;
    }
  }
  __shared__ float sm_m[ATT_WARPS][G], sm_l[ATT_WARPS][G];
  __shared__ float sm_acc[ATT_WARPS][G][D];
  if (lane < L) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (lane == 0) sm_m[warp][g] = m[g], sm_l[warp][g] = l[g];
#pragma unroll
      for (int j = 0; j < Lo::PPL; ++j) {
        const int c = lane_r + j * L;
        if (c < Lo::PACKS)
#pragma unroll
          for (int nn = 0; nn < Lo::N; ++nn) sm_acc[warp][g][c * Lo::N + nn] = acc[g][j * Lo::N + nn];
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < gcount * D; idx += ATT_THREADS) {
    const int g = idx / D, d = idx % D;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
    float lt = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) {
      const float a = rescale(sm_m[w][g], mx);
      lt += sm_l[w][g] * a, o += sm_acc[w][g][d] * a;
    }
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h0 + g;
    const float val = lt > 0.f ? o / lt : 0.f;  // nothing visible: 0
    if (p.splits == 1) {
      p.out[bh * D + d] = static_cast<T>(val);
    } else {
      p.o_part[(bh * p.splits + split) * D + d] = val;
      if (d == 0) p.lse_part[bh * p.splits + split] = lt > 0.f ? mx + log2f(lt) : NEG_INF;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(ATT_THREADS) decode_combine_kernel(
    const float* __restrict__ o_part, const float* __restrict__ lse_part, T* __restrict__ out,
    int splits, int D) {
  const int64_t bh = blockIdx.x;
  __shared__ float w[MAX_SPLITS];
  __shared__ float inv_sum;
  if (threadIdx.x < 32) {
    const int a = threadIdx.x, c = threadIdx.x + 32;
    const float la = a < splits ? lse_part[bh * splits + a] : NEG_INF;
    const float lc = c < splits ? lse_part[bh * splits + c] : NEG_INF;
    float mx = fmaxf(la, lc);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float wa = rescale(la, mx), wc = rescale(lc, mx);  // mx = -inf: all 0
    w[a] = wa, w[c] = wc;
    float s = wa + wc;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (threadIdx.x == 0) inv_sum = s > 0.f ? 1.f / s : 0.f;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += ATT_THREADS) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o = fmaf(w[s], o_part[(bh * splits + s) * D + d], o);
    out[bh * D + d] = static_cast<T>(o * inv_sum);
  }
}

template <typename T, int D, int G>
void launch_split(const AttnParams<T>& p, dim3 grid, cudaStream_t stream) {
  decode_split_kernel<T, D, G><<<grid, ATT_THREADS, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_split_g(const AttnParams<T>& p, int G, dim3 grid, cudaStream_t stream) {
  switch (G) {
    case 1: return launch_split<T, D, 1>(p, grid, stream);
    case 2: return launch_split<T, D, 2>(p, grid, stream);
    default: return launch_split<T, D, 4>(p, grid, stream);
  }
}

// ------------------------------------------------------------------------------------- sample
constexpr int SMP_THREADS = 1024, SMP_WARPS = SMP_THREADS / 32, WALK_E = 4;
constexpr double FIX_ONE = 1099511627776.0;  // 2^40

// monotone: z1 < z2 <=> key1 < key2, and z1 == z2 <=> key1 == key2 (so -0.0 and +0.0 share a
// key: top-k / top-p keep both or neither, as the float comparisons of the reference do)
__device__ __forceinline__ uint32_t order_key(float z) {
  uint32_t u = __float_as_uint(z);
  if (u == 0x80000000u) u = 0u;  // -0.0 -> +0.0 on the bits: no float op a compiler could fold
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// z of token i; in a row holding +inf (inf_row), 0 at the +inf tokens and -inf elsewhere: they
// share the mass uniformly (rlhf_kernels/reference/sample.py)
template <typename T>
__device__ __forceinline__ float load_z(const T* x, int i, float temperature, bool inf_row) {
  const float z = __fdiv_rn(static_cast<float>(x[i]), temperature);
  return inf_row ? (z == POS_INF ? 0.f : NEG_INF) : z;
}

// Largest t with f(t) = sum of weight(x) over key(x) >= t at least `target` (0 when even f(0)
// falls short); weight 1 counts, weight exp(z - m) in 2^-40 fixed point weighs mass.
template <typename T, bool MASS>
__device__ uint32_t radix_select(const T* x, int V, float temperature, bool inf_row, float m,
                                 double target, unsigned long long* hist,
                                 unsigned long long* sh) {
  uint32_t prefix = 0;
  unsigned long long above = 0;  // f over keys above the current prefix range
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += SMP_THREADS) hist[i] = 0;
    __syncthreads();
    const uint32_t hi_mask = shift == 24 ? 0u : ~((1u << (shift + 8)) - 1u);
    for (int i = threadIdx.x; i < V; i += SMP_THREADS) {
      const float z = load_z(x, i, temperature, inf_row);
      const uint32_t key = order_key(z);
      if ((key & hi_mask) != prefix) continue;
      const unsigned long long w =
          MASS ? static_cast<unsigned long long>(expf(z - m) * FIX_ONE) : 1ull;
      if (w) atomicAdd(&hist[(key >> shift) & 255u], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // 256 serial steps: noise next to a pass over V elements
      unsigned long long f = above;
      int d = 255;
      for (; d >= 0; --d) {
        if (static_cast<double>(f + hist[d]) >= target) break;
        f += hist[d];
      }
      sh[0] = d < 0 ? 0ull : 1ull;
      sh[1] = f;
      sh[2] = d < 0 ? 0u : static_cast<unsigned long long>(d);
    }
    __syncthreads();
    if (sh[0] == 0) return 0;  // only on the first pass: nothing reaches the target, keep all
    above = sh[1];
    prefix |= static_cast<uint32_t>(sh[2]) << shift;
    __syncthreads();  // sh and hist are rewritten next pass
  }
  return prefix;
}

// Block-wide inclusive scan of one float per thread, in thread order; returns the exclusive
// prefix and stores the block total in *total.
__device__ float block_scan(float v, float* warp_sums, float* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float s = v;
  for (int off = 1; off < 32; off <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, s, off);
    if (lane >= off) s += t;
  }
  if (lane == 31) warp_sums[warp] = s;
  __syncthreads();
  if (warp == 0) {
    float w = lane < SMP_WARPS ? warp_sums[lane] : 0.f;
    for (int off = 1; off < 32; off <<= 1) {
      const float t = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += t;
    }
    if (lane < SMP_WARPS) warp_sums[lane] = w;  // inclusive over warps
    if (lane == SMP_WARPS - 1) *total = w;
  }
  __syncthreads();
  const float r = (warp ? warp_sums[warp - 1] : 0.f) + s - v;
  __syncthreads();  // warp_sums is reused by the next call
  return r;
}

// Walks the kept tokens in index order. Returns the first index whose cumulative kept mass
// exceeds target (-1 if none) and sets *w_total / *last_kept.
template <typename T>
__device__ int walk(const T* x, int V, float temperature, bool inf_row, float m, uint32_t thr,
                    float target, float* w_total, int* last_kept, float* warp_sums, float* sh_f,
                    int* sh_i) {
  float base = 0.f;
  if (threadIdx.x == 0) sh_i[0] = INT_MAX, sh_i[1] = -1;
  __syncthreads();
  for (int c0 = 0; c0 < V; c0 += SMP_THREADS * WALK_E) {
    const int i0 = c0 + threadIdx.x * WALK_E;
    float e[WALK_E], local = 0.f;
    int last = -1;
#pragma unroll
    for (int j = 0; j < WALK_E; ++j) {
      e[j] = 0.f;
      if (i0 + j < V) {
        const float z = load_z(x, i0 + j, temperature, inf_row);
        if (order_key(z) >= thr) e[j] = expf(z - m);
        if (e[j] > 0.f) last = i0 + j;  // an underflowed kept token is never returned
      }
      local += e[j];
    }
    float cum = base + block_scan(local, warp_sums, sh_f);
    int first = INT_MAX;
#pragma unroll
    for (int j = 0; j < WALK_E; ++j) {
      cum += e[j];
      if (e[j] > 0.f && cum > target && first == INT_MAX) first = i0 + j;
    }
    if (first != INT_MAX) atomicMin(&sh_i[0], first);
    if (last >= 0) atomicMax(&sh_i[1], last);
    base += *sh_f;
    __syncthreads();
    if (sh_i[0] != INT_MAX) break;  // uniform: every thread read it after the barrier
  }
  *w_total = base;
  *last_kept = sh_i[1];
  const int found = sh_i[0];
  __syncthreads();
  return found == INT_MAX ? -1 : found;
}

template <typename T>
__global__ void __launch_bounds__(SMP_THREADS) sample_kernel(
    const T* __restrict__ logits, int V, float temperature, int top_k, float top_p,
    const float* __restrict__ uniforms, int64_t* __restrict__ tokens, float* __restrict__ logps) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ unsigned long long hist[256], sh[3];
  __shared__ float warp_m[SMP_WARPS], warp_s[SMP_WARPS], warp_sums[SMP_WARPS], sh_f[1];
  __shared__ int sh_i[2], sh_nan, sh_inf;

  // pass 1: max of the finite z and the NaN / +inf counts, then sum exp(z - m) (two reads of
  // the row, but no rescaling per element)
  if (threadIdx.x == 0) sh_nan = 0, sh_inf = 0;
  __syncthreads();
  float m = NEG_INF;
  int n_nan = 0, n_inf = 0;
  for (int i = threadIdx.x; i < V; i += SMP_THREADS) {
    const float z = __fdiv_rn(static_cast<float>(x[i]), temperature);
    if (isnan(z)) ++n_nan;
    else if (z == POS_INF) ++n_inf;
    else m = fmaxf(m, z);
  }
  if (n_nan) atomicAdd(&sh_nan, n_nan);
  if (n_inf) atomicAdd(&sh_inf, n_inf);
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) warp_m[warp] = m;
  __syncthreads();
  m = NEG_INF;
  for (int w = 0; w < SMP_WARPS; ++w) m = fmaxf(m, warp_m[w]);
  const int row_nan = sh_nan, row_inf = sh_inf;  // read after the barrier: block-uniform
  if (row_nan || (row_inf == 0 && m == NEG_INF)) {  // error row: no distribution to sample
    if (threadIdx.x == 0) {
      tokens[row] = row_nan ? -1 : -2;
      logps[row] = __int_as_float(0x7fc00000);  // NaN
    }
    return;  // the whole CTA: no barrier is left waiting
  }
  const bool inf_row = row_inf > 0;
  float s = 0.f;
  if (inf_row) {  // z = 0 at the +inf tokens, -inf elsewhere (load_z)
    m = 0.f;
    s = static_cast<float>(row_inf);
  } else {
    for (int i = threadIdx.x; i < V; i += SMP_THREADS)
      s += expf(__fdiv_rn(static_cast<float>(x[i]), temperature) - m);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) warp_s[warp] = s;
    __syncthreads();
    s = 0.f;
    for (int w = 0; w < SMP_WARPS; ++w) s += warp_s[w];  // fixed order: deterministic
  }

  uint32_t thr = 0;
  if (top_k > 0 && top_k < V)
    thr = radix_select<T, false>(x, V, temperature, inf_row, m, static_cast<double>(top_k), hist,
                                 sh);
  if (top_p < 1.f) {
    // the exact fixed-point total comes from the first histogram pass; S * 2^40 is within
    // V * 2^-40 relative of it, far below the resolution that matters for top_p
    const double target = static_cast<double>(top_p) * static_cast<double>(s) * FIX_ONE;
    thr = max(thr, radix_select<T, true>(x, V, temperature, inf_row, m, target, hist, sh));
  }

  float w_total;
  int last_kept;
  walk(x, V, temperature, inf_row, m, thr, POS_INF, &w_total, &last_kept, warp_sums, sh_f, sh_i);
  const float u = uniforms[row];
  int tok = walk(x, V, temperature, inf_row, m, thr, u * w_total, &w_total, &last_kept, warp_sums,
                 sh_f, sh_i);
  if (threadIdx.x == 0) {
    if (tok < 0) tok = max(last_kept, 0);  // rounding left the walk short: last kept token
    tokens[row] = tok;
    logps[row] = (load_z(x, tok, temperature, inf_row) - m) - logf(s);
  }
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 const c10::optional<at::Tensor>& k_new,
                                 const c10::optional<at::Tensor>& v_new,
                                 const c10::optional<at::Tensor>& cache_start,
                                 double softmax_scale) {
  const char* fn = "decode_attention_cuda";
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), fn,
              ": q must be a contiguous CUDA tensor [B, Hq, D]");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn,
              ": dtype must be float32, float16 or bfloat16");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  auto check_like = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == q.device() && t.scalar_type() == st && t.is_contiguous() &&
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                fn, ": ", name, " must be contiguous, 16-byte aligned, on q's device and dtype");
  };
  check_like(q, "q");
  check_like(k_cache, "k_cache");
  check_like(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(3) == D &&
                  v_cache.sizes() == k_cache.sizes(),
              fn, ": k_cache / v_cache must be [B, Hkv, S, D]");
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, fn, ": Hq must be a multiple of Hkv");
  TORCH_CHECK(decode_cuda_head_dim_supported(D), fn,
              ": head dim must be one of DECODE_CUDA_HEAD_DIMS (csrc/decode.h), got ", D);
  TORCH_CHECK(S < (int64_t{1} << 31) - 2 && B * Hq < (int64_t{1} << 31), fn, ": sizes too large");
  auto check_idx = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == q.device() && t.scalar_type() == at::kInt && t.dim() == 1 &&
                    t.size(0) == B && t.is_contiguous(),
                fn, ": ", name, " must be contiguous int32 [B] on q's device");
  };
  check_idx(cache_seqlens, "cache_seqlens");
  const bool has_start = cache_start.has_value() && cache_start->defined();
  if (has_start) check_idx(*cache_start, "cache_start");
  const bool has_new = k_new.has_value() && k_new->defined();
  TORCH_CHECK(has_new == (v_new.has_value() && v_new->defined()), fn,
              ": k_new and v_new go together");
  if (has_new) {
    check_like(*k_new, "k_new");
    check_like(*v_new, "v_new");
    TORCH_CHECK(k_new->dim() == 3 && k_new->size(0) == B && k_new->size(1) == Hkv &&
                    k_new->size(2) == D && v_new->sizes() == k_new->sizes(),
                fn, ": k_new / v_new must be [B, Hkv, D]");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  if (B * Hq == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int group = static_cast<int>(Hq / Hkv);
  // heads per CTA: the whole group up to 4 (3 -> 4 computes a spare head); larger groups take
  // several tiles, each rereading K / V (from L2: the tiles of a head are neighbours in the grid)
  const int Gt = group <= 1 ? 1 : group <= 2 ? 2 : 4;
  const int tiles = (group + Gt - 1) / Gt;
  const int64_t base = B * Hkv * tiles;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (3 * static_cast<int64_t>(sms) + base - 1) / base;  // ~3 CTAs per SM
  const int64_t by_len = (S + MIN_CHUNK - 1) / MIN_CHUNK;
  const int splits = static_cast<int>(std::max<int64_t>(1, std::min({want, by_len, int64_t{MAX_SPLITS}})));
  at::Tensor o_part, lse_part;
  if (splits > 1) {
    o_part = at::empty({B, Hq, splits, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({B, Hq, splits}, q.options().dtype(at::kFloat));
  }
  const dim3 grid(static_cast<unsigned>(base), splits);

  auto run = [&](auto tag) {
    using T = decltype(tag);
    AttnParams<T> p;
    p.q = q.data_ptr<T>();
    p.k_new = has_new ? k_new->data_ptr<T>() : nullptr;
    p.v_new = has_new ? v_new->data_ptr<T>() : nullptr;
    p.k_cache = k_cache.data_ptr<T>();
    p.v_cache = v_cache.data_ptr<T>();
    p.out = out.data_ptr<T>();
    p.seqlens = cache_seqlens.data_ptr<int>();
    p.starts = has_start ? cache_start->data_ptr<int>() : nullptr;
    p.o_part = splits > 1 ? o_part.data_ptr<float>() : nullptr;
    p.lse_part = splits > 1 ? lse_part.data_ptr<float>() : nullptr;
    p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv), p.S = static_cast<int>(S);
    p.group = group, p.splits = splits, p.tiles = tiles;
    p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
    // one instantiation per entry of DECODE_CUDA_HEAD_DIMS (csrc/decode.h; checked above)
    static_assert(DECODE_CUDA_HEAD_DIMS.size() == 5, "one case per supported head dim");
    switch (D) {
      case 64: launch_split_g<T, 64>(p, Gt, grid, stream); break;
      case 80: launch_split_g<T, 80>(p, Gt, grid, stream); break;
      case 96: launch_split_g<T, 96>(p, Gt, grid, stream); break;
      case 128: launch_split_g<T, 128>(p, Gt, grid, stream); break;
      default: launch_split_g<T, 256>(p, Gt, grid, stream); break;
    }
    if (splits > 1) {
      decode_combine_kernel<T><<<static_cast<unsigned>(B * Hq), ATT_THREADS, 0, stream>>>(
          p.o_part, p.lse_part, p.out, splits, static_cast<int>(D));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (st == at::kFloat) run(float{});
  else if (st == at::kHalf) run(at::Half{});
  else run(at::BFloat16{});
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits, double temperature,
                                               int64_t top_k, double top_p,
                                               const at::Tensor& uniforms) {
  const char* fn = "sample_cuda";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), fn,
              ": logits must be a contiguous CUDA tensor [B, V]");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn,
              ": logits must be float32, float16 or bfloat16");
  const int64_t B = logits.size(0), V = logits.size(1);
  // 2^-40 fixed-point masses of up to V terms <= 1 must fit 64 bits
  TORCH_CHECK(B == 0 || (V > 0 && V <= (int64_t{1} << 23)), fn, ": V must be in [1, 2^23]");
  TORCH_CHECK(B < (int64_t{1} << 31), fn, ": at most 2^31 - 1 rows");
  TORCH_CHECK(uniforms.device() == logits.device() && uniforms.scalar_type() == at::kFloat &&
                  uniforms.dim() == 1 && uniforms.size(0) == B && uniforms.is_contiguous(),
              fn, ": uniforms must be contiguous float32 [B] on the logits' device");
  TORCH_CHECK(temperature > 0, fn, ": temperature must be > 0");
  TORCH_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1, fn, ": top_k >= 0, top_p in (0, 1]");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logps = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logps};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // z = x / float32(T), as the contract (../decode.h) and the torch reference divide
  const int k = static_cast<int>(std::min<int64_t>(top_k, V));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    sample_kernel<T><<<static_cast<unsigned>(B), SMP_THREADS, 0, stream>>>(
        logits.data_ptr<T>(), static_cast<int>(V), static_cast<float>(temperature), k,
        static_cast<float>(top_p),
        uniforms.data_ptr<float>(), tokens.data_ptr<int64_t>(), logps.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (st == at::kFloat) run(float{});
  else if (st == at::kHalf) run(at::Half{});
  else run(at::BFloat16{});
  return {tokens, logps};
}
