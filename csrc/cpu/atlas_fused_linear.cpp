// Tile-fused linear of the atlas_kernels extension (CPU only): y = x W^T + b with
// W = theta0 + sum_i coef[i, part(e)] * tau_i (* scale[i, row]), never writing W or its gradient
// G = dy^T x to memory.
//
// forward (fused_linear): parallel over fixed tiles of rows of W. A tile's rows are a contiguous
//   element range: composed into a thread-local fp32 buffer (the slabs decoded in registers, as in
//   atlas_cpu.cpp), then y[:, rows] = x W_rows^T (+ b[rows]) by one single-threaded GEMM (ATen ops
//   inside at::parallel_for run on the calling thread) into the column slice of y.
// backward (fused_linear_backward): parallel over fixed tiles of columns of W (so dx[:, cols] needs
//   no reduction across threads); inside a column tile, blocks of rows. Per block: the G block
//   dy[:, rows]^T x[:, cols] into a thread-local buffer; then every slab's block is decoded once,
//   serving the recomposition W[rows, cols] += coef * tau_i and the dot <G, tau_i> (axpy_dot);
//   then dx[:, cols] += dy[:, rows] W[rows, cols]. Each block writes its own N x K partial sums
//   (float64), summed in block order afterwards: no atomics, and the result does not depend on the
//   number of threads (the tiles are fixed functions of the shape).
//
// Per step the slabs are read twice (once per pass), theta0 twice, and neither W nor G is written.
// The GEMMs run in float32: a bf16/fp16 compute dtype rounds the composed weight tile to that
// dtype (as the composed block of compose+F.linear is) and the outputs once at the end.
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

// MKL (torch's CPU BLAS on x86-64) runs each GEMM on all of its threads even when called from an
// at::parallel_for worker: with two threads per tile call on two cores, every small GEMM waits at
// barriers (measured: 6x slower than one thread). The per-thread setting below makes the tile GEMMs
// single-threaded. A weak symbol: torch builds without MKL leave it null (their BLAS is called
// the same way; the ATen ops' own parallelism already runs serially inside a parallel region).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the C entry (mkl_service.h)
// The BLAS sgemm torch links (Fortran interface, 32-bit integers), called directly: a tile GEMM
// through ATen costs about ten dispatched ops (views, checks, resize), some 29,000 per ViT-B/32
// step. Weak: where it is absent the tiles go through at::mm_out / addmm_ instead (as they do with
// ATLAS_KERNELS_EXT_ATEN_GEMM=1: tests run that path too).
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace atlas_ext {
namespace cpu {
namespace {

// Row-major C[m, n] = op(A) op(B) + beta * C, op(X) = X or X^T (X stored row-major with leading
// dimension ld); by sgemm_ when available (column-major: C^T = op(B)^T op(A)^T), else through ATen
// on views of the same memory. beta is 0 or 1; with 0, C is not read.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc) {
  const bool aten_gemm = std::getenv("ATLAS_KERNELS_EXT_ATEN_GEMM") != nullptr;
  if (sgemm_ && !aten_gemm && std::max({m, n, k, lda, ldb, ldc}) < (int64_t(1) << 31)) {
    const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
    const float one = 1.f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &ni, &mi, &ki, &one, b, &lb, a, &la, &beta, c, &lc);
    return;
  }
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto av = ta ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, f32).t()
               : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, f32);
  auto bv = tb ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, f32).t()
               : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, f32);
  auto cv = at::from_blob(c, {m, n}, {ldc, 1}, f32);
  if (beta == 0.f) {
    at::mm_out(cv, av, bv);
  } else {
    cv.addmm_(av, bv);
  }
}

