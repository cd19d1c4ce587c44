// GAE on CUDA: a reverse scan of affine maps, one pass over the data.
//
// Per token the state (A, N) = (advantage, value of the next valid token) is mapped by
//   A' = a*A + b*N + d,  N' = e*N + f
// active token: (a, b, d, e, f) = (gamma*lam, gamma, r~ - v~, 0, v~); inactive: identity.
// (mode zero: every token is active, r~ = m ? r : 0, v~ = m ? v : 0; mode skip: active = m.)
// These maps compose into maps of the same form, so a row is a reverse associative scan.
//
// A block of 128 threads walks its row from the end in tiles of 128 x 8 tokens: each thread
// loads 8 consecutive tokens (16-byte loads when aligned), composes their maps, the block scans
// the 128 thread maps (warp shuffles, then 4 warp totals), and each thread replays its 8 tokens
// from the state entering them. The tile's total map carries the state to the next tile.
// Long rows with few of them are split over several blocks: a first kernel writes each
// split's total map, the second composes the splits to its right into its incoming state.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "../gae.h"

namespace {

constexpr int THREADS = 128;
constexpr int VEC = 8;                  // tokens per thread per tile
constexpr int TILE = THREADS * VEC;     // tokens per tile
constexpr int WARPS = THREADS / 32;

struct Map {
  float a, b, d, e, f;
};

__device__ __forceinline__ Map identity() { return {1.f, 0.f, 0.f, 1.f, 0.f}; }

// left ∘ right: apply right (later tokens) first, then left
__device__ __forceinline__ Map compose(const Map& l, const Map& r) {
  return {l.a * r.a, l.a * r.b + l.b * r.e, l.a * r.d + l.b * r.f + l.d, l.e * r.e,
          l.e * r.f + l.f};
}

struct State {
  float A, N;
};

__device__ __forceinline__ State apply(const Map& m, const State& s) {
  return {m.a * s.A + m.b * s.N + m.d, m.e * s.N + m.f};
}

__device__ __forceinline__ Map shfl_down(const Map& m, int off) {
  return {__shfl_down_sync(0xffffffffu, m.a, off), __shfl_down_sync(0xffffffffu, m.b, off),
          __shfl_down_sync(0xffffffffu, m.d, off), __shfl_down_sync(0xffffffffu, m.e, off),
          __shfl_down_sync(0xffffffffu, m.f, off)};
}

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float(at::Half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float(at::BFloat16 x) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&x));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T x[N];
};

struct Rows {
  const int32_t* cu;  // packed offsets, or nullptr for padded rows of row_len
  int64_t row_len;
  __device__ int64_t begin(int64_t b) const { return cu ? cu[b] : b * row_len; }
  __device__ int64_t length(int64_t b) const { return cu ? cu[b + 1] - cu[b] : row_len; }
};

struct Params {
  float g, gl;
  int splits;               // blocks per row
  int64_t tiles_per_split;
};

// Loads one thread's VEC tokens starting at `pos` (relative to the row start) and builds
// their maps. Tokens past the row end are inactive and invalid.
template <typename scalar_t, bool SKIP, bool ALIGNED>
__device__ __forceinline__ void load_tokens(const scalar_t* r, const scalar_t* v,
                                            const bool* m, int64_t base, int64_t pos,
                                            int64_t len, float rt[VEC], float vt[VEC],
                                            bool valid[VEC], bool active[VEC], int& bad) {
  if (ALIGNED && pos + VEC <= len) {
    const auto rp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(r + base + pos);
    const auto vp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(v + base + pos);
    const auto mp = *reinterpret_cast<const Pack<bool, VEC>*>(m + base + pos);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      valid[k] = mp.x[k];
      rt[k] = valid[k] ? to_float(rp.x[k]) : 0.f;  // select: padding may be NaN
      vt[k] = valid[k] ? to_float(vp.x[k]) : 0.f;
      active[k] = SKIP ? valid[k] : true;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const bool inside = pos + k < len;
      valid[k] = inside && m[base + pos + k];
      rt[k] = valid[k] ? to_float(r[base + pos + k]) : 0.f;
      vt[k] = valid[k] ? to_float(v[base + pos + k]) : 0.f;
      active[k] = SKIP ? valid[k] : inside;
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) bad |= (isfinite(rt[k]) ? 0 : 1) | (isfinite(vt[k]) ? 0 : 2);
}

