// lowbit::nn::Q4Linear and lowbit::nn::Q4Conv2d (C++ API) against float64 references written here from
// the math:
//   Q(t; s) = clamp(rne(t / s), -8, 7) computed in fp32, s_a = max(scale_a, eps) with scale_a initialised
//   to 2*mean|x|/sqrt(127), s_w = max(2*mean|W|/5.6345, eps) (fixed by prepare_params);
//   Q4Linear: y = s_a*s_w * (Q(x + bias_a) . Q(W)^T);  Q4Conv2d: y = conv2d(s_a Q(x + bias_a[c]), s_w Q(W)).
//   Backward: straight-through for x (zero where (x + bias_a)/s_a leaves [-8, 7]) and W; LSQ for scale_a:
//   sum(R * dL/dx_hat) / sqrt(numel(x) * 7), R = -8 / 7 where clipped, rne(v) - v elsewhere.
// Tolerance 1e-5 relative (DESIGN.md, fp32).
#include <gtest/gtest.h>

#include <string>
#include <torch/torch.h>

#include <cmath>
#include <sstream>

#include "lowbit/nn.h"
#include "lowbit/ops.h"

namespace {

constexpr double kQ4WeightConst = 5.6345;  // BIE's 4-bit weight-step divisor

torch::Tensor codes(const torch::Tensor& t32, float s) {
  auto v = t32 / torch::full({}, s, torch::kFloat32);
  return torch::round(v).clamp(-8, 7).to(torch::kFloat64);
}

// lsq_scale's rule: 2*mean|t| (float64) / sqrt(qmax), rounded once to fp32. For the weight step the op
// gets qmax = 5.6345^2, so divide by the sqrt of that square exactly as it does.
float f32_scale(const torch::Tensor& t, double qmax) {
  return float(2.0 * t.to(torch::kFloat64).abs().mean().item<double>() / std::sqrt(qmax));
}
float act_scale(const torch::Tensor& x) { return f32_scale(x, 127.0); }
float q4_weight_scale(const torch::Tensor& w) {
  return std::max(f32_scale(w, kQ4WeightConst * kQ4WeightConst), 1e-5f);
}

double rel_err(const torch::Tensor& out, const torch::Tensor& ref) {
  return ((out.to(torch::kFloat64) - ref).norm() / ref.norm()).item<double>();
}

// v = (x + shift) / s_a in fp32 as the quantizer computes it; the clip masks and LSQ residual R.
struct Lsq {
  torch::Tensor inside, r;
};
Lsq lsq_terms(const torch::Tensor& shifted32, float s_a) {
  auto v = (shifted32 / torch::full({}, s_a)).to(torch::kFloat64);
  auto below = v < -8, above = v > 7;
  return {torch::logical_not(torch::logical_or(below, above)),
          torch::where(below, -8.0, torch::where(above, 7.0, torch::round(v) - v))};
}

// ---------------------------------------------------------------------------------------------- Q4Linear

TEST(Q4LinearCpp, ForwardBackwardMatchReference) {
  torch::manual_seed(7);
  const int64_t M = 37, K = 53, N = 19;  // odd K: the last int4 pair of each qweight row is half padding
  lowbit::nn::Q4Linear layer(K, N);
  {
    torch::NoGradGuard g;
    layer->bias_a.copy_(torch::randn({K}) * 0.1);
  }
  EXPECT_EQ(layer->scale_w.item<float>(), 1.0f);  // not prepared yet: the first forward does it
  auto x = (torch::randn({M, K}) * 2).requires_grad_();
  auto y = layer->forward(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{M, N}));

  const float s_a = act_scale(x.detach());
  const float s_w = q4_weight_scale(layer->weight.detach());
  EXPECT_FLOAT_EQ(layer->scale_a.item<float>(), s_a);
  EXPECT_FLOAT_EQ(layer->scale_w.item<float>(), s_w);
  const auto shifted = x.detach() + layer->bias_a.detach();
  auto qx = codes(shifted, s_a);
  auto qw = codes(layer->weight.detach(), s_w);
  EXPECT_LT(rel_err(y, qx.mm(qw.t()) * double(s_a * s_w)), 1e-5);

