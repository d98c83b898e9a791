"""The list of exercises, in course order: where each lives, what passing it proves, what comes next.

Exercise N is the N-th entry of ``_ALL``; its notebook in ``tutorials/exercises/`` is named by the
number of the first exercise it holds (``03_lora_backward.ipynb`` holds exercise 3). A new exercise
goes at the end of the list, in a notebook of its own or after the last one's exercises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class Exercise:
    """One exercise: the functions a student writes in ``notebook`` and the check that grades them."""

    key: str
    title: str
    notebook: str
    functions: tuple[str, ...]
    check: str
    proved: str

    @property
    def number(self) -> int:
        """The exercise's number, its position in the course (from 1)."""
        return list(EXERCISES).index(self.key) + 1

    def next_step(self, where: str | None = None) -> str:
        """What to do after passing, for a check called from the notebook named ``where``.

        ``where`` is a notebook's file name (or path), e.g. ``"05b_build_lora_yourself.ipynb"``.
        Called from the notebook that holds the next exercise, it is "further down this notebook";
        from a tutorial (a notebook that holds no exercise), "carry on with this notebook", and the
        next exercise for later; otherwise (and when ``where`` is None) the next exercise and the
        exercise notebook that holds it, by name.
        """
        here = PurePath(where).name if where is not None else None
        keys = list(EXERCISES)
        i = keys.index(self.key)
        tutorial = here is not None and here not in {e.notebook for e in EXERCISES.values()}
        if i + 1 == len(keys):
            done = "that was the last exercise. Well done!"
            return f"carry on with this notebook; {done}" if tutorial else done
        nxt = EXERCISES[keys[i + 1]]
        exercise = f"exercise {i + 2}, `{', '.join(nxt.functions)}`"
        if here == nxt.notebook:
            return f"{exercise}, further down this notebook."
        elsewhere = f"{exercise}, in the exercise notebook exercises/{nxt.notebook}"
        if tutorial:
            return f"carry on with this notebook. For practice later: {elsewhere}."
        return f"{elsewhere}."


