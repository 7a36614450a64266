// The op schemas of macl_kernels, declared once; each device registers its kernels in
// its own file (cpu/negative_lse_cpu.cpp, cuda/negative_lse_cuda.cpp). The contract is
// macl_kernels/backends/base.py; the fake kernels and autograd live in macl_kernels/_extension_ops.py.
#include <Python.h>
#include <torch/library.h>

// `import macl_kernels._C` loads this library, which registers the ops below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(macl_kernels, m) {
  m.set_python_module("macl_kernels._extension_ops");
  // lse[r] = log sum_{c not excluded for r} exp(x[r] . y[c] / tau); y = None: y is x.
  m.def("negative_lse(Tensor x, Tensor? y, Tensor excluded, Tensor tau) -> Tensor");
  // (lse, P y) for candidates y: lse as above and the M x D product P y in the accumulation
  // dtype, P[r, c] = exp(x[r] . y[c] / tau - lse[r]) on the negatives (0 elsewhere), so that
  // the backward's dx = (grad_lse / tau) P y needs no pass over the scores
  // (macl_kernels/_extension_ops.py). CUDA and CPU kernels.
  m.def("negative_lse_product(Tensor x, Tensor y, Tensor excluded, Tensor tau) -> (Tensor, Tensor)");
  // (dx, dy) for an upstream grad_lse; dy is empty (0 elements) when y is None (dx then
  // holds both roles) or when need_dy is false; dx is empty when need_dx is false (only
  // with y: dx then comes from the product op's P y).
  m.def(
      "negative_lse_backward(Tensor grad_lse, Tensor x, Tensor? y, Tensor excluded, Tensor tau, Tensor lse, "
      "bool need_dy, bool need_dx=True) -> (Tensor, Tensor)");
}
