// Uses an installed liblrpcpp: the epsilon rule of a linear layer through lrpcpp.h and autograd.
// Prints the found package version and "ok", or the failed check and exits with 1.
#include <lrpcpp.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({3, 5}, opts).requires_grad_();
  auto w = torch::randn({4, 5}, opts);
  auto y = lrpcpp::linear_epsilon(x, w, std::nullopt, 1e-6);
  if (!at::allclose(y, at::linear(x.detach(), w))) {
    std::cout << "linear_epsilon forward differs from at::linear" << std::endl;
    return 1;
  }
  y.backward(y);
  // R_x = x * ((R / stab(y)) W) with R = y: the relevance is conserved, sum R_x = sum y
  auto z = y.detach();
  auto stab = z + 1e-6 * at::where(z >= 0, at::ones_like(z), -at::ones_like(z));
  auto expected = x.detach() * at::matmul(z / stab, w);
  if (!at::allclose(x.grad(), expected, 1e-10, 1e-10)) {
    std::cout << "linear_epsilon relevance differs from the formula" << std::endl;
    return 1;
  }
  std::cout << "lrpcpp " << LRPCPP_FOUND_VERSION << std::endl << "ok" << std::endl;
  return 0;
}