_ALL = [
    Exercise(
        "lora_forward",
        "lora_forward(x, W0, A, B, scaling)",
        "01_lora_forward.ipynb",
        ("lora_forward",),
        "check_lora_forward",
        "You computed y = x W0^T + scaling * x A^T B^T for single and batched inputs: "
        "the LoRA layer's output.",
    ),
    Exercise(
        "lora_forward_from_config",
        "lora_forward_from_config(x, W0, A, B, alpha, r)",
        "01_lora_forward.ipynb",
        ("lora_forward_from_config",),
        "check_lora_forward",
        "You turned the hyperparameters into scaling = alpha / r (LoRA paper, Section 4.1). With "
        "alpha fixed at the first r tried, a larger r gets a smaller scaling, which the paper says "
        "spares retuning the learning rate when r changes. (At initialisation the update is zero "
        "whatever the scaling, since B = 0.)",
    ),
    Exercise(
        "lora_backward",
        "lora_backward(dy, x, W0, A, B, scaling)",
        "03_lora_backward.ipynb",
        ("lora_backward",),
        "check_lora_backward",
        "You derived dx, dA and dB by the chain rule and summed them over the batch.",
    ),
    Exercise(
        "param_count",
        "lora_param_count(d, k, r) and lora_model_param_count(shapes, r, targets)",
        "04_counting_and_svd.ipynb",
        ("lora_param_count", "lora_model_param_count"),
        "check_param_count",
        "You showed that LoRA trains r (d + k) numbers per matrix instead of d k.",
    ),
    Exercise(
        "low_rank_approx",
        "low_rank_approx(W, r)",
        "04_counting_and_svd.ipynb",
        ("low_rank_approx",),
        "check_low_rank_approx",
        "Your truncated SVD reaches the Eckart–Young bound: no rank-r matrix is closer to W, "
        "and the squared error is exactly the sum of the discarded sigma^2.",
    ),
    Exercise(
        "merge",
        "merge(W0, A, B, scaling) and unmerge(W, A, B, scaling)",
        "06_merge_and_optimizer.ipynb",
        ("merge", "unmerge"),
        "check_merge",
        "You folded scaling * B A into W0 and took it out again: a merged LoRA model runs "
        "at exactly the base model's cost, and the adapter can be removed.",
    ),
    Exercise(
        "sgd_step",
        "sgd_step(params, grads, trainable, lr)",
        "06_merge_and_optimizer.ipynb",
        ("sgd_step",),
        "check_optimizer_step",
        "Your SGD step moves only the trainable parameters and leaves the frozen ones untouched.",
    ),
    Exercise(
        "adam_step",
        "adam_step(params, grads, state, trainable, lr, betas, eps, t)",
        "06_merge_and_optimizer.ipynb",
        ("adam_step",),
        "check_optimizer_step",
        "Your Adam step matches PyTorch's formulas (bias-corrected moments, eps outside the "
        "square root) over several steps, and keeps state only for the trainable parameters.",
    ),
    Exercise(
        "subspace_similarity",
        "subspace_similarity(U1, U2, i, j)",
        "09_subspace_similarity.ipynb",
        ("subspace_similarity",),
        "check_subspace_similarity",
        "You computed the LoRA paper's phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j): "
        "1 when one subspace contains the other, 0 when they are orthogonal.",
    ),
    Exercise(
        "lora_init",
        "init_lora(in_features, out_features, r, rng)",
        "10_lora_init.ipynb",
        ("init_lora",),
        "check_lora_init",
        "You started LoRA as the paper does (Section 4.1): A random, B = 0. So ΔW = B A = 0 and "
        "the adapted model starts exactly as the pretrained one, yet B's first gradient is "
        "nonzero and training moves.",
    ),
    Exercise(
        "lora_dropout_backward",
        "lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p)",
        "11_lora_dropout.ipynb",
        ("lora_dropout_backward",),
        "check_lora_dropout_backward",
        "You back-propagated through dropout on the LoRA path: the forward's mask and 1 / (1 - p) "
        "on dA, dB and the LoRA part of dx, while the frozen path, which saw the whole x, passes "
        "its gradient back unmasked.",
    ),
    Exercise(
        "inject_lora",
        "inject_lora_by_name(params, targets, r, rng)",
        "12_inject_by_name.ipynb",
        ("inject_lora_by_name",),
        "check_inject_lora",
        "You chose modules by name as PEFT does (the name is a target or ends with '.' + target), "
        "gave each a random A and a zero B, and froze everything else: the injected model starts "
        "as the base model and trains only the adapters.",
    ),
    Exercise(
        "dora_forward",
        "dora_forward(x, W0, A, B, scaling, m)",
        "13_dora_forward.ipynb",
        ("dora_forward",),
        "check_dora_forward",
        "You computed DoRA's forward (Liu et al., 2024): the adapted weight W0 + scaling * B A "
        "split into a direction with unit rows and a trained magnitude m per output row.",
    ),
    Exercise(
        "nf4_quantization",
        "nf4_quantize(W, block_size) and nf4_dequantize(codes, absmax, shape, block_size)",
        "14_nf4_quantization.ipynb",
        ("nf4_quantize", "nf4_dequantize"),
        "check_nf4_quantization",
        "You quantized W blockwise to NormalFloat-4 as QLoRA does (Section 3): one absmax per "
        "block, each value divided by it and rounded to the nearest of the 16 normal-quantile "
        "levels, and multiplied back on the way out.",
    ),
    Exercise(
        "mixed_forward",
        "mixed_forward(x, W0, As, Bs, scalings, adapter_ids)",
        "15_serving_many_adapters.ipynb",
        ("mixed_forward",),
        "check_mixed_forward",
        "You served one batch through several adapters: the base product once for every row, "
        "then each adapter's small product pair on its own rows only (what PEFT's "
        "`adapter_names` forward and `loralab.lora.mixed_batch` compute).",
    ),
    Exercise(
        "cat_combine",
        "cat_combine(As, Bs, scalings, weights)",
        "15_serving_many_adapters.ipynb",
        ("cat_combine",),
        "check_cat_combine",
        "You built PEFT's `cat` combination: stacking the A's (times w_k s_k) and the B's gives "
        "B A = sum_k w_k s_k B_k A_k exactly, at the sum of the ranks.",
    ),
    Exercise(
        "ring_allreduce",
        "ring_allreduce(grads, send)",
        "17_ring_allreduce.ipynb",
        ("ring_allreduce",),
        "check_ring_allreduce",
        "You ran the ring all-reduce (reduce-scatter, then all-gather): every worker ends with "
        "the sum of all gradients after sending 2 (P - 1) / P of one gradient.",
    ),
    Exercise(
        "allreduce_bytes",
        "allreduce_bytes(layer_shapes, r, P, bytes_per_value)",
        "17_ring_allreduce.ipynb",
        ("allreduce_bytes",),
        "check_allreduce_bytes",
        "You counted what data parallelism sends per step: 2 (P - 1) / P x the trainable "
        "numbers x their bytes, so LoRA sends the trainable fraction of full fine-tuning's bytes.",
    ),
    Exercise(
        "lora_function",
        "LoRAFunction.forward(ctx, x, W0, A, B, scaling) and backward(ctx, dy)",
        "19_lora_autograd_function.ipynb",
        ("LoRAFunction",),
        "check_lora_function",
        "You wrote the LoRA layer as a torch.autograd.Function: forward saves what backward needs "
        "with ctx.save_for_backward, and backward returns dx, dA and dB, with None for the frozen "
        "W0 and for the number scaling.",
    ),
]

#: Every exercise by key, in course order.
EXERCISES: dict[str, Exercise] = {e.key: e for e in _ALL}
