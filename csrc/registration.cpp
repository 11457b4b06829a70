// Every effnlp op schema in one place: the library's op surface at a glance.
// Kernels live in cpu/<op>.cpp and cuda/<op>.cu; fake kernels and autograd in effnlp_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(effnlp, m) {
  // y = x @ (sum_r kron(A[r], B[r])).T + bias, without materialising the dense weight.
  //   x: [..., n1*n2], A: [R, m1, n1], B: [R, m2, n2], bias: [m1*m2] -> y: [..., m1*m2]
  // Composite: calls _kron_linear_forward, keeping its intermediate when A or B need grads.
  m.def("kron_linear(Tensor x, Tensor A, Tensor B, Tensor? bias) -> Tensor");
  // The kernel: y and, when keep_mid, the intermediate of the first Kronecker mode (X B^T or
  // A X, all terms side by side) that the backward would otherwise recompute; empty when not
  // kept or when the kernel's layout has none to offer.
  m.def("_kron_linear_forward(Tensor x, Tensor A, Tensor B, Tensor? bias, bool keep_mid)"
        " -> (Tensor, Tensor)");
  // Gradients of kron_linear w.r.t. (x, A, B, bias) given the forward's intermediate (may be
  // empty); entries whose mask is false come back as empty tensors.
  m.def(
      "_kron_linear_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor mid,"
      " bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // FNet token mixing: y = Re(F_L X F_H) over the last two dims of x [..., L, H], real in and
  // out. lengths (optional, the batch shape of x): mix each sequence over its first
  // lengths[b] rows only; the remaining rows of y are 0 and do not affect the others. The map
  // is self-adjoint (both DFT matrices are symmetric), so its backward is this op on the
  // output gradient.
  m.def("fourier_mix(Tensor x, Tensor? lengths=None) -> Tensor");

  // y = x @ (weight * 1[scores > threshold]).T + bias: a linear layer whose weight is masked by
  // thresholded real-valued scores (TAMT / lottery-ticket mask training).
  //   x: [..., in], weight, scores: [out, in], bias: [out] -> y: [..., out]
  // The backward is straight-through: dL/dscores = dL/d(weight*mask) * weight.
  m.def("masked_linear(Tensor x, Tensor weight, Tensor scores, float threshold, Tensor? bias)"
        " -> Tensor");
  // Gradients of masked_linear w.r.t. (x, weight, scores, bias); the mask is recomputed from the
  // scores. Entries whose mask is false come back as empty tensors.
  m.def("_masked_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores,"
        " float threshold, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // y = x @ W.T + bias with W [out, in] in CSR form (int32 crow_indices [out+1], col_indices and
  // values [nnz]): the inference path of an exported sparse subnetwork.
  m.def("sparse_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values,"
        " int in_features, Tensor? bias) -> Tensor");

  // Rational activation y = P(x) / (1 + |b_0 x + ... + b_{n-1} x^n|), P(x) = a_0 + ... + a_m x^m,
  // elementwise, with learnable coefficients in ascending order (adaptable adapters / PAU).
  //   x: [..., C], numerator: [G, m+1], denominator: [G, n] (or [m+1] / [n] for G = 1) -> y: x's
  //   shape; channel c of the last dim uses group c / (C / G).
  m.def("rational(Tensor x, Tensor numerator, Tensor denominator) -> Tensor");
  // Gradients of rational w.r.t. (x, numerator, denominator); the coefficient gradients are
  // deterministic sums over all elements. Entries whose mask is false come back empty.
  m.def("_rational_backward(Tensor grad_y, Tensor x, Tensor numerator, Tensor denominator,"
        " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

// `import effnlp_ext._C` loads this shared library, whose static initialisers register the ops.
static PyModuleDef effnlp_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&effnlp_module); }
