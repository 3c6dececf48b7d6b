// CUDA kernels of the atlas_kernels extension (built for sm_80 and sm_90).
//
// compose: each thread owns VEC = 16 / sizeof(storage) consecutive elements and reads them from
// every slab row with one 16-byte load (uint4) when the slab rows are 16-byte aligned (scalar
// loads otherwise, and at tails), decodes in registers, and accumulates in fp32.
// coef_grad: each CUDA block reduces a fixed tile of elements to N x K partial sums (a warp
// butterfly with __shfl_xor_sync, then the warps in index order through shared memory); a second
// kernel sums the tiles in tile order. Fixed order everywhere, no atomics: bitwise reproducible.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../atlas_checks.h"

namespace atlas_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIters = 4;  // single-block tiles: kThreads * VEC * kIters elements

struct Bufs {
  const void* theta;  // theta0 / grad (flat)
  int theta_t;        // 0 fp32, 1 bf16, 2 fp16
  const void* tau;
  int64_t P;
  const float* coef;
  int64_t coef_stride;
  const float* scale;
  int64_t scale_stride;
  int64_t n;
  void* out;
  int out_t;
};

int code_of(at::ScalarType t) { return t == at::kFloat ? 0 : (t == at::kBFloat16 ? 1 : 2); }

__device__ __forceinline__ float load_c(const void* p, int t, int64_t i) {
  if (t == 0) return static_cast<const float*>(p)[i];
  if (t == 1) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
}

__device__ __forceinline__ void store_c(void* p, int t, int64_t i, float v) {
  if (t == 0) static_cast<float*>(p)[i] = v;
  else if (t == 1) static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v);
  else static_cast<c10::Half*>(p)[i] = c10::Half(v);
}

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }

template <typename T, int VEC>
union Pack {
  uint4 u;
  T v[VEC];
};

// VEC slab elements from ti: one 16-byte load where aligned and whole, else element by element
// (the missing tail repeats ti[0]; callers use only the first cnt).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ti, int cnt, bool vec_ok) {
  Pack<T, VEC> pk;
  if (vec_ok && cnt == VEC) {
    pk.u = *reinterpret_cast<const uint4*>(ti);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) pk.v[j] = ti[j < cnt ? j : 0];
  }
  return pk;
}

// Elements [a, b) of the block: this CUDA block's tile.
__device__ __forceinline__ void tile_range(const Seg& s, int64_t tile_elems, int64_t& a, int64_t& b) {
  a = static_cast<int64_t>(blockIdx.x) * tile_elems;
  b = min(a + tile_elems, s.numel);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) compose_kernel(Bufs q, Seg s, int64_t tile_elems, bool rows_aligned) {
  constexpr int VEC = 16 / sizeof(T);
  int64_t a, b;
  tile_range(s, tile_elems, a, b);
  const bool vec_ok = rows_aligned && ((s.start * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  const T* tau = static_cast<const T*>(q.tau) + s.start;
  for (int64_t e0 = a + static_cast<int64_t>(threadIdx.x) * VEC; e0 < b; e0 += static_cast<int64_t>(blockDim.x) * VEC) {
    const int cnt = static_cast<int>(min(static_cast<int64_t>(VEC), b - e0));
    float acc[VEC];
    int32_t part[VEC];
    int32_t row[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t e = min(e0 + j, s.numel - 1);
      acc[j] = j < cnt ? load_c(q.theta, q.theta_t, s.start + e) : 0.f;
      part[j] = static_cast<int32_t>(part_of(e, s));
      row[j] = static_cast<int32_t>(s.row_off + e / s.row_len);
    }
    for (int64_t i = 0; i < q.n; ++i) {
      const T* ti = tau + i * q.P + e0;
      const Pack<T, VEC> pk = load_pack<T, VEC>(ti, cnt, vec_ok);
      const float* ci = q.coef + i * q.coef_stride + s.col;
      const float* si = q.scale ? q.scale + i * q.scale_stride : nullptr;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float t = to_f(pk.v[j]);
        if (si) t *= si[row[j]];
        acc[j] = fmaf(ci[part[j]], t, acc[j]);
      }
    }
    for (int j = 0; j < cnt; ++j) store_c(q.out, q.out_t, s.start + e0 + j, acc[j]);
  }
}

// Sum over the CUDA block, fixed order: a warp butterfly, then the warps in index order.
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += shared[w];
  }
  __syncthreads();
  return total;  // meaningful in thread 0
}

