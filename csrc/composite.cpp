// Device-independent (CompositeImplicitAutograd) ops: thin entry points over the kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace effnlp {
namespace {

at::Tensor kron_linear(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                       const std::optional<at::Tensor>& bias) {
  static auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("effnlp::_kron_linear_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&,
                                                    const std::optional<at::Tensor>&, bool)>();
  // The intermediate only serves the factor gradients; inference never keeps it.
  const bool keep_mid = at::GradMode::is_enabled() && (A.requires_grad() || B.requires_grad());
  return std::get<0>(forward.call(x, A, B, bias, keep_mid));
}

}  // namespace

TORCH_LIBRARY_IMPL(effnlp, CompositeImplicitAutograd, m) {
  m.impl("kron_linear", &kron_linear);
}

}  // namespace effnlp
