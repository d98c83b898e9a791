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
