"""Minimal lowbit.nn.Q8Linear: train a step, then run inference from int8 weights only."""
import torch

import lowbit

torch.manual_seed(0)
layer = lowbit.nn.Q8Linear(64, 32)  # device="cuda" for the GPU; same state-dict keys as BIE's Q8LinearCutlass
opt = torch.optim.Adam(layer.parameters(), lr=1e-3)

# Training: weights and activations are quantized to int8 in the forward, gradients pass straight through.
x = torch.randn(8, 64)
loss = layer(x).pow(2).mean()
loss.backward()
opt.step()
print(f"loss {loss.item():.4f}, learned activation scale {layer.scale_a.item():.4f}")

# Inference: freeze the int8 codes, release the float weight (1 byte per weight), eval mode.
layer.generate_quantized_weight(qweight_only=True)
layer.eval()
with torch.no_grad():
    y = layer(x)
print(f"y {tuple(y.shape)}, qweight {layer.qweight.dtype} {tuple(layer.qweight.shape)}, weight {layer.weight}")