  auto G = torch::randn({M, N}, torch::kFloat64);
  (y * G.to(torch::kFloat32)).sum().backward();
  auto gA = G.mm(qw * double(s_w));  // dL/dx_hat
  const auto t = lsq_terms(shifted, s_a);
  ASSERT_GT(torch::logical_not(t.inside).sum().item<int64_t>(), 0);  // the clip paths are exercised
  EXPECT_LT(rel_err(x.grad(), gA * t.inside), 1e-5);
  EXPECT_LT(rel_err(layer->bias_a.grad(), (gA * t.inside).sum(0)), 1e-5);
  EXPECT_LT(rel_err(layer->weight.grad(), G.t().mm(qx * double(s_a))), 1e-5);
  EXPECT_LT(rel_err(layer->scale_a.grad(), (t.r * gA).sum() / std::sqrt(double(M * K) * 7.0)), 1e-5);
}

TEST(Q4LinearCpp, ScaleWIsFixedByPrepareParams) {
  torch::manual_seed(11);
  lowbit::nn::Q4Linear layer(21, 6);
  auto x = torch::randn({9, 21});
  layer->forward(x);
  const float s_w0 = layer->scale_w.item<float>();
  {
    torch::NoGradGuard g;
    layer->weight.mul_(3);  // as an optimiser step would, in place
  }
  auto y = layer->forward(x);  // training: still the prepared step, not re-derived per step (BIE)
  EXPECT_EQ(layer->scale_w.item<float>(), s_w0);
  const float s_a = layer->scale_a.item<float>();
  auto ref = codes(x, s_a).mm(codes(layer->weight.detach(), s_w0).t()) * double(s_a * s_w0);
  EXPECT_LT(rel_err(y, ref), 1e-5);
  layer->prepare_params();  // after changing the weight by hand
  EXPECT_FLOAT_EQ(layer->scale_w.item<float>(), q4_weight_scale(layer->weight.detach()));
}

TEST(Q4LinearCpp, EvalEqualsTrainAndQweightOnly) {
  torch::manual_seed(3);
  const int64_t K = 29, N = 11;
  lowbit::nn::Q4Linear layer(K, N);
  auto x = torch::randn({3, 4, K});  // leading dims
  auto y_train = layer->forward(x);
  ASSERT_EQ(y_train.sizes(), (std::vector<int64_t>{3, 4, N}));
  layer->eval();
  auto y_eval = layer->forward(x);
  EXPECT_TRUE(torch::equal(y_train, y_eval));
  ASSERT_TRUE(layer->has_qweight());
  EXPECT_EQ(layer->qweight.scalar_type(), torch::kInt8);
  EXPECT_EQ(layer->qweight.sizes(), (std::vector<int64_t>{N, (K + 1) / 2}));
  const float s_w = layer->scale_w.item<float>();
  EXPECT_TRUE(torch::equal(lowbit::ops::unpack_s4(layer->qweight, K).to(torch::kFloat64),
                           codes(layer->weight.detach(), s_w)));

  // The weight changes in place (version bump): eval remakes qweight, again equal to training.
  {
    torch::NoGradGuard g;
    layer->weight.mul_(-0.5);
  }
  auto y_eval2 = layer->forward(x);
  EXPECT_FALSE(torch::equal(y_eval2, y_eval));
  layer->train();
  EXPECT_TRUE(torch::equal(layer->forward(x), y_eval2));
  EXPECT_FALSE(layer->has_qweight());  // dropped when training resumed

  layer->eval();
  layer->generate_quantized_weight(/*qweight_only=*/true);
  EXPECT_TRUE(layer->weight_released());
  EXPECT_TRUE(torch::equal(layer->forward(x), y_eval2));
  layer->generate_quantized_weight(true);  // nothing left to quantize: keeps the codes
  EXPECT_TRUE(torch::equal(layer->forward(x), y_eval2));
  layer->train();
  EXPECT_THROW(layer->forward(x), c10::Error);
}

// A checkpoint keeps the trained layer's scale_w (prepared from the initial weight), rather than
// re-deriving it from the trained weight on the first forward after loading; same for a clone.
TEST(Q4LinearCpp, SaveLoadAndCloneKeepTheLayer) {
  torch::manual_seed(5);
  lowbit::nn::Q4Linear layer(17, 5);
  auto x = torch::randn({8, 17});
  torch::optim::Adam opt(layer->parameters(), torch::optim::AdamOptions(1e-2));
  layer->forward(x).square().sum().backward();
  opt.step();
  std::stringstream full;  // a training checkpoint: no qweight, so the loaded layer quantizes afresh
  torch::save(layer, full);
  layer->eval();
  const auto y = layer->forward(x);

  lowbit::nn::Q4Linear loaded(17, 5);
  torch::load(loaded, full);
  loaded->eval();
  EXPECT_TRUE(torch::equal(loaded->forward(x), y));
  EXPECT_TRUE(loaded->weight.requires_grad());

  auto copy = std::dynamic_pointer_cast<lowbit::nn::Q4LinearImpl>(layer->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->forward(x), y));

  layer->generate_quantized_weight(/*qweight_only=*/true);
  std::stringstream inference;
  torch::save(layer, inference);
  lowbit::nn::Q4Linear infer(17, 5);
  torch::load(infer, inference);
  infer->eval();
  EXPECT_TRUE(infer->weight_released());
  EXPECT_FALSE(infer->weight.requires_grad());
  EXPECT_TRUE(torch::equal(infer->forward(x), y));
}

