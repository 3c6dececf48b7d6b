// Fused linear of the atlas_kernels extension (CPU only): y = x W^T + b with
// W = theta0 + sum_i coef[i, part(e)] * tau_i (* scale[i, row]), composed into a per-thread scratch
// buffer of one block (reused by every call: W and its gradient G = dy^T x are never allocated,
// never kept from the forward to the backward, and stay in the cache between the kernel that writes
// them and the GEMM that reads them).
//
// forward (fused_linear): W composed into the scratch W (at::parallel_for over fixed chunks of
//   elements, the slabs decoded in registers, as in atlas_cpu.cpp), rounded to the compute dtype,
//   then y = x W^T (+ b) by one ATen GEMM over all threads.
// backward (fused_linear_backward): G = dy^T x by one ATen GEMM into the scratch G; then one pass
//   over the slabs, chunk by chunk, serves both the recomposition of W (into the scratch W, for
//   dx = dy W by one more GEMM) and the dots <G, tau_i> (each slab element decoded once); each chunk
//   writes its own N x K partial sums (float64), summed in chunk order afterwards: no atomics, and
//   the reduction does not depend on the number of threads (the chunks are fixed by the shape).
//
// Why one block at a time and not tiles of rows (the first design, which never wrote W at all): the
// tile GEMMs were single-threaded and small, and measured 25-40% slower than one GEMM over the
// whole block on the project's CPU; a block's scratch (at most 9.4 MB for ViT-B/32) stays in the
// last-level cache, so writing and reading it costs far less than the tile GEMMs lost. The DRAM
// traffic is the same: per step the slabs are read twice (once per pass) and theta0 twice.
//
// The GEMMs run in float32: a bf16/fp16 compute dtype rounds the composed weight to that dtype (as
// the composed block of compose+F.linear is) and the outputs once at the end. The GEMMs are ATen's
// (torch's BLAS), as in every backend; their rounding may depend on the BLAS's thread count.
// The bias is composed by the caller (atlas_kernels_ext::compose, a small block) and added here;
// its coefficient gradient (from dy summed over rows) is the caller's too.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>
#include <vector>

#include "../atlas_checks.h"
#include "atlas_cpu_vec.h"

