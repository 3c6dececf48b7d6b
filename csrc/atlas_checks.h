// Argument checks shared by the CPU, CUDA and Meta kernels: every error names the parameter, what
// was expected and what arrived.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include "atlas_common.h"

#include <cstdlib>
#include <limits>

namespace atlas_ext {

// Tests set ATLAS_KERNELS_EXT_POISON=1: outputs and scratch buffers are then filled with NaN before
// a kernel runs, so any element a kernel forgets to write poisons the result.
inline bool poison() { return std::getenv("ATLAS_KERNELS_EXT_POISON") != nullptr; }

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poison() ? at::full(sizes, std::numeric_limits<float>::quiet_NaN(), opts) : at::empty(sizes, opts);
}

inline bool is_compute_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline bool is_storage_dtype(at::ScalarType t) {
  return is_compute_dtype(t) || t == at::kChar || t == at::kFloat8_e4m3fn;
}

// Rows of a block's per-row scale (atlas_kernels/reference.py scale_rows): S[0] for >= 2-D blocks.
inline int64_t scale_rows(at::IntArrayRef shape) { return shape.size() >= 2 ? shape[0] : 1; }

inline void check_block(const char* op, const at::Tensor& block, const char* bname, const at::Tensor& tau,
                        const c10::optional<at::Tensor>& scale, int64_t mode, int64_t k) {
  TORCH_CHECK(is_compute_dtype(block.scalar_type()), op, ": ", bname,
              " must be float32, bfloat16 or float16, got ", block.scalar_type());
  TORCH_CHECK(is_storage_dtype(tau.scalar_type()), op,
              ": tau must be float32, bfloat16, float16, int8 or float8_e4m3fn, got ", tau.scalar_type());
  TORCH_CHECK(tau.dim() >= 1, op, ": tau must be [N, *S], got a 0-d tensor");
  const int64_t n = tau.size(0);
  TORCH_CHECK(tau.numel() == n * block.numel(), op, ": tau must be [N, *S] with S = ", block.sizes(),
              " (", block.numel(), " elements per task vector), got ", tau.sizes());
  TORCH_CHECK(tau.device() == block.device(), op, ": tau is on ", tau.device(), " but ", bname, " on ",
              block.device());
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 (k == 1), 1 (contiguous) or 2 (hash), got ", mode);
  TORCH_CHECK(k >= 1, op, ": k (partitions) must be >= 1, got ", k);
  TORCH_CHECK(k == 1 || mode != 0, op, ": mode 0 needs k == 1, got k = ", k);
  TORCH_CHECK(mode != 2 || block.numel() <= (int64_t(1) << 32), op,
              ": hash partitions need blocks under 2**32 elements, got ", block.numel());
  if (scale.has_value()) {
    const auto& s = *scale;
    const int64_t r = scale_rows(block.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": scale must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.numel() == n * r, op, ": scale must be [N, R] = [", n, ", ", r, "] for a block of shape ",
                block.sizes(), ", got ", s.sizes());
    TORCH_CHECK(s.device() == block.device(), op, ": scale is on ", s.device(), " but ", bname, " on ",
                block.device());
  } else {
    TORCH_CHECK(tau.scalar_type() != at::kChar && tau.scalar_type() != at::kFloat8_e4m3fn, op,
                ": int8 / float8_e4m3fn task vectors need their per-row scale, got scale=None");
  }
}

inline void check_coef(const char* op, const at::Tensor& coef, int64_t n, const at::Tensor& block) {
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == n, op,
              ": coef must be float32 [N, K] with N = ", n, ", got ", coef.scalar_type(), " ", coef.sizes());
  TORCH_CHECK(coef.device() == block.device(), op, ": coef is on ", coef.device(), " but the block on ",
              block.device());
}

inline Seg block_seg(const at::Tensor& block, int64_t k, int64_t mode, int64_t key) {
  const int64_t numel = block.numel();
  const int64_t r = scale_rows(block.sizes());
  Seg s;
  s.start = 0;
  s.numel = numel;
  s.col = 0;
  s.k = k;
  s.mode = k == 1 ? kModeNone : mode;
  s.key = static_cast<uint32_t>(key & 0xFFFFFFFFLL);
  s.row_off = 0;
  s.row_len = std::max<int64_t>(1, numel / std::max<int64_t>(r, 1));
  return s;
}

// Calls f(T{}) with T the C++ type of a task-vector storage dtype: the one list of storages the
// CPU and CUDA kernels both dispatch on.
template <typename F>
inline void dispatch_storage(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kChar: f(int8_t{}); break;
    case at::kFloat8_e4m3fn: f(c10::Float8_e4m3fn{}); break;
    default: TORCH_CHECK(false, "atlas_kernels_ext: unsupported storage dtype ", t);
  }
}

}  // namespace atlas_ext
