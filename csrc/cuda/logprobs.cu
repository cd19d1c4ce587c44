// Token log-probs and entropy on CUDA (contract in ../logprobs.h): the logits are read once
// forward (plus the label's logit, an L2 hit), read once and written once backward, and no
// [B, T, V] temporary is made.
//
// One CTA of 256 threads per (b, t) row. RLHF vocabularies are 32k-256k (64-512 KB per row in
// bf16): a whole CTA streams its row with 16-byte loads, so even a few hundred rows (eval,
// small batches) fill the GPU, and the block reduction at the end costs a few hundred cycles
// against microseconds of loads. A warp per row would only pay off for V of a few thousand or
// less, which is not a use case here: small V stays correct, the spare threads just idle.
//
// Forward: each thread keeps an online log-sum-exp over its strided share of the row,
//   s = sum exp(z - m),  u = sum exp(z - m) * (z - m),
// updated once per group of UNROLL 16-byte packs (one max, at most one rescale, one exp per
// logit). The block then merges the triples:
//   m = max(m1, m2),  s = a1 s1 + a2 s2,  u = a1 (u1 + (m1 - m) s1) + a2 (u2 + (m2 - m) s2),
//   ai = exp(mi - m);
// a triple whose m is -inf (only -inf logits so far) keeps its s and u as they are (0, or NaN
// from a NaN logit, which must propagate) and never forms (-inf) * 0. At the end
// lse = m + log s, entropy = log s - u / s (relative to m: no cancellation), logp = z[label] - lse.
// float math runs in base 2 as in flash attention: the logits are scaled by log2(e) / temperature
// (one multiply), exp2f / log2f go to the SFU's ex2 / lg2 with no argument reduction, results
// are scaled back by ln 2. float64 logits (gradcheck) use double exp / log in natural units.
//
// Rows need not be 16-byte aligned (odd V, logits[:, :-1]): each row is split into a scalar
// head up to its first 16-byte boundary, whole packs, and a scalar tail.
//
// Backward: every element is loaded, turned into its gradient and stored by one thread, so
// grad_logits may be the logits themselves; the label's element gets the label term from the
// thread that owns it, out of the value that thread just loaded, so no thread ever needs an
// element another thread may already have overwritten (no shared memory, no __syncthreads).
// Packs are used when the logits and grad_logits rows have the same offset modulo 16 bytes.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../logprobs.h"

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int UNROLL = 2;  // 16-byte packs in flight per thread per step

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// z is carried as logit * scale, scale = inv_temperature * to_unit; results * from_unit.
template <typename acc_t> struct Math;
template <> struct Math<float> {  // base 2
  static constexpr double to_unit = 1.4426950408889634;     // log2(e)
  static constexpr float from_unit = 0.69314718055994531f;  // ln(2)
  __device__ static float ex(float x) { return exp2f(x); }
  __device__ static float lg(float x) { return log2f(x); }
  __device__ static float mx(float a, float b) { return fmaxf(a, b); }  // ignores NaN
};
template <> struct Math<double> {  // natural units
  static constexpr double to_unit = 1.0, from_unit = 1.0;
  __device__ static double ex(double x) { return exp(x); }
  __device__ static double lg(double x) { return log(x); }
  __device__ static double mx(double a, double b) { return fmax(a, b); }
};

template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T x[N];
};

// [0, head) scalar, then `packs` whole packs, then [tail, V) scalar; all scalar if !vec.
struct Split { int head, packs, tail; };

