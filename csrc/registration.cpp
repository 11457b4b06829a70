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

  // Word tokenisation + hashing of raw text for the DAN student (rules in effnlp/word_hash.h):
  // text: uint8 [n] UTF-8 bytes of B documents, offsets: int64 [B] (document b is
  // text[offsets[b] : offsets[b+1]], the last one ends at n) -> (ids int64 [T], id_offsets
  // int64 [B]): each token's 63-bit FNV-1a id, per document, in text order. CPU only.
  m.def("hash_words(Tensor text, Tensor offsets) -> (Tensor, Tensor)");

  // Hashed n-gram embedding bag (fastText / DAN input layer) in one pass: hash every n-gram of
  // every document, gather its row of weight, reduce per document; the ids never exist.
  //   tokens: int64 [N] (>= 0), offsets: int64 [B] (document starts, like F.embedding_bag without
  //   include_last_offset), orders: distinct n-gram orders >= 1 (n-grams stay within a
  //   document), weight: [unigram_rows + num_buckets, D] -> [B, D]; mode 0 = sum, 1 = mean over
  //   the kept n-grams (an empty document gives zeros). Order 1 maps to row = token when
  //   unigram_rows > 0; every other n-gram to unigram_rows + (hash >> 1) % num_buckets. With
  //   (vocab_keys, vocab_rows), an open-addressing table of the full hashes, every n-gram is
  //   looked up instead (unigram_rows = num_buckets = 0) and absent ones are dropped. Hash and
  //   table: include/effnlp/ngram_hash.h. sparse only selects the gradient's layout (as in
  //   aten::embedding_bag): a coalesced sparse COO tensor, or dense.
  m.def("ngram_bag(Tensor tokens, Tensor offsets, Tensor weight, int[] orders, int num_buckets,"
        " int unigram_rows, int mode, Tensor? vocab_keys=None, Tensor? vocab_rows=None,"
        " bool sparse=True) -> Tensor");
  // The rows ngram_bag gathers, per document by position then by increasing order (dropped
  // n-grams left out), and id_offsets [B] such that F.embedding_bag(ids, weight, id_offsets)
  // equals ngram_bag. With num_buckets = unigram_rows = 0 and no vocabulary the ids are the raw
  // 64-bit hashes (as int64): the keys a vocabulary is built from.
  m.def("ngram_ids(Tensor tokens, Tensor offsets, int[] orders, int num_buckets,"
        " int unigram_rows=0, Tensor? vocab_keys=None, Tensor? vocab_rows=None)"
        " -> (Tensor ids, Tensor id_offsets)");
  // Gradient of ngram_bag w.r.t. weight [num_weights, D] as a coalesced sparse matrix: the
  // distinct rows hit, ascending [nnz], and their summed gradient rows [nnz, D]. Bitwise
  // deterministic (each row is summed over its (n-gram, document) pairs in a fixed order).
  m.def("_ngram_bag_backward(Tensor grad, Tensor tokens, Tensor offsets, int[] orders,"
        " int num_buckets, int unigram_rows, int mode, int num_weights, Tensor? vocab_keys,"
        " Tensor? vocab_rows) -> (Tensor rows, Tensor values)");

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
