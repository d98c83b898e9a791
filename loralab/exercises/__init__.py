"""Classroom exercises: implement a piece of LoRA, call its check, and read what is wrong.

Each ``check_x(student_fn, *, strict=False, time_limit=None, where=None)`` runs the student's
function on fixed float64 inputs (odd shapes, a batch dimension, nonzero B), prints a verdict that
names what differs and any known mistake it matches, and returns True or False; ``strict=True``
raises ``AssertionError`` instead. A call that runs longer than ``time_limit`` seconds (default
`TIME_LIMIT`) is stopped and reported, as is a call of ``sys.exit()``. ``where``, the file name of
the calling notebook, lets a passing check's "Next:" line say "further down this notebook", or,
from a tutorial, "carry on with this notebook".
The exercise notebooks are in ``tutorials/exercises/``; ``loralab grade NOTEBOOK`` grades one.
The type-along tutorials check their steps with the same machinery (`loralab.exercises.engine_checks`
for tutorial 4b's engine; the layer checks with ``where=`` for 5b).

>>> import numpy as np
>>> from loralab.exercises import check_merge
>>> check_merge(lambda W0, A, B, scaling: W0 + scaling * (B @ A))  # doctest: +ELLIPSIS
Correct: merge(W0, A, B, scaling) ...
True
"""

from loralab.exercises._catalogue import EXERCISES, Exercise
from loralab.exercises._counting_and_svd_checks import (
    check_low_rank_approx,
    check_param_count,
    check_subspace_similarity,
)
from loralab.exercises._dora_checks import check_dora_forward
from loralab.exercises._feedback import TIME_LIMIT
from loralab.exercises._injection_checks import check_inject_lora
from loralab.exercises._layer_checks import (
    check_lora_backward,
    check_lora_dropout_backward,
    check_lora_forward,
    check_lora_init,
)
from loralab.exercises._merge_and_optimizer_checks import check_merge, check_optimizer_step
from loralab.exercises._mistakes import MISTAKES, Mistake
from loralab.exercises.quant_checks import check_nf4_quantization
from loralab.exercises.scaleout_checks import check_allreduce_bytes, check_ring_allreduce
from loralab.exercises.serving_checks import check_cat_combine, check_mixed_forward
from loralab.exercises.twin_checks import check_lora_function

__all__ = [
    "EXERCISES",
    "MISTAKES",
    "Exercise",
    "Mistake",
    "TIME_LIMIT",
    "check_dora_forward",
    "check_inject_lora",
    "check_lora_backward",
    "check_lora_dropout_backward",
    "check_lora_forward",
    "check_lora_function",
    "check_lora_init",
    "check_low_rank_approx",
    "check_merge",
    "check_nf4_quantization",
    "check_mixed_forward",
    "check_cat_combine",
    "check_ring_allreduce",
    "check_allreduce_bytes",
    "check_optimizer_step",
    "check_param_count",
    "check_subspace_similarity",
]
