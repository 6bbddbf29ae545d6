"""The reasons a position carries no loss, by name: the proto's MaskReason without its prefix.

{"special": MASK_REASON_SPECIAL, "unaligned": ..., "low_mass": ..., "beyond_context": ...};
the names are the fields of the Coverage message and of the trainer's masked_* metrics.
"""

from __future__ import annotations

from opd.v1 import teacher_pb2

MASK_REASONS: dict[str, int] = {
    name.removeprefix("MASK_REASON_").lower(): value
    for name, value in teacher_pb2.MaskReason.items()
    if value != teacher_pb2.MASK_REASON_OK
}