template <typename T>
__device__ __forceinline__ Split split_row(const T* row, int V, bool vec) {
  if (!vec) return {V, 0, V};
  // element pointers are sizeof(T)-aligned (checked on the host), so this lands on 16 bytes
  const int to_boundary = static_cast<int>((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15);
  const int head = min(V, to_boundary / static_cast<int>(sizeof(T)));
  const int packs = (V - head) / Pack<T>::N;
  return {head, packs, head + packs * Pack<T>::N};
}

template <typename acc_t> struct Lse { acc_t m, s, u; };

// Rebases sums taken relative to m_from onto m_to >= m_from.
template <typename acc_t>
__device__ __forceinline__ void rebase(acc_t m_from, acc_t m_to, acc_t& s, acc_t& u) {
  if (m_from == m_to || m_from == -std::numeric_limits<acc_t>::infinity()) return;
  const acc_t a = Math<acc_t>::ex(m_from - m_to);
  u = a * (u + (m_from - m_to) * s);
  s *= a;
}

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> merge(Lse<acc_t> a, Lse<acc_t> b) {
  const acc_t m = Math<acc_t>::mx(a.m, b.m);
  rebase(a.m, m, a.s, a.u);
  rebase(b.m, m, b.s, b.u);
  return {m, a.s + b.s, a.u + b.u};
}

template <typename acc_t, int K>
__device__ __forceinline__ void update(Lse<acc_t>& st, const acc_t (&z)[K]) {
  using M = Math<acc_t>;
  acc_t gmax = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) gmax = M::mx(gmax, z[k]);
  if (gmax > st.m) {
    rebase(st.m, gmax, st.s, st.u);
    st.m = gmax;
  }
  // m = -inf: every z so far is -inf (exp = 0) or NaN; any finite reference keeps it so
  const acc_t ref = st.m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t d = z[k] - ref, e = M::ex(d);
    st.s += e;
    st.u += e > acc_t(0) ? e * d : acc_t(0);  // e = 0 has d = -inf: 0 * (-inf) would be NaN
  }
}

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> warp_merge(Lse<acc_t> a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    a = merge(a, Lse<acc_t>{__shfl_xor_sync(0xffffffffu, a.m, off),
                            __shfl_xor_sync(0xffffffffu, a.s, off),
                            __shfl_xor_sync(0xffffffffu, a.u, off)});
  return a;
}

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__global__ void __launch_bounds__(THREADS) logprobs_fwd_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels, int64_t T,
    int64_t sb, int64_t st, int V, acc_t scale, acc_t* __restrict__ logp,
    acc_t* __restrict__ entropy, acc_t* __restrict__ lse) {
  using M = Math<acc_t>;
  using P = Pack<scalar_t>;
  constexpr int N = P::N;
  constexpr acc_t NEG_INF = -std::numeric_limits<acc_t>::infinity();
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + (row / T) * sb + (row % T) * st;
  const int tid = threadIdx.x;
  // issued first to hide its latency; its sector is read by the walk anyway (L2 hit)
  acc_t z_label = 0;
  if (tid == 0) z_label = static_cast<acc_t>(x[labels[row]]) * scale;

  Lse<acc_t> acc{NEG_INF, acc_t(0), acc_t(0)};
  const Split sp = split_row(x, V, true);
  for (int j = tid; j < sp.head; j += THREADS) update(acc, {static_cast<acc_t>(x[j]) * scale});
  for (int j = sp.tail + tid; j < V; j += THREADS)
    update(acc, {static_cast<acc_t>(x[j]) * scale});
  const P* px = reinterpret_cast<const P*>(x + sp.head);
  for (int k = tid; k < sp.packs; k += THREADS * UNROLL) {
    P p[UNROLL];
#pragma unroll
    for (int i = 0; i < UNROLL; ++i)  // all loads first; past the end: reload the last pack
      p[i] = px[min(k + i * THREADS, sp.packs - 1)];
    acc_t z[UNROLL * N];
#pragma unroll
    for (int i = 0; i < UNROLL; ++i)
#pragma unroll
      for (int n = 0; n < N; ++n)  // -inf pads past the row end contribute exp = 0
        z[i * N + n] =
            k + i * THREADS < sp.packs ? static_cast<acc_t>(p[i].x[n]) * scale : NEG_INF;
    update(acc, z);
  }

  __shared__ Lse<acc_t> partial[WARPS];
  acc = warp_merge(acc);
  if ((tid & 31) == 0) partial[tid >> 5] = acc;
  __syncthreads();
  if (tid < 32) {
    acc = warp_merge(tid < WARPS ? partial[tid] : Lse<acc_t>{NEG_INF, acc_t(0), acc_t(0)});
    if (tid == 0) {
      const acc_t log_s = M::lg(acc.s);
      // z_label - m is exact when the label is the max: logp near 0 keeps its precision
      logp[row] = (z_label - acc.m - log_s) * M::from_unit;
      lse[row] = (acc.m + log_s) * M::from_unit;
      if (entropy) entropy[row] = (log_s - acc.u / acc.s) * M::from_unit;
    }
  }
}

