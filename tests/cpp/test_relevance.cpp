// Relevance through the dispatcher from C++, with no Python: the C++ API of
// liblrpcpp, its autograd backward, and its argument checks.
#include <lrpcpp.h>
#include <torch/torch.h>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& name) {
  (ok ? passed : failed)++;
  std::cout << (ok ? "PASS " : "FAIL ") << name << std::endl;
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol = 1e-10) {
  return at::allclose(a, b, tol, tol);
}

at::Tensor stab(const at::Tensor& z, double eps) {
  return z + eps * at::where(z >= 0, at::ones_like(z), -at::ones_like(z));
}

void linear_epsilon_rule() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({3, 5}, opts).requires_grad_();
  auto w = torch::randn({4, 5}, opts);
  auto b = torch::randn({4}, opts);
  auto y = lrpcpp::linear_epsilon(x, w, b, 1e-6);
  check(close(y, at::linear(x.detach(), w, b)), "linear_epsilon forward equals at::linear");
  auto r = torch::randn_like(y);
  y.backward(r);
  // R_x = x * ((R / stab(y)) W), written out with plain ATen
  auto expected = x.detach() * at::matmul(r / stab(y.detach(), 1e-6), w);
  check(close(x.grad(), expected), "linear_epsilon relevance matches the formula");
}

void conservation() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({2, 6}, opts).requires_grad_();
  auto w = torch::randn({3, 6}, opts);
  auto y = lrpcpp::linear_epsilon(x, w, std::nullopt, 1e-12);
  auto z = lrpcpp::add2(y, lrpcpp::silu_identity(y), 1e-12);
  z.backward(z);
  check(std::abs(x.grad().sum().item<double>() - z.sum().item<double>()) < 1e-8,
        "linear + add2 + silu conserve relevance");
}

void softmax_rule() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({2, 7}, opts).requires_grad_();
  auto s = lrpcpp::softmax(x, -1, 1.0, std::nullopt);
  auto r = torch::randn_like(s);
  s.backward(r);
  auto sd = s.detach();
  auto expected = x.detach() * (r - sd * r.sum(-1, true));
  check(close(x.grad(), expected), "softmax Deep Taylor relevance matches the formula");
}

void gradient_times_input() {
  // autograd carries g = R / x: seeded with g, x * x.grad is the identity rule's R = y * g
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({3, 6}, opts).requires_grad_();
  auto y = at::silu(x.detach());
  auto out = lrpcpp::gi_identity(x, y, 0.0);
  check(at::equal(out, y) && out.data_ptr() == y.data_ptr(), "gi_identity forward is y itself (a view, no copy)");
  auto g = torch::randn_like(y);
  out.backward(g);
  check(close(x.detach() * x.grad(), y * g), "gi_identity: x * x.grad equals y * g");

  auto x2 = torch::randn({3, 6}, opts).requires_grad_();
  auto ln = lrpcpp::gi_layer_norm(x2, {6}, std::nullopt, std::nullopt, 1e-5);
  check(at::equal(ln, at::layer_norm(x2.detach(), {6})), "gi_layer_norm forward equals at::layer_norm");
  ln.backward(g);
  auto xd = x2.detach();
  auto rstd = at::rsqrt(xd.var(-1, /*unbiased=*/false, /*keepdim=*/true) + 1e-5);
  check(close(x2.grad(), rstd * (g - g.mean(-1, true))), "gi_layer_norm gradient with sigma detached");
}

void relevance_op_is_registered() {
  auto handle = c10::Dispatcher::singleton().findSchema({"lrpcpp::softmax_relevance", ""});
  check(handle.has_value(), "lrpcpp::softmax_relevance is a registered op");
}

void bad_input_errors() {
  auto x = torch::randn({2, 5});
  auto w = torch::randn({3, 4});
  bool raised = false;
  try {
    lrpcpp::linear_epsilon(x, w, std::nullopt, 1e-6);
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("expected the last dimension of x") != std::string::npos;
  }
  check(raised, "shape mismatch raises a clear error");
}