namespace atlas_ext {
namespace cpu {
namespace {

// Elements per chunk of the parallel loops: kChunk, or ATLAS_KERNELS_EXT_FUSED_CHUNK (1 to kChunk;
// tests: many chunks, and runs cut by chunk edges, at small shapes).
int64_t chunk_elems() {
  if (const char* env = std::getenv("ATLAS_KERNELS_EXT_FUSED_CHUNK")) {
    const long long c = std::atoll(env);
    if (c >= 1) return std::min<int64_t>(c, kChunk);
  }
  return kChunk;
}

// The calling thread's scratch buffer `which` (0: W, 1: G) of at least numel floats: grown when a
// larger block arrives, otherwise reused (no allocation, no page faults, warm in the cache).
// Poisoned with NaN on every call under ATLAS_KERNELS_EXT_POISON.
float* scratch(int which, int64_t numel) {
  thread_local at::Tensor bufs[2];
  at::Tensor& b = bufs[which];
  if (!b.defined() || b.numel() < numel) b = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  if (poison()) b.fill_(std::numeric_limits<float>::quiet_NaN());
  return b.data_ptr<float>();
}

// One weight block [out, in] with its N slabs.
struct WBlock {
  const void* theta;
  at::ScalarType theta_t;
  const void* tau;
  int64_t n, out, in, P;  // P = out * in (a slab row is tau + i * P)
  const float* coef;      // [n, k]
  const float* scale;     // [n, out] or nullptr
  Seg seg;                // block-local partition (start 0, row_len = in)
  int64_t chunk;          // elements per chunk of the parallel loops
  // the scale of slab i for row `row` of W (1 without scales)
  float scale_of(int64_t i, int64_t row) const { return scale ? scale[i * out + row] : 1.f; }
};

// The per-slab multipliers of a run: c[u] = coef[i0 + u, p] * scale[i0 + u, row], u < g.
inline void run_coefs(const WBlock& w, int64_t i0, int g, int64_t p, int64_t row, float* c) {
  for (int u = 0; u < g; ++u) {
    const int64_t i = i0 + u;
    c[u] = w.coef[i * w.seg.k + p] * w.scale_of(i, row);
  }
}

// acc[0 .. b - a) = theta0[a .. b) + sum_i coef[i, part(e)] * scale[i, row(e)] * tau[i, e]
template <typename T>
void compose_range(const WBlock& w, int64_t a, int64_t b, float* acc) {
  alignas(64) int32_t part[kChunk];
  const Seg& s = w.seg;
  const T* tau = static_cast<const T*>(w.tau);
  for (int64_t c0 = a; c0 < b; c0 += kChunk) {  // chunks of kChunk: the accumulator stays in L1
    const int64_t c1 = std::min(b, c0 + kChunk);
    float* ac = acc + (c0 - a);
    load_f32(w.theta, w.theta_t, c0, c1 - c0, ac);
    if (s.mode == kModeHash) {
      for (int64_t j = 0; j < c1 - c0; ++j) part[j] = static_cast<int32_t>(part_of(c0 + j, s));
      for (int64_t i = 0; i < w.n; ++i) {
        const T* ti = tau + i * w.P;
        for (int64_t r = c0; r < c1;) {
          const int64_t row = r / s.row_len;
          const int64_t e = std::min(c1, (row + 1) * s.row_len);
          const float sc = w.scale_of(i, row);
          axpy_gather<T>(ac + (r - c0), ti + r, e - r, w.coef + i * s.k, part + (r - c0), sc);
          r = e;
        }
      }
    } else {  // slabs in register groups: the accumulator loaded and stored once per group
      for_each_run(w.seg, true, c0, c1, [&](int64_t r, int64_t e, int64_t p, int64_t row) {
        for (int64_t i0 = 0; i0 < w.n; i0 += kGroup) {
          const int g = static_cast<int>(std::min<int64_t>(kGroup, w.n - i0));
          float c[kGroup] = {};
          run_coefs(w, i0, g, p, row, c);
          axpy_slabs<T>(g, ac + (r - c0), tau + i0 * w.P + r, w.P, c, e - r);
        }
      });
    }
  }
}

// Elements [a, b) (block-local, at most one chunk) of the backward pass: wt[0 .. b - a) = W[a .. b)
// (if wt), and partial[i * k + p] += sum over the range's part-p elements of g * scale * tau_i,
// g = G + a.
template <typename T>
void grad_range(const WBlock& w, int64_t a, int64_t b, const float* g, float* wt, double* partial) {
  alignas(64) int32_t part[kChunk];
  alignas(64) float kbuf[64];
  const Seg& s = w.seg;
  const T* tau = static_cast<const T*>(w.tau);
  if (wt) load_f32(w.theta, w.theta_t, a, b - a, wt);
  if (s.mode == kModeHash) {
    std::vector<float> kvec(s.k > 64 ? s.k : 0);
    float* kb = s.k > 64 ? kvec.data() : kbuf;
    for (int64_t j = 0; j < b - a; ++j) part[j] = static_cast<int32_t>(part_of(a + j, s));
    for (int64_t r = a; r < b;) {  // runs of one row (one scale per slab)
      const int64_t row = r / s.row_len;
      const int64_t e = std::min(b, (row + 1) * s.row_len);
      for (int64_t i = 0; i < w.n; ++i) {
        const T* t = tau + i * w.P + r;
        const float sc = w.scale_of(i, row);
        if (wt) axpy_gather<T>(wt + (r - a), t, e - r, w.coef + i * s.k, part + (r - a), sc);
        std::fill(kb, kb + s.k, 0.f);
        dot_scatter<T>(g + (r - a), t, e - r, part + (r - a), 1.f, kb);
        for (int64_t p = 0; p < s.k; ++p) partial[i * s.k + p] += static_cast<double>(kb[p]) * sc;
      }
      r = e;
    }
    return;
  }
  // per run, a group of slabs at once: each element decoded once for W and for the dot
  for_each_run(w.seg, true, a, b, [&](int64_t r, int64_t e, int64_t p, int64_t row) {
    for (int64_t i0 = 0; i0 < w.n; i0 += kGroup) {
      const int gs = static_cast<int>(std::min<int64_t>(kGroup, w.n - i0));
      float c[kGroup] = {}, d[kGroup];
      const T* t = tau + i0 * w.P + r;
      if (wt) {
        run_coefs(w, i0, gs, p, row, c);
        axpy_dot_slabs<T>(gs, wt + (r - a), g + (r - a), t, w.P, c, e - r, d);
      } else {
        dot_slabs<T>(gs, g + (r - a), t, w.P, e - r, d);
      }
      for (int u = 0; u < gs; ++u) {
        const int64_t i = i0 + u;
        partial[i * s.k + p] += static_cast<double>(d[u]) * w.scale_of(i, row);
      }
    }
  });
}

void check_fused(const char* op, const at::Tensor& x, const char* xname, int64_t xcols, const at::Tensor& w0,
                 const at::Tensor& tau, const at::Tensor& coef, const c10::optional<at::Tensor>& scale,
                 int64_t mode) {
  TORCH_CHECK(w0.dim() == 2, op, ": w0 must be a 2-D weight [out, in], got ", w0.sizes());
  TORCH_CHECK(x.device().is_cpu() && w0.device().is_cpu(), op, ": the fused linear has CPU kernels only, got ",
              xname, " on ", x.device(), " and w0 on ", w0.device());
  TORCH_CHECK(is_compute_dtype(x.scalar_type()), op, ": ", xname, " must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == xcols, op, ": ", xname, " must be [M, ", xcols, "], got ", x.sizes());
  const int64_t k = coef.dim() == 2 ? coef.size(1) : 1;
  check_block(op, w0, "w0", tau, scale, mode, k);
  check_coef(op, coef, tau.size(0), w0);
}

WBlock make_block(const at::Tensor& w0, const at::Tensor& tau, const at::Tensor& coef,
                  const c10::optional<at::Tensor>& scale, int64_t mode, int64_t key) {
  WBlock w;
  w.theta = w0.data_ptr();
  w.theta_t = w0.scalar_type();
  w.tau = tau.data_ptr();
  w.n = tau.size(0);
  w.out = w0.size(0);
  w.in = w0.size(1);
  w.P = w0.numel();
  w.coef = coef.data_ptr<float>();
  w.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  w.seg = block_seg(w0, coef.size(1), mode, key);
  w.chunk = chunk_elems();
  return w;
}

at::Tensor fused_linear_cpu(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& tau, const at::Tensor& coef,
                            const c10::optional<at::Tensor>& scale, int64_t mode, int64_t key,
                            const c10::optional<at::Tensor>& bias) {
  check_fused("fused_linear", x, "x", w0.dim() == 2 ? w0.size(1) : -1, w0, tau, coef, scale, mode);
  const int64_t m = x.size(0), out = w0.size(0), in = w0.size(1);
  if (bias.has_value())
    TORCH_CHECK(bias->numel() == out && bias->device().is_cpu() && is_compute_dtype(bias->scalar_type()),
                "fused_linear: bias must be a CPU float32/bfloat16/float16 [", out, "], got ", bias->scalar_type(),
                " ", bias->sizes(), " on ", bias->device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType dt = x.scalar_type();
  auto th = w0.contiguous();
  auto tc = tau.contiguous();
  auto cc = coef.contiguous();
  auto sc = scale.has_value() ? c10::optional<at::Tensor>(scale->contiguous()) : c10::nullopt;
  auto x32 = x.to(at::kFloat).contiguous();
  c10::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous().reshape({out});
  at::Tensor y32;
  if (m == 0 || out == 0 || in == 0) {
    y32 = at::zeros({m, out}, x.options().dtype(at::kFloat));
    if (b32.has_value()) y32.add_(b32->reshape({1, out}));
    return y32.to(dt);
  }
  const WBlock w = make_block(th, tc, cc, sc, mode, key);
  const int64_t P = out * in;
  float* wbuf = scratch(0, P);
  dispatch_storage(tc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, (P + w.chunk - 1) / w.chunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t a = c * w.chunk, b = std::min(P, a + w.chunk);
        compose_range<T>(w, a, b, wbuf + a);
        round_to(wbuf + a, b - a, dt);
      }
    });
  });
  auto wv = at::from_blob(wbuf, {out, in}, x32.options());
  y32 = b32.has_value() ? at::addmm(b32->reshape({1, out}), x32, wv.t()) : at::mm(x32, wv.t());
  return dt == at::kFloat ? y32 : y32.to(dt);
}

std::tuple<at::Tensor, at::Tensor> fused_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& w0, const at::Tensor& tau,
                                                             const at::Tensor& coef,
                                                             const c10::optional<at::Tensor>& scale, int64_t mode,
                                                             int64_t key, bool need_dx) {
  check_fused("fused_linear_backward", x, "x", w0.dim() == 2 ? w0.size(1) : -1, w0, tau, coef, scale, mode);
  check_fused("fused_linear_backward", grad_out, "grad_out", w0.size(0), w0, tau, coef, scale, mode);
  TORCH_CHECK(grad_out.size(0) == x.size(0), "fused_linear_backward: grad_out has ", grad_out.size(0),
              " rows but x has ", x.size(0));
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t m = x.size(0), out = w0.size(0), in = w0.size(1), n = tau.size(0), k = coef.size(1);
  const at::ScalarType dt = x.scalar_type();
  auto th = w0.contiguous();
  auto tc = tau.contiguous();
  auto cc = coef.contiguous();
  auto sc = scale.has_value() ? c10::optional<at::Tensor>(scale->contiguous()) : c10::nullopt;
  auto dcoef = new_output({n, k}, x.options().dtype(at::kFloat));
  if (m == 0 || out == 0 || in == 0 || n == 0) {
    dcoef.zero_();
    auto dx = need_dx ? at::zeros({m, in}, x.options()) : at::empty({0}, x.options());
    return {dx, dcoef};
  }
  auto x32 = x.to(at::kFloat).contiguous();
  auto dy32 = grad_out.to(at::kFloat).contiguous();
  const WBlock w = make_block(th, tc, cc, sc, mode, key);
  const int64_t P = out * in, nchunks = (P + w.chunk - 1) / w.chunk;
  float* gbuf = scratch(1, P);
  float* wbuf = need_dx ? scratch(0, P) : nullptr;
  auto f32 = x32.options();
  auto gv = at::from_blob(gbuf, {out, in}, f32);
  at::mm_out(gv, dy32.t(), x32);  // G = dy^T x
  std::vector<double> partial(static_cast<size_t>(nchunks * n * k), poison() ? NAN : 0.0);
  dispatch_storage(tc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t a = c * w.chunk, b = std::min(P, a + w.chunk);
        double* pt = partial.data() + c * n * k;
        std::fill(pt, pt + n * k, 0.0);
        grad_range<T>(w, a, b, gbuf + a, wbuf ? wbuf + a : nullptr, pt);
        if (wbuf) round_to(wbuf + a, b - a, dt);
      }
    });
  });
  sum_in_order(partial.data(), nchunks, n * k, dcoef.data_ptr<float>());  // chunks in chunk order
  if (!need_dx) return {at::empty({0}, x.options()), dcoef};
  auto dx32 = at::mm(dy32, at::from_blob(wbuf, {out, in}, f32));  // dx = dy W
  return {dt == at::kFloat ? dx32 : dx32.to(dt), dcoef};
}

}  // namespace
}  // namespace cpu
}  // namespace atlas_ext

TORCH_LIBRARY_IMPL(atlas_kernels_ext, CPU, m) {
  m.impl("fused_linear", &atlas_ext::cpu::fused_linear_cpu);
  m.impl("fused_linear_backward", &atlas_ext::cpu::fused_linear_backward_cpu);
}
