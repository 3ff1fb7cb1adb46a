// Minimal lowbit::nn::Q8Linear: train a step, then run inference from int8 weights only.
#include <lowbit/nn/q8_linear.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  lowbit::nn::Q8Linear layer(/*in=*/64, /*out=*/32);  // or Q8Linear(Q8LinearOptions(64, 32).device(torch::kCUDA))
  torch::optim::Adam opt(layer->parameters(), torch::optim::AdamOptions(1e-3));

  // Training: weights and activations are quantized to int8 in the forward, gradients pass straight through.
  auto x = torch::randn({8, 64});
  auto loss = layer(x).pow(2).mean();
  loss.backward();
  opt.step();
  std::cout << "loss " << loss.item<float>() << ", |grad W| " << layer->weight.grad().norm().item<float>()
            << ", learned activation scale " << layer->scale_a.item<float>() << "\n";

  // Inference: freeze the int8 codes, release the float weight (1 byte per weight), eval mode.
  layer->generate_quantized_weight(/*qweight_only=*/true);
  layer->eval();
  torch::NoGradGuard no_grad;
  auto y = layer(x);
  std::cout << "y " << y.sizes() << ", qweight " << layer->qweight.dtype() << " " << layer->qweight.sizes() << " ("
            << layer->qweight.nbytes() << " bytes)\n";
  return 0;
}
