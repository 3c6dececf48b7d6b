// CPU kernels of the atlas_kernels extension.
//
// Work is cut into fixed tiles of kChunk elements, independent of the thread count, and spread over
// threads with at::parallel_for.
// Inside a tile, an fp32 accumulator of the tile (kChunk floats: L1-resident) is updated by groups
// of four task vectors at a time (axpy_slabs / dot_slabs: the accumulator stays in registers across
// a group; hash partitions one slab at a time): the N slabs are each read once. Compact storage (bf16, fp16, int8, fp8 e4m3) is
// decoded 8 elements at a time in AVX2 registers (Dec<T>::eight) and fused into the multiply-add;
// no widened copy of a slab is ever made. Without AVX2 (another architecture, or
// ATLAS_KERNELS_EXT_NO_AVX2=1 at build time) the same loops run with the scalar decoders.
//
// Coefficient gradients: every tile writes its N x K partial sums (8-lane fp32 accumulators, summed
// in a fixed order), then the tiles are summed in tile order in float64: the result does not
// depend on the number of threads, and no atomics are used.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../atlas_checks.h"
#include "atlas_cpu_vec.h"

namespace atlas_ext {
namespace cpu {
namespace {

// What one launch shares: the flat buffers and their strides (a slab row is tau + i * P).
struct Bufs {
  const void* theta;  // theta0 / grad (flat)
  at::ScalarType theta_t;
  const void* tau;
  int64_t P;  // elements per slab row
  const float* coef;
  int64_t coef_stride;
  const float* scale;  // nullptr: no scale
  int64_t scale_stride;
  int64_t n;
  void* out;
  at::ScalarType out_t;
};

// The start of a tile [a, b) of block `s`: the first buffer (theta0, or the gradient) read as fp32
// into buf, the hash part of every element into part (hash layouts only), and the block's slab.
template <typename T>
inline const T* begin_tile(const Bufs& q, const Seg& s, int64_t a, int64_t len, float* buf, int32_t* part) {
  load_f32(q.theta, q.theta_t, s.start + a, len, buf);
  if (s.mode == kModeHash)
    for (int64_t j = 0; j < len; ++j) part[j] = static_cast<int32_t>(part_of(a + j, s));
  return static_cast<const T*>(q.tau) + s.start;
}

// Scaled storage: the scale of slab i for row `row` of the tile's block (1 without scales).
inline float slab_scale(const Bufs& q, const Seg& s, int64_t i, int64_t row) {
  return q.scale ? q.scale[i * q.scale_stride + s.row_off + row] : 1.f;
}

// Elements [a, b) (block-local, b - a <= kChunk) of block `s`: out = theta0 + sum_i coef * tau.
template <typename T>
void compose_tile(const Bufs& q, const Seg& s, int64_t a, int64_t b) {
  alignas(64) float acc[kChunk];
  alignas(64) int32_t part[kChunk];
  const int64_t len = b - a;
  const T* tau = begin_tile<T>(q, s, a, len, acc, part);
  if (s.mode == kModeHash) {
    for (int64_t i = 0; i < q.n; ++i) {
      const T* ti = tau + i * q.P;
      const float* ci = q.coef + i * q.coef_stride + s.col;
      for (int64_t r = a; r < b;) {
        int64_t e = b;
        if (q.scale) e = std::min(e, (r / s.row_len + 1) * s.row_len);
        axpy_gather<T>(acc + (r - a), ti + r, e - r, ci, part + (r - a), slab_scale(q, s, i, q.scale ? r / s.row_len : 0));
        r = e;
      }
    }
  } else {  // slabs in register groups (axpy_slabs): acc is loaded and stored once per group
    for_each_run(s, q.scale != nullptr, a, b, [&](int64_t r, int64_t e, int64_t p, int64_t row) {
      for (int64_t i0 = 0; i0 < q.n; i0 += kGroup) {
        const int g = static_cast<int>(std::min<int64_t>(kGroup, q.n - i0));
        float c[kGroup] = {};
        for (int u = 0; u < g; ++u) c[u] = q.coef[(i0 + u) * q.coef_stride + s.col + p] * slab_scale(q, s, i0 + u, row);
        axpy_slabs<T>(g, acc + (r - a), tau + i0 * q.P + r, q.P, c, e - r);
      }
    });
  }
  store_f32(acc, len, q.out, q.out_t, s.start + a);
}

// Elements [a, b) of block `s`: partial[i * kstride + p] = sum over the part-p elements of grad * tau_i.
template <typename T>
void grad_tile(const Bufs& q, const Seg& s, int64_t a, int64_t b, float* partial, int64_t kstride) {
  alignas(64) float g[kChunk];
  alignas(64) int32_t part[kChunk];
  const int64_t len = b - a;
  const T* tau = begin_tile<T>(q, s, a, len, g, part);
  std::fill(partial, partial + q.n * kstride, 0.f);
  if (s.mode == kModeHash) {
    for (int64_t i = 0; i < q.n; ++i) {
      const T* ti = tau + i * q.P;
      float* pi = partial + i * kstride;
      for (int64_t r = a; r < b;) {
        int64_t e = b;
        if (q.scale) e = std::min(e, (r / s.row_len + 1) * s.row_len);
        dot_scatter<T>(g + (r - a), ti + r, e - r, part + (r - a), slab_scale(q, s, i, q.scale ? r / s.row_len : 0), pi);
        r = e;
      }
    }
  } else {  // per run, the dots of a group of slabs at once (dot_slabs); per slab the runs in order
    for_each_run(s, q.scale != nullptr, a, b, [&](int64_t r, int64_t e, int64_t p, int64_t row) {
      for (int64_t i0 = 0; i0 < q.n; i0 += kGroup) {
        const int gs = static_cast<int>(std::min<int64_t>(kGroup, q.n - i0));
        float d[kGroup];
        dot_slabs<T>(gs, g + (r - a), tau + i0 * q.P + r, q.P, e - r, d);
        for (int u = 0; u < gs; ++u) partial[(i0 + u) * kstride + p] += d[u] * slab_scale(q, s, i0 + u, row);
      }
    });
  }
}

// Tiles of a launch: one block cut into tiles of kChunk elements.
struct Tiles {
  std::vector<Seg> segs;
  std::vector<int64_t> tile0;  // first tile of each segment
  std::vector<int32_t> seg_of_tile;
  int64_t block;
  void add(const Seg& s) {
    tile0.push_back(static_cast<int64_t>(seg_of_tile.size()));
    const int64_t nt = (s.numel + block - 1) / block;
    for (int64_t t = 0; t < nt; ++t) seg_of_tile.push_back(static_cast<int32_t>(segs.size()));
    segs.push_back(s);
  }
  int64_t size() const { return static_cast<int64_t>(seg_of_tile.size()); }
  // block-local element range of tile t
  std::pair<int64_t, int64_t> range(int64_t t) const {
    const Seg& s = segs[seg_of_tile[t]];
    const int64_t a = (t - tile0[seg_of_tile[t]]) * block;
    return {a, std::min(a + block, s.numel)};
  }
};

void run_compose(const Bufs& q, at::ScalarType tau_t, const Tiles& tl) {
  dispatch_storage(tau_t, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, tl.size(), 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        auto ab = tl.range(t);
        compose_tile<T>(q, tl.segs[tl.seg_of_tile[t]], ab.first, ab.second);
      }
    });
  });
}

