// lowbit::nn::Q8Linear (C++ API) against a float64 reference written here from the math:
//   y = s_a*s_w * (Q(x + bias_a; s_a) . Q(W; s_w)^T), Q(t; s) = clamp(rne(t / s), -128, 127) in fp32,
//   s_a = max(scale_a, eps) (scale_a initialised to 2*mean|x|/sqrt(127)), s_w = max(2*mean|W|/sqrt(127), eps).
// Tolerance 1e-5 relative (DESIGN.md, fp32).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "lowbit/nn/q8_linear.h"
#include "lowbit/ops.h"

namespace {

torch::Tensor codes(const torch::Tensor& t32, float s) {
  auto v = t32 / torch::full({}, s, torch::kFloat32);
  return torch::round(v).clamp(-128, 127).to(torch::kFloat64);
}

float f32_scale(const torch::Tensor& t) {
  return float(2.0 * t.to(torch::kFloat64).abs().mean().item<double>() / std::sqrt(127.0));
}

double rel_err(const torch::Tensor& out, const torch::Tensor& ref) {
  return ((out.to(torch::kFloat64) - ref).norm() / ref.norm()).item<double>();
}

TEST(Q8LinearCpp, ForwardBackwardMatchReference) {
  torch::manual_seed(7);
  const int64_t M = 37, K = 53, N = 19;
  lowbit::nn::Q8Linear layer(K, N);
  {
    torch::NoGradGuard g;
    layer->bias_a.copy_(torch::randn({K}) * 0.1);
  }
  auto x = (torch::randn({M, K}) * 2).requires_grad_();
  auto y = layer->forward(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{M, N}));

  const float s_a = f32_scale(x.detach());
  EXPECT_FLOAT_EQ(layer->scale_a.item<float>(), s_a);
  const float s_w = std::max(f32_scale(layer->weight.detach()), 1e-5f);
  auto qx = codes(x.detach() + layer->bias_a.detach(), s_a);
  auto qw = codes(layer->weight.detach(), s_w);
  auto y_ref = qx.mm(qw.t()) * double(s_a * s_w);
  EXPECT_LT(rel_err(y, y_ref), 1e-5);

  auto G = torch::randn({M, N}, torch::kFloat64);
  (y * G.to(torch::kFloat32)).sum().backward();
  auto gA = G.mm(qw * double(s_w));
  auto v = ((x.detach() + layer->bias_a.detach()) / torch::full({}, s_a)).to(torch::kFloat64);
  auto below = v < -128, above = v > 127;
  auto inside = torch::logical_not(torch::logical_or(below, above));
  EXPECT_LT(rel_err(x.grad(), gA * inside), 1e-5);
  EXPECT_LT(rel_err(layer->weight.grad(), G.t().mm(qx * double(s_a))), 1e-5);
  auto r = torch::where(below, -128.0, torch::where(above, 127.0, torch::round(v) - v));
  auto gs = (r * gA).sum() / std::sqrt(double(M * K) * 127.0);
  EXPECT_LT(rel_err(layer->scale_a.grad(), gs), 1e-5);
}

// int8_backward (SwitchBack): the input gradient is that of the per-row int8 dequantized output gradient
// Gh = s_i * q, s_i = fp32(max|G_i| / 127), q = clamp(rne(G / s_i)) (float64 reference from the math);
// the weight gradient still uses the exact G.
TEST(Q8LinearCpp, Int8BackwardMatchesReference) {
  torch::manual_seed(8);
  const int64_t M = 29, K = 41, N = 23;
  lowbit::nn::Q8Linear layer(lowbit::nn::Q8LinearOptions(K, N).int8_backward(true));
  auto x = (torch::randn({M, K}) * 2).requires_grad_();
  auto y = layer->forward(x);
  const float s_a = f32_scale(x.detach());
  const float s_w = std::max(f32_scale(layer->weight.detach()), 1e-5f);
  auto qx = codes(x.detach() + layer->bias_a.detach(), s_a);
  auto qw = codes(layer->weight.detach(), s_w);
  auto G = torch::randn({M, N});
  (y * G).sum().backward();
  auto s_row = (G.to(torch::kFloat64).abs().amax(1) / 127.0).to(torch::kFloat32);
  auto qG = torch::round((G.to(torch::kFloat64) / s_row.to(torch::kFloat64).unsqueeze(1)).to(torch::kFloat32))
                .clamp(-127, 127)
                .to(torch::kFloat64);
  auto Gh = qG * s_row.to(torch::kFloat64).unsqueeze(1);
  auto v = ((x.detach() + layer->bias_a.detach()) / torch::full({}, s_a)).to(torch::kFloat64);
  auto inside = torch::logical_and(v >= -128, v <= 127);
  EXPECT_LT(rel_err(x.grad(), Gh.mm(qw * double(s_w)) * inside), 1e-5);
  EXPECT_LT(rel_err(layer->weight.grad(), G.to(torch::kFloat64).t().mm(qx * double(s_a))), 1e-5);
  // and near the float backward (the int8 rounding of G only)
  EXPECT_LT(rel_err(x.grad(), G.to(torch::kFloat64).mm(qw * double(s_w)) * inside), 0.03);
}

TEST(Q8LinearCpp, EvalEqualsTrainAndQweightOnly) {
  torch::manual_seed(3);
  lowbit::nn::Q8Linear layer(29, 11);
  auto x = torch::randn({5, 29});
  auto y_train = layer->forward(x);
  layer->eval();
  auto y_eval = layer->forward(x);
  EXPECT_TRUE(torch::equal(y_train, y_eval));
  ASSERT_TRUE(layer->has_qweight());
  EXPECT_EQ(layer->qweight.scalar_type(), torch::kInt8);
  layer->generate_quantized_weight(/*qweight_only=*/true);
  EXPECT_TRUE(layer->weight_released());
  EXPECT_TRUE(torch::equal(layer->forward(x), y_eval));
  layer->train();
  EXPECT_THROW(layer->forward(x), c10::Error);
}

TEST(Q8LinearCpp, BadInputsThrow) {
  lowbit::nn::Q8Linear layer(8, 4);
  EXPECT_THROW(layer->forward(torch::randn({2, 7})), c10::Error);
  EXPECT_THROW(layer->forward(torch::ones({2, 8}, torch::kInt32)), c10::Error);
  EXPECT_THROW(layer->forward(torch::randn({0, 8})), c10::Error);
  EXPECT_THROW(lowbit::nn::Q8Linear(0, 4), c10::Error);
  EXPECT_THROW(lowbit::nn::Q8Linear(lowbit::nn::Q8LinearOptions(8, 4).a_bit(4)), c10::Error);
}

TEST(Q8LinearCpp, OpsAgreeWithModule) {
  auto x = torch::randn({3, 16});
  auto s = torch::full({}, 0.05), eps = torch::full({}, 1e-5);
  auto q = lowbit::ops::quantize_s8(x, std::nullopt, s, eps, -128, 127);
  EXPECT_TRUE(torch::equal(q.to(torch::kFloat64), codes(x, 0.05f)));
}

}  // namespace