// Reverse scan of the block's thread maps. Returns the map of all tokens to the right of this
// thread's chunk within the tile; `total` gets the whole tile's map.
__device__ __forceinline__ Map block_scan(Map mine, Map* warp_totals, Map& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Map incl = mine;  // this lane's chunk and every lane to its right in the warp
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const Map other = shfl_down(incl, off);
    if (lane + off < 32) incl = compose(incl, other);
  }
  Map right = shfl_down(incl, 1);
  if (lane == 31) right = identity();
  if (lane == 0) warp_totals[warp] = incl;
  __syncthreads();
  Map right_warps = identity();
  for (int w = WARPS - 1; w > warp; --w) right_warps = compose(warp_totals[w], right_warps);
  total = identity();
  for (int w = WARPS - 1; w >= 0; --w) total = compose(warp_totals[w], total);
  __syncthreads();  // warp_totals is reused by the next tile
  return compose(right, right_warps);
}

// One block = one split of one row. WRITE=false: only the split's total map (first kernel).
template <typename scalar_t, bool SKIP, bool WHITEN, bool ALIGNED, bool WRITE>
__global__ void __launch_bounds__(THREADS) gae_scan_kernel(
    const scalar_t* __restrict__ r, const scalar_t* __restrict__ v, const bool* __restrict__ m,
    float* __restrict__ adv, float* __restrict__ ret, Rows rows, Params p, Map* split_maps,
    double* __restrict__ stats, int* __restrict__ bad_flag) {
  __shared__ Map warp_totals[WARPS];
  const int64_t row = blockIdx.x / p.splits;
  const int split = blockIdx.x % p.splits;
  const int64_t base = rows.begin(row), len = rows.length(row);
  const int64_t n_tiles = (len + TILE - 1) / TILE;
  const int64_t t_lo = split * p.tiles_per_split;
  const int64_t t_hi = min(n_tiles, t_lo + p.tiles_per_split);

  // state entering this split from the right: the splits to its right, composed
  State carry{0.f, 0.f};
  Map range = identity();
  if (WRITE && p.splits > 1) {
    Map right = identity();
    for (int s = p.splits - 1; s > split; --s)
      right = compose(split_maps[row * p.splits + s], right);
    carry = apply(right, carry);
  }
  int bad = 0;
  double sum = 0, sumsq = 0, count = 0;
  for (int64_t t = t_hi - 1; t >= t_lo; --t) {
    const int64_t pos = t * TILE + threadIdx.x * VEC;
    float rt[VEC], vt[VEC];
    bool valid[VEC], active[VEC];
    load_tokens<scalar_t, SKIP, ALIGNED>(r, v, m, base, pos, len, rt, vt, valid, active, bad);
    Map mine = identity();
#pragma unroll
    for (int k = VEC - 1; k >= 0; --k)
      if (active[k]) mine = compose({p.gl, p.g, rt[k] - vt[k], 0.f, vt[k]}, mine);
    Map total;
    const Map right = block_scan(mine, warp_totals, total);
    if (WRITE) {
      State s = apply(right, carry);
      float oa[VEC], orr[VEC];
#pragma unroll
      for (int k = VEC - 1; k >= 0; --k) {
        if (active[k]) s = {p.gl * s.A + p.g * s.N + (rt[k] - vt[k]), vt[k]};
        oa[k] = valid[k] ? s.A : 0.f;
        orr[k] = valid[k] ? s.A + vt[k] : 0.f;
        if (WHITEN && valid[k]) {
          sum += oa[k];
          sumsq += static_cast<double>(oa[k]) * oa[k];
          count += 1;
        }
      }
      if (ALIGNED && pos + VEC <= len) {
        Pack<float, VEC> pa, pr;
#pragma unroll
        for (int k = 0; k < VEC; ++k) pa.x[k] = oa[k], pr.x[k] = orr[k];
        *reinterpret_cast<Pack<float, VEC>*>(adv + base + pos) = pa;
        *reinterpret_cast<Pack<float, VEC>*>(ret + base + pos) = pr;
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          if (pos + k < len) adv[base + pos + k] = oa[k], ret[base + pos + k] = orr[k];
      }
      carry = apply(total, carry);
    } else {
      range = compose(total, range);
    }
  }
  if (!WRITE) {
    if (threadIdx.x == 0) split_maps[blockIdx.x] = range;
    return;
  }
  // block reductions of the flags and the whitening sums, then one atomic each per block
  __shared__ double partial[WARPS][3];
  __shared__ int partial_bad[WARPS];
  for (int off = 16; off > 0; off >>= 1) {
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
    if (WHITEN) {
      sum += __shfl_xor_sync(0xffffffffu, sum, off);
      sumsq += __shfl_xor_sync(0xffffffffu, sumsq, off);
      count += __shfl_xor_sync(0xffffffffu, count, off);
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    partial_bad[warp] = bad;
    partial[warp][0] = sum, partial[warp][1] = sumsq, partial[warp][2] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < WARPS; ++w) {
      bad |= partial_bad[w];
      sum += partial[w][0], sumsq += partial[w][1], count += partial[w][2];
    }
    if (bad) atomicOr(bad_flag, bad);
    if (WHITEN && count > 0) {
      atomicAdd(stats, sum);
      atomicAdd(stats + 1, sumsq);
      atomicAdd(stats + 2, count);
    }
  }
}

