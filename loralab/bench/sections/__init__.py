"""The suite's seven sections, in the order they run and appear in the report.

Each section module has ``run(res, log)``, which measures and appends its rows and checks to
the `Results`, and ``markdown(res) -> list[str]``, its part of the report.
"""

from loralab.bench.sections import (
    core,
    fused,
    inference,
    mixed_batch,
    overhead,
    qlora,
    real_model,
)

SECTIONS = {
    "overhead": overhead,
    "core": core,
    "inference": inference,
    "fused": fused,
    "mixed_batch": mixed_batch,
    "qlora": qlora,
    "real_model": real_model,
}

__all__ = ["SECTIONS"]
