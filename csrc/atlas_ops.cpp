// The ops of the atlas_kernels extension, registered once (TORCH_LIBRARY), with Meta kernels so
// that FakeTensor / torch.compile trace through them. CPU kernels: cpu/atlas_cpu.cpp; CUDA
// kernels: cuda/atlas_cuda.cu. Schemas are documented in csrc/README.md.
#include <Python.h>
#include <torch/library.h>

#include <tuple>

#include "atlas_checks.h"

// An (empty) Python module, so that `import atlas_kernels._C` loads the library and runs the
// registrations below (the way torchvision._C is loaded).
static struct PyModuleDef atlas_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&atlas_module); }

namespace atlas_ext {
namespace {

// Meta kernels: shapes and dtypes only, in symbolic sizes (dynamic shapes under torch.compile);
// the real kernels check every shape when they run.
at::Tensor compose_meta(const at::Tensor& theta0, const at::Tensor& tau, const at::Tensor& coef,
                        const c10::optional<at::Tensor>& scale, int64_t mode, int64_t key, at::ScalarType out_dtype) {
  TORCH_CHECK(is_compute_dtype(out_dtype), "compose: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK(is_storage_dtype(tau.scalar_type()), "compose: unsupported tau dtype ", tau.scalar_type());
  return at::empty_symint(theta0.sym_sizes(), theta0.options().dtype(out_dtype));
}

at::Tensor coef_grad_meta(const at::Tensor& grad, const at::Tensor& tau, const c10::optional<at::Tensor>& scale,
                          int64_t k, int64_t mode, int64_t key) {
  TORCH_CHECK(is_storage_dtype(tau.scalar_type()), "coef_grad: unsupported tau dtype ", tau.scalar_type());
  return at::empty_symint({tau.sym_size(0), c10::SymInt(k)}, grad.options().dtype(at::kFloat));
}

at::Tensor fused_linear_meta(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& tau, const at::Tensor& coef,
                             const c10::optional<at::Tensor>& scale, int64_t mode, int64_t key,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(is_compute_dtype(x.scalar_type()), "fused_linear: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w0.dim() == 2, "fused_linear: x must be [M, in] and w0 [out, in], got ", x.sym_sizes(),
              " and ", w0.sym_sizes());
  return at::empty_symint({x.sym_size(0), w0.sym_size(0)}, x.options());
}

std::tuple<at::Tensor, at::Tensor> fused_linear_backward_meta(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& w0, const at::Tensor& tau,
                                                              const at::Tensor& coef,
                                                              const c10::optional<at::Tensor>& scale, int64_t mode,
                                                              int64_t key, bool need_dx) {
  auto dx = need_dx ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options());
  return {dx, at::empty_symint({tau.sym_size(0), coef.sym_size(1)}, x.options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace atlas_ext

TORCH_LIBRARY(atlas_kernels_ext, m) {
  m.def("compose(Tensor theta0, Tensor tau, Tensor coef, Tensor? scale, int mode, int key, "
        "ScalarType out_dtype) -> Tensor");
  m.def("coef_grad(Tensor grad, Tensor tau, Tensor? scale, int k, int mode, int key) -> Tensor");
  // The tile-fused linear (CPU kernels only; CUDA tensors take compose + matmul, see
  // atlas_kernels/ops/ext_backend.py): y = x W^T + bias, W composed tile by tile, never stored.
  m.def("fused_linear(Tensor x, Tensor w0, Tensor tau, Tensor coef, Tensor? scale, int mode, int key, "
        "Tensor? bias) -> Tensor");
  m.def("fused_linear_backward(Tensor grad_out, Tensor x, Tensor w0, Tensor tau, Tensor coef, Tensor? scale, "
        "int mode, int key, bool need_dx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(atlas_kernels_ext, Meta, m) {
  m.impl("compose", &atlas_ext::compose_meta);
  m.impl("coef_grad", &atlas_ext::coef_grad_meta);
  m.impl("fused_linear", &atlas_ext::fused_linear_meta);
  m.impl("fused_linear_backward", &atlas_ext::fused_linear_backward_meta);
}
