// Every effnlp op schema in one place: the library's op surface at a glance.
// Kernels live in cpu/<op>.cpp and cuda/<op>.cu; fake kernels and autograd in effnlp_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(effnlp, m) {
  // y = x @ (sum_r kron(A[r], B[r])).T + bias, without materialising the dense weight.
  //   x: [..., n1*n2], A: [R, m1, n1], B: [R, m2, n2], bias: [m1*m2] -> y: [..., m1*m2]
  m.def("kron_linear(Tensor x, Tensor A, Tensor B, Tensor? bias) -> Tensor");
  // Gradients of kron_linear w.r.t. (x, A, B, bias); entries whose mask is false come back
  // as empty tensors.
  m.def(
      "_kron_linear_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, bool[4] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}

// `import effnlp_ext._C` loads this shared library, whose static initialisers register the ops.
static PyModuleDef effnlp_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&effnlp_module); }