// partial [tiles, n, kstride]; tile t of segment s fills its first s.k columns.
void run_grad(const Bufs& q, at::ScalarType tau_t, const Tiles& tl, float* partial, int64_t kstride) {
  dispatch_storage(tau_t, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, tl.size(), 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        auto ab = tl.range(t);
        grad_tile<T>(q, tl.segs[tl.seg_of_tile[t]], ab.first, ab.second, partial + t * q.n * kstride, kstride);
      }
    });
  });
}

Bufs make_bufs(const at::Tensor& theta, const at::Tensor& tau, const float* coef, int64_t coef_stride,
               const c10::optional<at::Tensor>& scale, int64_t scale_stride) {
  Bufs q;
  q.theta = theta.data_ptr();
  q.theta_t = theta.scalar_type();
  q.tau = tau.data_ptr();
  q.n = tau.size(0);
  q.P = theta.numel();
  q.coef = coef;
  q.coef_stride = coef_stride;
  q.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  q.scale_stride = scale_stride;
  q.out = nullptr;
  q.out_t = at::kFloat;
  return q;
}

c10::optional<at::Tensor> contig(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->contiguous();
}

at::Tensor compose_cpu(const at::Tensor& theta0, const at::Tensor& tau, const at::Tensor& coef,
                       const c10::optional<at::Tensor>& scale, int64_t mode, int64_t key, at::ScalarType out_dtype) {
  const int64_t k = coef.dim() == 2 ? coef.size(1) : 1;
  check_block("compose", theta0, "theta0", tau, scale, mode, k);
  check_coef("compose", coef, tau.size(0), theta0);
  TORCH_CHECK(is_compute_dtype(out_dtype), "compose: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  auto th = theta0.contiguous();
  auto tc = tau.contiguous();
  auto cc = coef.contiguous();
  auto sc = contig(scale);
  auto out = new_output(theta0.sizes(), theta0.options().dtype(out_dtype));
  if (theta0.numel() == 0) return out;
  Bufs q = make_bufs(th, tc, cc.data_ptr<float>(), k, sc, scale_rows(theta0.sizes()));
  q.out = out.data_ptr();
  q.out_t = out_dtype;
  Tiles tl;
  tl.block = kChunk;
  tl.add(block_seg(theta0, k, mode, key));
  run_compose(q, tau.scalar_type(), tl);
  return out;
}

at::Tensor coef_grad_cpu(const at::Tensor& grad, const at::Tensor& tau, const c10::optional<at::Tensor>& scale,
                         int64_t k, int64_t mode, int64_t key) {
  check_block("coef_grad", grad, "grad", tau, scale, mode, k);
  const int64_t n = tau.size(0);
  auto gc = grad.contiguous();
  auto tc = tau.contiguous();
  auto sc = contig(scale);
  if (grad.numel() == 0 || n == 0) return at::zeros({n, k}, grad.options().dtype(at::kFloat));
  auto out = new_output({n, k}, grad.options().dtype(at::kFloat));
  Bufs q = make_bufs(gc, tc, nullptr, 0, sc, scale_rows(grad.sizes()));
  Tiles tl;
  tl.block = kChunk;
  tl.add(block_seg(grad, k, mode, key));
  std::vector<float> partial(static_cast<size_t>(tl.size() * n * k), poison() ? NAN : 0.f);
  run_grad(q, tau.scalar_type(), tl, partial.data(), k);
  sum_in_order(partial.data(), tl.size(), n * k, out.data_ptr<float>());  // tiles in tile order
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace atlas_ext

TORCH_LIBRARY_IMPL(atlas_kernels_ext, CPU, m) {
  m.impl("compose", &atlas_ext::cpu::compose_cpu);
  m.impl("coef_grad", &atlas_ext::cpu::coef_grad_cpu);
}