TEST(Q4LinearCpp, BadInputsThrow) {
  lowbit::nn::Q4Linear layer(8, 4);
  EXPECT_THROW(layer->forward(torch::randn({2, 7})), c10::Error);
  EXPECT_THROW(layer->forward(torch::ones({2, 8}, torch::kInt32)), c10::Error);
  EXPECT_THROW(layer->forward(torch::randn({0, 8})), c10::Error);
  EXPECT_THROW(lowbit::nn::Q4Linear(0, 4), c10::Error);
  EXPECT_THROW(lowbit::nn::Q4Linear(lowbit::nn::Q4LinearOptions(8, 4).a_bit(8)), c10::Error);
  EXPECT_THROW(lowbit::nn::Q4Linear(lowbit::nn::Q4LinearOptions(8, 4).w_bit(8)), c10::Error);
  EXPECT_THROW(lowbit::nn::Q4Linear(lowbit::nn::Q4LinearOptions(8, 4).dtype(torch::kFloat64)), c10::Error);
}

// The message of the c10::Error that fn throws ("" if it throws none).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(Q4LinearCpp, LoadRefusesAnotherLayersCheckpoint) {
  // torch::load would take any shape (InputArchive replaces the tensors): the module checks the archive
  // against its own options first and stays untouched when it refuses.
  torch::manual_seed(3);
  lowbit::nn::Q4Linear src(64, 10);
  src->forward(torch::randn({4, 64}));
  src->generate_quantized_weight(false);
  std::stringstream ckpt;
  torch::save(src, ckpt);

  lowbit::nn::Q4Linear wider(100, 10);
  auto msg = error_of([&] { torch::load(wider, ckpt); });
  EXPECT_NE(msg.find("checkpoint 'weight' has shape [10, 64], this layer's is [10, 100]"), std::string::npos) << msg;
  EXPECT_EQ(wider->weight.sizes(), (torch::IntArrayRef{10, 100}));
  EXPECT_EQ(wider->forward(torch::randn({2, 100})).sizes(), (torch::IntArrayRef{2, 10}));

  ckpt.clear();
  ckpt.seekg(0);
  lowbit::nn::Q8Linear q8(64, 10);  // same weight shape; the int4-pair qweight is (10, 32), not (10, 64)
  msg = error_of([&] { torch::load(q8, ckpt); });
  EXPECT_NE(msg.find("checkpoint 'qweight' must be int8 of shape [10, 64], got Char [10, 32]"), std::string::npos)
      << msg;

  ckpt.clear();
  ckpt.seekg(0);
  lowbit::nn::Q4Linear same(64, 10);
  EXPECT_EQ(error_of([&] { torch::load(same, ckpt); }), "");
}

// ---------------------------------------------------------------------------------------------- Q4Conv2d

lowbit::nn::Q4Conv2dOptions odd_conv() {  // 6 -> 8 channels, 2 groups of 3 (odd: half a pair of padding)
  return lowbit::nn::Q4Conv2dOptions(6, 8, {3, 2}).stride(2).padding(1).dilation(2).groups(2);
}