// The gamma rule on a linear layer (RULES.md section 3), term by term: outputs with z >= 0 take the
// numerators x+ (W + g W+) + x- (W + g W-), the others x+ (W + g W-) + x- (W + g W+); the bias is the
// weight of a constant input +1. And its gradient-times-input form: x * g_x is the same relevance.
void gamma_rule() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({3, 5}, opts);
  auto w = torch::randn({4, 5}, opts);
  auto b = torch::randn({4}, opts);
  const double g = 0.3;
  auto xe = x.clone().requires_grad_();
  auto y = lrpcpp::linear_gamma(xe, w, b, g, 1e-9, at::abs(w), false);
  check(close(y, at::linear(x, w, b)), "linear_gamma forward equals at::linear");
  auto r = torch::randn_like(y);
  y.backward(r);
  auto xp = x.clamp_min(0).unsqueeze(1), xn = x.clamp_max(0).unsqueeze(1);  // [3, 1, 5]
  auto up = w + g * w.clamp_min(0), down = w + g * w.clamp_max(0);          // [4, 5]
  auto num_p = xp * up + xn * down, num_n = xp * down + xn * up;            // [3, 4, 5]
  auto z = at::linear(x, w, b);
  auto pos = (z >= 0);
  auto num = at::where(pos.unsqueeze(-1), num_p, num_n);
  auto den = at::where(pos, num_p.sum(-1) + b + g * b.clamp_min(0), num_n.sum(-1) + b + g * b.clamp_max(0));
  auto expected = (num * (r / stab(den, 1e-9)).unsqueeze(-1)).sum(1);
  check(close(xe.grad(), expected), "linear_gamma relevance matches the formula");
  auto xg = x.clone().requires_grad_();
  auto yg = lrpcpp::linear_gamma(xg, w, b, g, 1e-9, std::nullopt, true);
  yg.backward(r / yg.detach());
  check(close(xg.grad() * x, expected), "linear_gamma gradient-times-input form");
}

// z-box on a first convolution conserves relevance with the bounds of the input.
void z_box_conserves() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::rand({2, 3, 8, 8}, opts).requires_grad_();
  auto lo = torch::zeros({3, 1, 1}, opts), hi = torch::ones({3, 1, 1}, opts);
  auto y = lrpcpp::conv2d_z_box(x, torch::randn({4, 3, 3, 3}, opts), torch::randn({4}, opts), lo, hi, {1, 1}, {1, 1},
                                {1, 1}, 1, 1e-12, std::nullopt, false);
  y.backward(y.detach().abs());
  check(std::abs(x.grad().sum().item<double>() - y.abs().sum().item<double>()) < 1e-8,
        "conv2d_z_box conserves relevance");
}

void z_plus_bias_in_denominator() {
  // x >= 0: R_x = x * ((R / stab(x W+ + b+)) W+) with the bias counted (zennit's convention); without it, b+ is
  // left out
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::rand({3, 5}, opts);
  auto w = torch::randn({4, 5}, opts);
  auto b = torch::randn({4}, opts);
  for (bool counted : {true, false}) {
    auto xr = x.clone().requires_grad_();
    auto y = lrpcpp::linear_z_plus(xr, w, b, 1e-6, std::nullopt, false, counted);
    auto r = torch::randn_like(y);
    y.backward(r);
    auto wp = w.clamp_min(0);
    auto den = at::linear(x, wp) + (counted ? b.clamp_min(0) : at::zeros_like(b));
    check(close(xr.grad(), x * at::matmul(r / stab(den, 1e-6), wp)),
          counted ? "linear_z_plus with the bias in the denominator" : "linear_z_plus with the bias left out");
  }
}

void pooling_rules() {
  // average pooling: R_x = x * P^T (R / stab(y)); max pooling: R_x = P^T R (the gradient of torch's max pooling)
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = torch::randn({2, 3, 6, 7}, opts);
  auto xa = x.clone().requires_grad_();
  auto y = lrpcpp::avg_pool_epsilon(xa, {2, 3}, {2, 1}, {1, 1}, false, true, std::nullopt, 1e-6, false);
  check(at::equal(y, at::avg_pool2d(x, {2, 3}, {2, 1}, {1, 1})), "avg_pool_epsilon forward equals at::avg_pool2d");
  auto r = torch::randn_like(y);
  y.backward(r);
  auto leaf = x.clone().requires_grad_();
  at::avg_pool2d(leaf, {2, 3}, {2, 1}, {1, 1}).backward(r / stab(y.detach(), 1e-6));
  check(close(xa.grad(), x * leaf.grad()), "avg_pool_epsilon relevance matches the formula");
  auto xm = x.clone().requires_grad_();
  auto m = lrpcpp::max_pool_wta(xm, {3, 3}, {2, 2}, {1, 1}, {1, 1}, true, false);
  auto rm = torch::randn_like(m);
  m.backward(rm);
  auto leaf2 = x.clone().requires_grad_();
  at::max_pool2d(leaf2, {3, 3}, {2, 2}, {1, 1}, {1, 1}, true).backward(rm);
  check(at::equal(xm.grad(), leaf2.grad()), "max_pool_wta passes each window's relevance to its maximum");
}

}  // namespace

int main() {
  torch::manual_seed(0);
  linear_epsilon_rule();
  conservation();
  softmax_rule();
  gradient_times_input();
  relevance_op_is_registered();
  bad_input_errors();
  gamma_rule();
  z_box_conserves();
  z_plus_bias_in_denominator();
  pooling_rules();
  std::cout << passed << " passed, " << failed << " failed" << std::endl;
  return failed == 0 ? 0 : 1;
}