// For the lifetime of a worker's loop: MKL runs single-threaded on this thread.
struct SerialBlas {
  int prev = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

// Tile sizes: fixed functions of the shape, never of the thread count (determinism). Targets: a
// forward tile of about fwd_elems weights (768 KiB of fp32, in L2 for its GEMM); a backward block
// of bwd_rows x bwd_cols (384 KiB of fp32 for W and for G). Measured on the project's CPU (one
// thread, ViT-B/32 shapes, M = 400): G blocks 128 columns wide cost 40% more than one whole GEMM,
// 256-384 wide within 5-15%. Tile counts are rounded up to even numbers, so that two threads get
// equal shares (768 columns: two tiles of 384, not three of 256).
struct TileSizes {
  int64_t fwd_elems = 196608, bwd_cols = 384, bwd_rows = 256;
};

// [0, total) in about total / target pieces, an even number of them when more than one: the size of
// each piece (the last may be shorter).
int64_t even_split(int64_t total, int64_t target) {
  int64_t pieces = (total + target - 1) / target;
  if (pieces > 1 && pieces % 2) ++pieces;
  pieces = std::min(pieces, total);
  return (total + pieces - 1) / pieces;
}

// ATLAS_KERNELS_EXT_FUSED_TILES="fwd_elems,bwd_cols,bwd_rows" overrides them (tests: many odd tiles
// at small shapes).
TileSizes tile_sizes() {
  TileSizes t;
  if (const char* env = std::getenv("ATLAS_KERNELS_EXT_FUSED_TILES")) {
    long long a = 0, b = 0, c = 0;
    if (std::sscanf(env, "%lld,%lld,%lld", &a, &b, &c) == 3 && a >= 1 && b >= 1 && c >= 1) {
      t.fwd_elems = a;
      t.bwd_cols = b;
      t.bwd_rows = c;
    }
  }
  return t;
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
};

// acc[0 .. b - a) = theta0[a .. b) + sum_i coef[i, part(e)] * scale[i, row(e)] * tau[i, e]
template <typename T>
void compose_range(const WBlock& w, int64_t a, int64_t b, float* acc) {
  alignas(64) int32_t part[kChunk];
  const Seg& s = w.seg;
  const bool hash = s.mode == kModeHash;
  load_f32(w.theta, w.theta_t, a, b - a, acc);
  for (int64_t c0 = a; c0 < b; c0 += kChunk) {  // chunks of kChunk: the accumulator stays in L1
    const int64_t c1 = std::min(b, c0 + kChunk);
    if (hash)
      for (int64_t j = 0; j < c1 - c0; ++j) part[j] = static_cast<int32_t>(part_of(c0 + j, s));
    for (int64_t i = 0; i < w.n; ++i) {
      const T* ti = static_cast<const T*>(w.tau) + i * w.P;
      const float* ci = w.coef + i * s.k;
      for (int64_t r = c0; r < c1;) {
        const int64_t row = r / s.row_len;
        int64_t e = std::min(c1, (row + 1) * s.row_len);
        const float sc = w.scale ? w.scale[i * w.out + row] : 1.f;
        if (hash) {
          axpy_gather<T>(acc + (r - a), ti + r, e - r, ci, part + (r - c0), sc);
        } else {
          e = std::min(e, part_end(r, s));
          axpy<T>(acc + (r - a), ti + r, e - r, ci[part_of(r, s)] * sc);
        }
        r = e;
      }
    }
  }
}

// Block rows [r0, r1) x columns [c0, c1): wt = W block (if wt), and
// partial[i * k + p] += sum over the block's part-p elements of g * scale * tau_i. g, wt: [r1 - r0, c1 - c0].
template <typename T>
void grad_block(const WBlock& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, const float* g, float* wt,
                double* partial, float* kbuf, int32_t* part) {
  const Seg& s = w.seg;
  const int64_t ct = c1 - c0;
  const bool hash = s.mode == kModeHash;
  for (int64_t o = r0; o < r1; ++o) {
    const int64_t a = o * w.in + c0;  // block-local first element of this row segment
    const float* gr = g + (o - r0) * ct;
    float* wr = wt ? wt + (o - r0) * ct : nullptr;
    if (wr) load_f32(w.theta, w.theta_t, a, ct, wr);
    if (hash)
      for (int64_t j = 0; j < ct; ++j) part[j] = static_cast<int32_t>(part_of(a + j, s));
    for (int64_t i = 0; i < w.n; ++i) {
      const T* t = static_cast<const T*>(w.tau) + i * w.P + a;
#if ATLAS_AVX2
      if (o + 4 < r1)  // the same segment four rows down: strided rows defeat the streaming prefetcher
        for (int64_t j = 0; j < ct * static_cast<int64_t>(sizeof(T)); j += 64)
          _mm_prefetch(reinterpret_cast<const char*>(t + 4 * w.in) + j, _MM_HINT_T0);
#endif
      const float sc = w.scale ? w.scale[i * w.out + o] : 1.f;
      const float* ci = w.coef + i * s.k;
      double* pi = partial + i * s.k;
      if (hash) {
        if (wr) axpy_gather<T>(wr, t, ct, ci, part, sc);
        std::fill(kbuf, kbuf + s.k, 0.f);
        dot_scatter<T>(gr, t, ct, part, 1.f, kbuf);
        for (int64_t p = 0; p < s.k; ++p) pi[p] += static_cast<double>(kbuf[p]) * sc;
      } else {
        for (int64_t r = a; r < a + ct;) {
          const int64_t e = std::min(a + ct, part_end(r, s));
          const int64_t p = part_of(r, s);
          const float d = wr ? axpy_dot<T>(wr + (r - a), gr + (r - a), t + (r - a), e - r, ci[p] * sc)
                             : dot<T>(gr + (r - a), t + (r - a), e - r);
          pi[p] += static_cast<double>(d) * sc;
          r = e;
        }
      }
    }
  }
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
  const at::ScalarType dt = x.scalar_type();
  auto th = w0.contiguous();
  auto tc = tau.contiguous();
  auto cc = coef.contiguous();
  auto sc = scale.has_value() ? c10::optional<at::Tensor>(scale->contiguous()) : c10::nullopt;
  auto x32 = x.to(at::kFloat).contiguous();
  auto y32 = new_output({m, out}, x.options().dtype(at::kFloat));
  if (m == 0 || out == 0) return y32.to(dt);
  if (in == 0) {
    y32.zero_();
    if (bias.has_value()) y32.add_(bias->to(at::kFloat).reshape({1, out}));
    return y32.to(dt);
  }
  c10::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous().reshape({out});
  const float* bias_p = b32.has_value() ? b32->data_ptr<float>() : nullptr;
  const WBlock w = make_block(th, tc, cc, sc, mode, key);
  const int64_t rt = even_split(out, std::max<int64_t>(1, tile_sizes().fwd_elems / in));
  const int64_t ntiles = (out + rt - 1) / rt;
  dispatch_storage(tc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      SerialBlas serial_blas;
      // thread-local buffers are tensors: 64-byte aligned, so the BLAS takes the same path every run
      auto buf_t = at::empty({rt * in}, x32.options());
      float* buf = buf_t.data_ptr<float>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * rt, rows = std::min(out, r0 + rt) - r0;
        compose_range<T>(w, r0 * in, (r0 + rows) * in, buf);
        round_to(buf, rows * in, dt);
        float* yv = y32.data_ptr<float>() + r0;  // y[:, r0 : r0 + rows], leading dimension out
        if (bias_p)
          for (int64_t i = 0; i < m; ++i) std::memcpy(yv + i * out, bias_p + r0, rows * sizeof(float));
        gemm_rm(false, true, m, rows, in, x32.data_ptr<float>(), in, buf, in, bias_p ? 1.f : 0.f, yv, out);
      }
    });
  });
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
  const int64_t m = x.size(0), out = w0.size(0), in = w0.size(1), n = tau.size(0), k = coef.size(1);
  auto th = w0.contiguous();
  auto tc = tau.contiguous();
  auto cc = coef.contiguous();
  auto sc = scale.has_value() ? c10::optional<at::Tensor>(scale->contiguous()) : c10::nullopt;
  auto x32 = x.to(at::kFloat).contiguous();
  auto dy32 = grad_out.to(at::kFloat).contiguous();
  auto dx32 = need_dx ? new_output({m, in}, x.options().dtype(at::kFloat)) : at::empty({0}, x.options());
  auto dcoef = new_output({n, k}, x.options().dtype(at::kFloat));
  if (m == 0 || out == 0 || in == 0 || n == 0) {
    dcoef.zero_();
    if (need_dx) dx32.zero_();
    return {need_dx ? dx32.to(x.scalar_type()) : dx32, dcoef};
  }
  const WBlock w = make_block(th, tc, cc, sc, mode, key);
  const TileSizes ts = tile_sizes();
  const int64_t ct = even_split(in, ts.bwd_cols), rt = std::min(out, ts.bwd_rows);
  const int64_t ncol = (in + ct - 1) / ct, nrow = (out + rt - 1) / rt;
  std::vector<double> partial(static_cast<size_t>(ncol * nrow * n * k), poison() ? NAN : 0.0);
  const at::ScalarType dt = x.scalar_type();
  dispatch_storage(tc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, ncol, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      SerialBlas serial_blas;
      auto gbuf_t = new_output({rt * ct}, x32.options()), wbuf_t = new_output({need_dx ? rt * ct : 0}, x32.options());
      float* gbuf = gbuf_t.data_ptr<float>();
      float* wbuf = wbuf_t.data_ptr<float>();
      std::vector<float> kbuf(static_cast<size_t>(k));
      std::vector<int32_t> part(static_cast<size_t>(ct));
      for (int64_t ci = t0; ci < t1; ++ci) {
        const int64_t c0 = ci * ct, cols = std::min(in, c0 + ct) - c0;
        for (int64_t rb = 0; rb < nrow; ++rb) {
          const int64_t r0 = rb * rt, rows = std::min(out, r0 + rt) - r0;
          const float* dyv = dy32.data_ptr<float>() + r0;  // dy[:, r0 : r0 + rows], leading dimension out
          // G block [rows, cols] = dy[:, rows]^T x[:, cols]
          gemm_rm(true, false, rows, cols, m, dyv, out, x32.data_ptr<float>() + c0, in, 0.f, gbuf, cols);
          double* pt = partial.data() + (ci * nrow + rb) * n * k;
          std::fill(pt, pt + n * k, 0.0);
          grad_block<T>(w, r0, r0 + rows, c0, c0 + cols, gbuf, need_dx ? wbuf : nullptr, pt,
                        kbuf.data(), part.data());
          if (need_dx) {
            round_to(wbuf, rows * cols, dt);
            // dx[:, cols] (+)= dy[:, rows] W[rows, cols]
            gemm_rm(false, false, m, cols, rows, dyv, out, wbuf, cols, rb == 0 ? 0.f : 1.f,
                    dx32.data_ptr<float>() + c0, in);
          }
        }
      }
    });
  });
  float* o = dcoef.data_ptr<float>();
  const int64_t nb = ncol * nrow;
  for (int64_t c = 0; c < n * k; ++c) {  // blocks summed in block order
    double acc = 0.0;
    for (int64_t b = 0; b < nb; ++b) acc += partial[b * n * k + c];
    o[c] = static_cast<float>(acc);
  }
  return {need_dx ? (dt == at::kFloat ? dx32 : dx32.to(dt)) : dx32, dcoef};
}

}  // namespace
}  // namespace cpu
}  // namespace atlas_ext

TORCH_LIBRARY_IMPL(atlas_kernels_ext, CPU, m) {
  m.impl("fused_linear", &atlas_ext::cpu::fused_linear_cpu);
  m.impl("fused_linear_backward", &atlas_ext::cpu::fused_linear_backward_cpu);
}
