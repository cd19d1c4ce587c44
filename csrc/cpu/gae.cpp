// GAE on the CPU.
//
// The recursion is sequential in t, so one row alone is latency bound (one dependent FMA per
// token). We run W rows side by side instead: a tile of TB time steps of W rows is copied into
// a [TB][W] buffer (time-major, reversed), scanned with SIMD across the W lanes, and copied back.
// Each element is read and written once from memory; the transposes stay in L1.
//
// Per token the state (A, N) = (advantage, value of the next valid token) evolves as
//   active:   A <- gamma*lam*A + gamma*N + (r~ - v~),  N <- v~
//   inactive: unchanged
// mode zero: every token is active, r~ = m ? r : 0, v~ = m ? v : 0  (DeepSpeed-Chat/TRL/OpenRLHF)
// mode skip: active = m, r~ = r, v~ = v                             (veRL: holes are transparent)
// Masked inputs are selected away, never multiplied, so padding may hold NaN.
// Built for x86-64-v3 and the baseline like the other CPU kernels (vec_math.h), with W = 4 in
// both: the scan's state lives in registers, and 8 lanes of it spill on AVX2.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../gae.h"
#include "vec_math.h"

namespace {

constexpr int W = 4;    // rows scanned side by side
constexpr int TB = 64;  // time steps per tile

typedef rlhf_cpu::vfloat<W> vf;
typedef rlhf_cpu::vint<W> vi;
typedef rlhf_cpu::vdouble<W> vd;

using rlhf_cpu::vload;
using rlhf_cpu::vstore;

struct Rows {
  const int32_t* cu;  // packed offsets, or nullptr for padded rows of row_len
  int64_t row_len;
  int64_t begin(int64_t b) const { return cu ? cu[b] : b * row_len; }
  int64_t length(int64_t b) const { return cu ? cu[b + 1] - cu[b] : row_len; }
};

struct Stats {
  double sum = 0, sumsq = 0, count = 0;
  int bad = 0;  // bit 0: a valid reward is not finite, bit 1: a valid value is not finite
};

template <typename scalar_t, bool SKIP, bool WHITEN>
RLHF_INLINE void scan_rows(const scalar_t* r, const scalar_t* v, const bool* m, float* adv, float* ret,
               const Rows& rows, int64_t b0, int64_t nb, float g, float gl, Stats& st) {
  int64_t start[W], len[W];
  int64_t maxlen = 0;
  for (int l = 0; l < W; ++l) {
    start[l] = l < nb ? rows.begin(b0 + l) : 0;
    len[l] = l < nb ? rows.length(b0 + l) : 0;
    maxlen = std::max(maxlen, len[l]);
  }
  // plain arrays for the transposes (lane stores), vectors for the scan
  alignas(64) float R[TB][W], V[TB][W], OA[TB][W], OR[TB][W];
  alignas(64) int32_t M[TB][W];
  vf A = {}, N = {}, bad_r = {}, bad_v = {};
  vd sum = {}, sumsq = {}, cnt = {};
  const vf zero = {}, one = zero + 1.f;

  // k counts back from each row's last token, so rows of different lengths stay aligned at
  // their ends, where the recursion starts.
  for (int64_t k0 = 0; k0 < maxlen; k0 += TB) {
    for (int l = 0; l < W; ++l) {
      const int64_t n = std::clamp<int64_t>(len[l] - k0, 0, TB);
      const int64_t last = start[l] + len[l] - 1 - k0;
      // Hardware prefetchers follow few descending streams: fetch two tiles ahead ourselves.
      if (len[l] - k0 > 3 * TB) {
        for (int64_t j = 2 * TB; j < 3 * TB; j += 64 / sizeof(scalar_t)) {
          __builtin_prefetch(r + last - j);
          __builtin_prefetch(v + last - j);
        }
        __builtin_prefetch(m + last - 2 * TB);
      }
      for (int64_t j = 0; j < n; ++j) {
        R[j][l] = static_cast<float>(r[last - j]);
        V[j][l] = static_cast<float>(v[last - j]);
        M[j][l] = m[last - j] ? -1 : 0;
      }
      for (int64_t j = n; j < TB; ++j) {
        R[j][l] = V[j][l] = 0.f;
        M[j][l] = 0;
      }
    }
    for (int j = 0; j < TB; ++j) {
      const vi valid = vload<vi>(M[j]);
      const vf rt = valid ? vload<vf>(R[j]) : zero;  // select, never multiply: padding may be NaN
      const vf vt = valid ? vload<vf>(V[j]) : zero;
      const vf a_new = gl * A + g * N + (rt - vt);
      if (SKIP) {
        A = valid ? a_new : A;
        N = valid ? vt : N;
      } else {
        A = a_new;
        N = vt;
      }
      const vf out_a = valid ? A : zero;
      vstore(OA[j], out_a);
      vstore(OR[j], valid ? A + vt : zero);
      bad_r += rt - rt;  // NaN iff a valid input was inf or NaN
      bad_v += vt - vt;
      if (WHITEN) {
        const vd a = __builtin_convertvector(out_a, vd);
        sum += a;
        sumsq += a * a;
        cnt += __builtin_convertvector(valid ? one : zero, vd);
      }
    }
    for (int l = 0; l < W; ++l) {
      const int64_t n = std::clamp<int64_t>(len[l] - k0, 0, TB);
      const int64_t last = start[l] + len[l] - 1 - k0;
      for (int64_t j = 0; j < n; ++j) {
        adv[last - j] = OA[j][l];
        ret[last - j] = OR[j][l];
      }
    }
  }
  for (int l = 0; l < W; ++l) {
    st.bad |= (std::isnan(bad_r[l]) ? 1 : 0) | (std::isnan(bad_v[l]) ? 2 : 0);
    st.sum += sum[l];
    st.sumsq += sumsq[l];
    st.count += cnt[l];
  }
}

template <typename scalar_t, bool SKIP, bool WHITEN>
RLHF_CPU_V3 void scan_rows_v3(const scalar_t* r, const scalar_t* v, const bool* m, float* adv,
                              float* ret, const Rows& rows, int64_t b0, int64_t nb, float g,
                              float gl, Stats& st) {
  scan_rows<scalar_t, SKIP, WHITEN>(r, v, m, adv, ret, rows, b0, nb, g, gl, st);
}

template <typename scalar_t, bool SKIP, bool WHITEN>
void scan_rows_baseline(const scalar_t* r, const scalar_t* v, const bool* m, float* adv,
                        float* ret, const Rows& rows, int64_t b0, int64_t nb, float g, float gl,
                        Stats& st) {
  scan_rows<scalar_t, SKIP, WHITEN>(r, v, m, adv, ret, rows, b0, nb, g, gl, st);
}

template <typename scalar_t>
using ScanFn = void (*)(const scalar_t*, const scalar_t*, const bool*, float*, float*,
                        const Rows&, int64_t, int64_t, float, float, Stats&);

template <typename scalar_t, bool SKIP, bool WHITEN>
ScanFn<scalar_t> pick_isa() {
  return rlhf_cpu::cpu_has_v3() ? scan_rows_v3<scalar_t, SKIP, WHITEN>
                                : scan_rows_baseline<scalar_t, SKIP, WHITEN>;
}

template <typename scalar_t>
ScanFn<scalar_t> pick_scan(bool skip, bool whiten) {
  if (skip) return whiten ? pick_isa<scalar_t, true, true>() : pick_isa<scalar_t, true, false>();
  return whiten ? pick_isa<scalar_t, false, true>() : pick_isa<scalar_t, false, false>();
}

template <typename scalar_t>
void scan_all(const at::Tensor& rewards, const at::Tensor& values, const bool* m, float* adv,
              float* ret, const Rows& rows, int64_t batch, float g, float gl, bool skip,
              bool whiten, Stats& total) {
  const scalar_t* r = rewards.data_ptr<scalar_t>();
  const scalar_t* v = values.data_ptr<scalar_t>();
  const int64_t groups = (batch + W - 1) / W;
  std::vector<Stats> partial(groups);
  const ScanFn<scalar_t> scan = pick_scan<scalar_t>(skip, whiten);
  at::parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b0 = i * W, nb = std::min<int64_t>(W, batch - b0);
      scan(r, v, m, adv, ret, rows, b0, nb, g, gl, partial[i]);
    }
  });
  for (const Stats& p : partial) {  // fixed order: the result does not depend on thread count
    total.sum += p.sum;
    total.sumsq += p.sumsq;
    total.count += p.count;
    total.bad |= p.bad;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_cpu(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t row_len, double gamma, double lam,
    bool skip, bool whiten) {
  // Shapes, dtypes and devices are checked in Python (rlhf_kernels/ops/gae.py); these guard the
  // raw pointers below against a direct call with the wrong layout.
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous() && mask.is_contiguous(),
              "gae_cpu: inputs must be contiguous");
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "gae_cpu: rewards/values dtype differ");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae_cpu: mask must be bool");
  TORCH_CHECK(rewards.numel() == values.numel() && rewards.numel() == mask.numel(),
              "gae_cpu: rewards, values and mask must have the same number of elements");
  Rows rows{nullptr, row_len};
  int64_t batch;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->is_contiguous(),
                "gae_cpu: cu_seqlens must be contiguous int32");
    rows.cu = cu_seqlens->data_ptr<int32_t>();
    batch = cu_seqlens->numel() - 1;
  } else {
    TORCH_CHECK(row_len > 0 && rewards.numel() % row_len == 0, "gae_cpu: bad row_len");
    batch = rewards.numel() / row_len;
  }
  auto opts = rewards.options().dtype(at::kFloat);
  // One allocation for both outputs: two equal blocks freed together make glibc trim the heap
  // top, and every call then pays page faults on fresh pages (measured: 2x slower at 256x1024).
  at::Tensor out = at::empty({2, rewards.numel()}, opts);
  at::Tensor adv = out[0], ret = out[1];
  const bool* m = mask.data_ptr<bool>();
  float* a = adv.data_ptr<float>();
  Stats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    scan_all<scalar_t>(rewards, values, m, a, ret.data_ptr<float>(), rows, batch,
                       static_cast<float>(gamma), static_cast<float>(gamma * lam), skip, whiten, st);
  });
  if (whiten && !st.bad) {
    float mean, rstd;
    gae_whiten_stats(st.sum, st.sumsq, st.count, &mean, &rstd);
    at::parallel_for(0, adv.numel(), 1 << 14, [&](int64_t lo, int64_t hi) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) a[i] = m[i] ? (a[i] - mean) * rstd : 0.f;
    });
  }
  at::Tensor bad = at::full({1}, st.bad, opts.dtype(at::kInt));
  return {adv, ret, bad};
}
