"""Models shared by several test files."""

import numpy as np

from loralab import lora, nn
from loralab.lora import inject_lora


def every_layer_model(dtype=np.float64, *, seed=0, targets=("2", "5"), b_scale=1.0):
    """Embedding, LayerNorm, Linear, GELU, Dropout, Linear, ReLU, Linear, with LoRA on ``targets``.

    Every B is nonzero (``b_scale`` times a standard normal), so A gets a gradient at once.
    Returns the model and the generator, for drawing data from the same stream.
    """
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Embedding(11, 8, rng=rng, dtype=dtype),
        nn.LayerNorm(8, dtype=dtype),
        nn.Linear(8, 16, rng=rng, dtype=dtype),
        nn.GELU(),
        nn.Dropout(0.2, rng=rng),
        nn.Linear(16, 12, rng=rng, dtype=dtype),
        nn.ReLU(),
        nn.Linear(12, 5, rng=rng, dtype=dtype),
    )
    inject_lora(model, list(targets), r=3, alpha=6, dropout=0.1, seed=seed)
    for _, layer in model.named_modules():
        if isinstance(layer, lora.LoRALinear):
            layer.lora_B.data = (b_scale * rng.normal(size=layer.lora_B.shape)).astype(dtype)
    return model, rng


def nonzero_B(model, seed):
    """Draw every LoRA B of every named adapter from N(0, 1), one seeded stream in `lora_layers`
    order, on a NumPy or a torch model; returns the model. (B = 0, the default, would leave A
    without a gradient and every adapter equal to the base.)"""
    if isinstance(model, nn.Module):
        rng = np.random.default_rng(seed)
        for _, layer in lora.lora_layers(model):
            for name in layer.adapter_names:
                B = layer.adapter(name).lora_B
                B.data = rng.normal(size=B.shape).astype(B.data.dtype)
        return model
    import torch

    import loralab.torch as tl

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tl.lora_layers(model):
            for name in layer.adapter_names:
                B = layer.adapter(name).lora_B
                B.copy_(torch.randn(B.shape, generator=gen, dtype=B.dtype))
    return model


def copy_adapters_into_peft(model, peft_model):
    """Copy every named adapter's A and B of the torch twin ``model`` into ``peft_model`` (a
    PeftModel with the same adapters, configured alike); returns ``peft_model`` in eval mode."""
    import torch

    import loralab.torch as tl

    with torch.no_grad():
        for path, layer in tl.lora_layers(model):
            target = peft_model.base_model.model.get_submodule(path)
            for name in layer.adapter_names:
                target.lora_A[name].weight.copy_(layer.adapter(name).lora_A)
                target.lora_B[name].weight.copy_(layer.adapter(name).lora_B)
    return peft_model.eval()