// No __restrict__ on logits / grad: they may be the same memory.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__global__ void __launch_bounds__(THREADS) logprobs_bwd_kernel(
    const scalar_t* logits, scalar_t* grad, const int64_t* __restrict__ labels,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ entropy,
    const acc_t* __restrict__ grad_logp, const acc_t* __restrict__ grad_entropy, int64_t T,
    int64_t sb, int64_t st, int64_t gb, int64_t gt, int V, acc_t scale, acc_t inv_t) {
  using M = Math<acc_t>;
  using P = Pack<scalar_t>;
  constexpr int N = P::N;
  const int64_t row = blockIdx.x, b = row / T, t = row % T;
  const scalar_t* x = logits + b * sb + t * st;
  scalar_t* g = grad + b * gb + t * gt;
  const int tid = threadIdx.x;
  const int label = static_cast<int>(labels[row]);
  // With d = z - lse in M's units and p = ex(d):
  //   grad = inv_t * (g_logp * (1[label] - p) - g_ent * p * (z - lse + entropy))
  //        = cl * (1[label] - p) - p * (c1 * d + c0)
  const acc_t lse_u = static_cast<acc_t>(static_cast<double>(lse[row]) * M::to_unit);
  const acc_t ge = grad_entropy ? grad_entropy[row] : acc_t(0);
  const acc_t cl = grad_logp[row] * inv_t;
  const acc_t c1 = ge * M::from_unit * inv_t;
  const acc_t c0 = grad_entropy ? ge * entropy[row] * inv_t : acc_t(0);
  auto grad_of = [&](scalar_t v, bool is_label) {
    const acc_t d = static_cast<acc_t>(v) * scale - lse_u, p = M::ex(d);
    // p = 0 (z = -inf): no entropy term rather than 0 * (-inf)
    const acc_t gz = cl * ((is_label ? acc_t(1) : acc_t(0)) - p) -
                     (p > acc_t(0) ? p * (c1 * d + c0) : acc_t(0));
    return static_cast<scalar_t>(gz);
  };

  const bool vec = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(g)) & 15) == 0;
  const Split sp = split_row(x, V, vec);
  for (int j = tid; j < sp.head; j += THREADS) g[j] = grad_of(x[j], j == label);
  for (int j = sp.tail + tid; j < V; j += THREADS) g[j] = grad_of(x[j], j == label);
  const P* px = reinterpret_cast<const P*>(x + sp.head);
  P* pg = reinterpret_cast<P*>(g + sp.head);
  for (int k = tid; k < sp.packs; k += THREADS * UNROLL) {
    P p[UNROLL];  // read only where loaded
#pragma unroll
    for (int i = 0; i < UNROLL; ++i)  // loads before stores: in place, g overwrites x
      if (k + i * THREADS < sp.packs) p[i] = px[k + i * THREADS];
#pragma unroll
    for (int i = 0; i < UNROLL; ++i) {
      if (k + i * THREADS >= sp.packs) continue;
      const int lane = label - (sp.head + (k + i * THREADS) * N);  // label's lane, if here
      P out;
#pragma unroll
      for (int n = 0; n < N; ++n) out.x[n] = grad_of(p[i].x[n], n == lane);
      pg[k + i * THREADS] = out;
    }
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const char* fn) {
  TORCH_CHECK(logits.is_cuda() && labels.device() == logits.device(), fn,
              ": logits and labels must be CUDA tensors on the same device");
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, fn,
              ": logits must be [B, T, V] with a contiguous last dimension");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(1) && labels.is_contiguous() &&
                  labels.scalar_type() == at::kLong,
              fn, ": labels must be contiguous int64 [B, T]");
  const int64_t rows = logits.size(0) * logits.size(1), V = logits.size(2);
  TORCH_CHECK(rows == 0 || (V > 0 && V < (int64_t{1} << 30)), fn,
              ": the vocabulary size must be in [1, 2^30)");
  TORCH_CHECK(rows < (int64_t{1} << 31), fn, ": at most 2^31 - 1 rows (one block each)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0, fn,
              ": logits must be aligned to their element size");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
    bool with_entropy) {
  check_inputs(logits, labels, "logprobs_fwd_cuda");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto opts =
      logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty({B, T}, opts), lse = at::empty({B, T}, opts);
  at::Tensor ent = with_entropy ? at::empty({B, T}, opts) : at::empty({0}, opts);
  if (B * T == 0) return {logp, ent, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    logprobs_fwd_kernel<scalar_t><<<static_cast<unsigned>(B * T), THREADS, 0, stream>>>(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), T, logits.stride(0),
        logits.stride(1), static_cast<int>(V),
        static_cast<acc_t>(inv_temperature * Math<acc_t>::to_unit), logp.data_ptr<acc_t>(),
        with_entropy ? ent.data_ptr<acc_t>() : nullptr, lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, ent, lse};
}

void logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const c10::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                       const c10::optional<at::Tensor>& grad_entropy, double inv_temperature,
                       at::Tensor& grad_logits) {
  check_inputs(logits, labels, "logprobs_bwd_cuda");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.stride(2) == 1 &&
                  grad_logits.scalar_type() == logits.scalar_type() &&
                  grad_logits.device() == logits.device() &&
                  reinterpret_cast<uintptr_t>(grad_logits.data_ptr()) %
                          grad_logits.element_size() == 0,
              "logprobs_bwd_cuda: grad_logits must match logits");
  const bool has_ent = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_ent || (entropy.has_value() && entropy->defined()),
              "logprobs_bwd_cuda: the entropy gradient needs the saved entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto per_row = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == logits.device() && t.numel() == B * T, "logprobs_bwd_cuda: ",
                name, " must have B * T elements on the logits' device");
    return t.contiguous().to(acc);
  };
  const at::Tensor lse_c = per_row(lse, "lse"), glp = per_row(grad_logp, "grad_logp");
  const at::Tensor ent_c = has_ent ? per_row(*entropy, "entropy") : at::Tensor();
  const at::Tensor gent = has_ent ? per_row(*grad_entropy, "grad_entropy") : at::Tensor();
  if (B * T == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    logprobs_bwd_kernel<scalar_t><<<static_cast<unsigned>(B * T), THREADS, 0, stream>>>(
        logits.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(),
        labels.data_ptr<int64_t>(), lse_c.data_ptr<acc_t>(),
        has_ent ? ent_c.data_ptr<acc_t>() : nullptr, glp.data_ptr<acc_t>(),
        has_ent ? gent.data_ptr<acc_t>() : nullptr, T, logits.stride(0), logits.stride(1),
        grad_logits.stride(0), grad_logits.stride(1), static_cast<int>(V),
        static_cast<acc_t>(inv_temperature * Math<acc_t>::to_unit),
        static_cast<acc_t>(inv_temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