TEST(Q4Conv2dCpp, ForwardBackwardMatchConvOnDequantized) {
  torch::manual_seed(13);
  lowbit::nn::Q4Conv2d layer(odd_conv());
  {
    torch::NoGradGuard g;
    layer->bias_a.copy_(torch::randn({6}) * 0.1);
  }
  auto x = (torch::randn({2, 6, 11, 9}) * 2).requires_grad_();  // non-square
  auto y = layer->forward(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 8, 5, 5}));

  const float s_a = act_scale(x.detach());
  const float s_w = q4_weight_scale(layer->weight.detach());
  EXPECT_FLOAT_EQ(layer->scale_a.item<float>(), s_a);
  EXPECT_FLOAT_EQ(layer->scale_w.item<float>(), s_w);
  const auto shifted = x.detach() + layer->bias_a.detach().view({1, -1, 1, 1});
  auto x_hat = (codes(shifted, s_a) * double(s_a)).requires_grad_();
  auto w_hat = (codes(layer->weight.detach(), s_w) * double(s_w)).requires_grad_();
  auto y_ref = torch::conv2d(x_hat, w_hat, {}, /*stride=*/2, /*padding=*/1, /*dilation=*/2, /*groups=*/2);
  EXPECT_LT(rel_err(y, y_ref.detach()), 1e-5);

  auto G = torch::randn(y_ref.sizes(), torch::kFloat64);
  (y * G.to(torch::kFloat32)).sum().backward();
  (y_ref * G).sum().backward();  // dL/dx_hat, dL/dw_hat in float64
  const auto gA = x_hat.grad();
  const auto t = lsq_terms(shifted, s_a);
  ASSERT_GT(torch::logical_not(t.inside).sum().item<int64_t>(), 0);
  EXPECT_LT(rel_err(x.grad(), gA * t.inside), 1e-5);
  EXPECT_LT(rel_err(layer->bias_a.grad(), (gA * t.inside).sum({0, 2, 3})), 1e-5);
  EXPECT_LT(rel_err(layer->weight.grad(), w_hat.grad()), 1e-5);
  EXPECT_LT(rel_err(layer->scale_a.grad(), (t.r * gA).sum() / std::sqrt(double(x.numel()) * 7.0)), 1e-5);
}

TEST(Q4Conv2dCpp, EvalEqualsTrainAndQweightOnly) {
  torch::manual_seed(17);
  lowbit::nn::Q4Conv2d layer(odd_conv());
  auto x = torch::randn({3, 6, 10, 13});
  auto y_train = layer->forward(x);
  layer->eval();
  auto y_eval = layer->forward(x);
  EXPECT_TRUE(torch::equal(y_train, y_eval));
  ASSERT_TRUE(layer->has_qweight());
  EXPECT_EQ(layer->qweight.scalar_type(), torch::kInt8);
  EXPECT_EQ(layer->qweight.sizes(), (std::vector<int64_t>{8, 3, 2, 2}));  // (O, kh, kw, ceil(3/2))
  const auto ohwi = layer->weight.detach().permute({0, 2, 3, 1}).contiguous();
  EXPECT_TRUE(torch::equal(lowbit::ops::unpack_s4(layer->qweight, 3).to(torch::kFloat64),
                           codes(ohwi, layer->scale_w.item<float>())));

  layer->generate_quantized_weight(/*qweight_only=*/true);
  EXPECT_TRUE(layer->weight_released());
  EXPECT_TRUE(torch::equal(layer->forward(x), y_eval));
  auto copy = std::dynamic_pointer_cast<lowbit::nn::Q4Conv2dImpl>(layer->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->forward(x), y_eval));
  layer->train();
  EXPECT_THROW(layer->forward(x), c10::Error);
}

TEST(Q4Conv2dCpp, BadInputsThrow) {
  using lowbit::nn::Q4Conv2d;
  using lowbit::nn::Q4Conv2dOptions;
  Q4Conv2d layer(odd_conv());
  EXPECT_THROW(layer->forward(torch::randn({6, 11, 9})), c10::Error);         // not 4-D
  EXPECT_THROW(layer->forward(torch::randn({1, 5, 11, 9})), c10::Error);      // wrong channel count
  for (bool train : {true, false}) {  // reported as the input's fault in both modes
    layer->train(train);
    const auto msg = error_of([&] { layer->forward(torch::randn({1, 5, 11, 9})); });
    EXPECT_NE(msg.find("x must be 4-D (N, C, H, W) with C = in_channels=6, got shape [1, 5, 11, 9]"),
              std::string::npos) << msg;
  }
  layer->train(true);
  EXPECT_THROW(layer->forward(torch::randn({1, 6, 2, 9})), c10::Error);       // smaller than the dilated kernel
  EXPECT_THROW(layer->forward(torch::randn({0, 6, 11, 9})), c10::Error);      // empty batch
  EXPECT_THROW(layer->forward(torch::ones({1, 6, 11, 9}, torch::kInt32)), c10::Error);
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 8, 3).groups(4)), c10::Error);     // 4 does not divide 6
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 9, 3).groups(2)), c10::Error);     // nor 2 divide 9
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 8, {3, 0})), c10::Error);
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 8, 3).stride(0)), c10::Error);
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 8, 3).padding(-1)), c10::Error);
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 8, 3).dilation(0)), c10::Error);
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(6, 8, 3).a_bit(8)), c10::Error);
  EXPECT_THROW(Q4Conv2d(Q4Conv2dOptions(0, 8, 3)), c10::Error);
}

}  // namespace