__global__ void gae_whiten_kernel(float* __restrict__ adv, const bool* __restrict__ m,
                                  const double* __restrict__ stats, int64_t n) {
  float mean, rstd;
  gae_whiten_stats(stats[0], stats[1], stats[2], &mean, &rstd);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    adv[i] = m[i] ? (adv[i] - mean) * rstd : 0.f;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename scalar_t, bool SKIP, bool WHITEN, bool ALIGNED>
void launch(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
            at::Tensor& adv, at::Tensor& ret, const Rows& rows, const Params& p, int64_t batch,
            at::Tensor& split_maps, at::Tensor& stats, at::Tensor& bad, cudaStream_t stream) {
  const auto* r = rewards.data_ptr<scalar_t>();
  const auto* v = values.data_ptr<scalar_t>();
  const bool* m = mask.data_ptr<bool>();
  Map* maps = reinterpret_cast<Map*>(split_maps.data_ptr<float>());
  const dim3 grid(static_cast<unsigned>(batch * p.splits));
  if (p.splits > 1)
    gae_scan_kernel<scalar_t, SKIP, WHITEN, ALIGNED, false><<<grid, THREADS, 0, stream>>>(
        r, v, m, nullptr, nullptr, rows, p, maps, nullptr, nullptr);
  gae_scan_kernel<scalar_t, SKIP, WHITEN, ALIGNED, true><<<grid, THREADS, 0, stream>>>(
      r, v, m, adv.data_ptr<float>(), ret.data_ptr<float>(), rows, p, maps,
      stats.data_ptr<double>(), bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_cuda(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t row_len, double gamma, double lam,
    bool skip, bool whiten) {
  TORCH_CHECK(rewards.is_cuda() && values.is_cuda() && mask.is_cuda(), "gae_cuda: CUDA tensors");
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous() && mask.is_contiguous(),
              "gae_cuda: inputs must be contiguous");
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "gae_cuda: rewards/values dtype differ");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae_cuda: mask must be bool");
  TORCH_CHECK(rewards.numel() == values.numel() && rewards.numel() == mask.numel(),
              "gae_cuda: rewards, values and mask must have the same number of elements");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Rows rows{nullptr, row_len};
  int64_t batch, longest;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(cu_seqlens->is_cuda() && cu_seqlens->scalar_type() == at::kInt &&
                    cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1,
                "gae_cuda: cu_seqlens must be CUDA int32 [B + 1]");
    rows.cu = cu_seqlens->data_ptr<int32_t>();
    batch = cu_seqlens->numel() - 1;
    longest = rewards.numel();  // an upper bound: splits past a row's end do nothing
  } else {
    TORCH_CHECK(row_len > 0 && rewards.numel() % row_len == 0, "gae_cuda: bad row_len");
    batch = rewards.numel() / row_len;
    longest = row_len;
  }
  auto fopts = rewards.options().dtype(at::kFloat);
  TORCH_CHECK(batch > 0 || rewards.numel() == 0, "gae_cuda: cu_seqlens has no row for ",
              rewards.numel(), " inputs");
  if (rewards.numel() == 0) {  // nothing to scan (and no grid of 0 blocks, no division by 0)
    return {at::empty({rewards.numel()}, fopts), at::empty({rewards.numel()}, fopts),
            at::zeros({1}, rewards.options().dtype(at::kInt))};
  }
  // Enough blocks to fill the GPU: split rows only when there are too few of them.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = (longest + TILE - 1) / TILE;
  int64_t splits = 1;
  if (!cu_seqlens.has_value() && batch < 4 * sms)
    splits = std::min<int64_t>(tiles, (8 * sms + batch - 1) / batch);
  Params p{static_cast<float>(gamma), static_cast<float>(gamma * lam), static_cast<int>(splits),
           (tiles + splits - 1) / splits};

  at::Tensor adv = at::empty({rewards.numel()}, fopts), ret = at::empty({rewards.numel()}, fopts);
  at::Tensor split_maps = at::empty({splits > 1 ? batch * splits * 5 : 1}, fopts);
  at::Tensor stats = at::zeros({3}, rewards.options().dtype(at::kDouble));
  at::Tensor bad = at::zeros({1}, rewards.options().dtype(at::kInt));
  const size_t elem = rewards.element_size();
  const bool vec_ok = !cu_seqlens.has_value() && row_len % VEC == 0 &&
                      aligned(rewards.data_ptr(), elem * VEC) &&
                      aligned(values.data_ptr(), elem * VEC) && aligned(mask.data_ptr(), VEC) &&
                      aligned(adv.data_ptr(), 4 * VEC) && aligned(ret.data_ptr(), 4 * VEC);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cuda", [&] {
    auto go = [&](auto skip_c, auto whiten_c, auto aligned_c) {
      launch<scalar_t, decltype(skip_c)::value, decltype(whiten_c)::value,
             decltype(aligned_c)::value>(rewards, values, mask, adv, ret, rows, p, batch,
                                         split_maps, stats, bad, stream);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (vec_ok) {
      if (skip) whiten ? go(T{}, T{}, T{}) : go(T{}, F{}, T{});
      else whiten ? go(F{}, T{}, T{}) : go(F{}, F{}, T{});
    } else {
      if (skip) whiten ? go(T{}, T{}, F{}) : go(T{}, F{}, F{});
      else whiten ? go(F{}, T{}, F{}) : go(F{}, F{}, F{});
    }
  });
  if (whiten) {
    const int64_t n = rewards.numel();
    const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 16 * sms));
    gae_whiten_kernel<<<blocks, 256, 0, stream>>>(adv.data_ptr<float>(), mask.data_ptr<bool>(),
                                                  stats.data_ptr<double>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {adv, ret, bad};
}