// partial[tile, i, kstride]: the tile's sums of grad * tau_i over each part. KR parts per pass.
template <typename T, int KR>
__global__ void __launch_bounds__(kThreads) grad_partial_kernel(Bufs q, Seg s, int64_t tile_elems, bool rows_aligned,
                                                                float* partial, int64_t kstride) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float shared[32];
  int64_t a, b;
  tile_range(s, tile_elems, a, b);
  const bool vec_ok = rows_aligned && ((s.start * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  const T* tau = static_cast<const T*>(q.tau) + s.start;
  float* out = partial + static_cast<int64_t>(blockIdx.x) * q.n * kstride;
  for (int64_t kbase = 0; kbase < s.k; kbase += KR) {
    for (int64_t i = 0; i < q.n; ++i) {
      float acc[KR];
#pragma unroll
      for (int r = 0; r < KR; ++r) acc[r] = 0.f;
      const float* si = q.scale ? q.scale + i * q.scale_stride : nullptr;
      for (int64_t e0 = a + static_cast<int64_t>(threadIdx.x) * VEC; e0 < b;
           e0 += static_cast<int64_t>(blockDim.x) * VEC) {
        const int cnt = static_cast<int>(min(static_cast<int64_t>(VEC), b - e0));
        const T* ti = tau + i * q.P + e0;
        const Pack<T, VEC> pk = load_pack<T, VEC>(ti, cnt, vec_ok);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (j < cnt) {
            const int64_t e = e0 + j;
            float prod = load_c(q.theta, q.theta_t, s.start + e) * to_f(pk.v[j]);
            if (si) prod *= si[s.row_off + e / s.row_len];
            if (KR == 1) {
              acc[0] += prod;
            } else {
              const int64_t p = part_of(e, s) - kbase;
#pragma unroll
              for (int r = 0; r < KR; ++r) acc[r] += (p == r) ? prod : 0.f;
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < KR; ++r) {
        const float tot = block_sum(acc[r], shared);
        if (threadIdx.x == 0 && kbase + r < kstride) out[i * kstride + kbase + r] = tot;
      }
    }
  }
}

// out[n, k] = the tiles of partial[tiles, n, k] summed in tile order (one CUDA block).
__global__ void grad_reduce_kernel(const float* partial, float* out, int64_t nk, int64_t ntiles) {
  for (int64_t c = threadIdx.x; c < nk; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t t = 0; t < ntiles; ++t) acc += partial[t * nk + c];
    out[c] = acc;
  }
}

Bufs make_bufs(const at::Tensor& theta, const at::Tensor& tau, const float* coef, int64_t coef_stride,
               const c10::optional<at::Tensor>& scale, int64_t scale_stride) {
  Bufs q;
  q.theta = theta.data_ptr();
  q.theta_t = code_of(theta.scalar_type());
  q.tau = tau.data_ptr();
  q.P = theta.numel();
  q.coef = coef;
  q.coef_stride = coef_stride;
  q.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  q.scale_stride = scale_stride;
  q.n = tau.size(0);
  q.out = nullptr;
  q.out_t = 0;
  return q;
}

bool rows_aligned(const at::Tensor& tau, int64_t P) {
  return reinterpret_cast<uintptr_t>(tau.data_ptr()) % 16 == 0 && (P * tau.element_size()) % 16 == 0;
}

c10::optional<at::Tensor> contig(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->contiguous();
}

int64_t single_tile(at::ScalarType t) { return static_cast<int64_t>(kThreads) * (16 / c10::elementSize(t)) * kIters; }

at::Tensor compose_cuda(const at::Tensor& theta0, const at::Tensor& tau, const at::Tensor& coef,
                        const c10::optional<at::Tensor>& scale, int64_t mode, int64_t key, at::ScalarType out_dtype) {
  const int64_t k = coef.dim() == 2 ? coef.size(1) : 1;
  check_block("compose", theta0, "theta0", tau, scale, mode, k);
  check_coef("compose", coef, tau.size(0), theta0);
  TORCH_CHECK(is_compute_dtype(out_dtype), "compose: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(theta0.device());
  auto th = theta0.contiguous();
  auto tc = tau.contiguous();
  auto cc = coef.contiguous();
  auto sc = contig(scale);
  auto out = new_output(theta0.sizes(), theta0.options().dtype(out_dtype));
  const int64_t P = theta0.numel();
  if (P == 0) return out;
  Bufs q = make_bufs(th, tc, cc.data_ptr<float>(), k, sc, scale_rows(theta0.sizes()));
  q.out = out.data_ptr();
  q.out_t = code_of(out_dtype);
  const Seg s = block_seg(theta0, k, mode, key);
  const int64_t tile = single_tile(tau.scalar_type());
  const int64_t grid = (P + tile - 1) / tile;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(tau.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    compose_kernel<T><<<grid, kThreads, 0, stream>>>(q, s, tile, rows_aligned(tc, P));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor coef_grad_cuda(const at::Tensor& grad, const at::Tensor& tau, const c10::optional<at::Tensor>& scale,
                          int64_t k, int64_t mode, int64_t key) {
  check_block("coef_grad", grad, "grad", tau, scale, mode, k);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = tau.size(0), P = grad.numel();
  if (P == 0 || n == 0) return at::zeros({n, k}, grad.options().dtype(at::kFloat));
  auto out = new_output({n, k}, grad.options().dtype(at::kFloat));
  auto gc = grad.contiguous();
  auto tc = tau.contiguous();
  auto sc = contig(scale);
  Bufs q = make_bufs(gc, tc, nullptr, 0, sc, scale_rows(grad.sizes()));
  const Seg s = block_seg(grad, k, mode, key);
  const int64_t tile = single_tile(tau.scalar_type());
  const int64_t tiles = (P + tile - 1) / tile;
  auto partial = new_output({tiles, n, k}, grad.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(tau.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (k == 1)
      grad_partial_kernel<T, 1><<<tiles, kThreads, 0, stream>>>(q, s, tile, rows_aligned(tc, P),
                                                                partial.data_ptr<float>(), k);
    else
      grad_partial_kernel<T, 8><<<tiles, kThreads, 0, stream>>>(q, s, tile, rows_aligned(tc, P),
                                                                partial.data_ptr<float>(), k);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_reduce_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<float>(), out.data_ptr<float>(), n * k, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace atlas_ext

TORCH_LIBRARY_IMPL(atlas_kernels_ext, CUDA, m) {
  m.impl("compose", &atlas_ext::cuda::compose_cuda);
  m.impl("coef_grad", &atlas_ext::cuda::coef_grad_cuda);
}
