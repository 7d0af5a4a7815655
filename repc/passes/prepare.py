"""The graph preparation passes, in the order they run before region matching.

Each rewrites repc's own copy of the captured graph into a form the matcher merges more of,
computing the same function:

1. ``fold_border_fill`` -- a zero pad whose border is filled with a constant, as shifts and a
   zero pad (:mod:`repc.passes.border_fill`);
2. ``functionalize_inplace`` -- in-place ops out of place (:mod:`repc.passes.inplace`);
3. ``split_masked_activations`` -- ``where(mask, act(h), h)`` over channel runs as a concat of
   slices (:mod:`repc.passes.partial_activations`; after the in-place pass, so ``h`` is the
   value the ``where`` reads);
4. ``crops_as_padding`` -- a spatial crop only convs read, as negative padding
   (:mod:`repc.passes.crops`);
5. ``split_norm_affine`` -- LayerNorm / GroupNorm affine as a separate map
   (:mod:`repc.passes.norm_affine`);
6. ``push_scales_into_concat`` -- a per-channel map after a concat onto its parts
   (:mod:`repc.passes.move_scales`);
7. ``push_scales_into_matmul`` -- a scalar after a matmul onto an operand's map (same module);
8. ``expand_weighted_stacks`` -- a constant-weighted sum over a stack as a sum
   (:mod:`repc.passes.weighted_stacks`);
9. ``detach_metadata_reads`` -- dtype / device / rank / shape reads do not pin values
   (:mod:`repc.passes.metadata_reads`);
10. ``sink_token_layouts`` -- a layout change that keeps the last axis moved below the linear
   maps, per-feature constants and same-layout sums reading it (:mod:`repc.passes.token_layouts`).

:func:`prepare` runs :data:`PREPARATION` with :func:`repc.passes.manager.run_passes`.
"""

from __future__ import annotations

from typing import Sequence

from .border_fill import fold_border_fill
from .crops import crops_as_padding
from .inplace import functionalize_inplace
from .manager import Pass, PassContext, PassLog, run_passes
from .metadata_reads import detach_metadata_reads
from .move_scales import push_scales_into_concat, push_scales_into_matmul
from .norm_affine import split_norm_affine
from .partial_activations import split_masked_activations
from .token_layouts import sink_token_layouts
from .weighted_stacks import expand_weighted_stacks

PREPARATION: Sequence[Pass] = (
    Pass("fold_border_fill", lambda c: fold_border_fill(c.gm, c.values)),
    Pass("functionalize_inplace", lambda c: functionalize_inplace(c.gm, c.values)),  # (which casts copy)
    Pass("split_masked_activations", lambda c: split_masked_activations(c.gm, c.values)),
    Pass("crops_as_padding", lambda c: crops_as_padding(c.gm)),  # reads shapes
    Pass("split_norm_affine", lambda c: split_norm_affine(c.gm)),
    Pass("push_scales_into_concat", lambda c: push_scales_into_concat(c.gm, c.values)),
    Pass("push_scales_into_matmul", lambda c: push_scales_into_matmul(c.gm, c.values)),
    Pass("expand_weighted_stacks", lambda c: expand_weighted_stacks(c.gm, c.values)),
    Pass("detach_metadata_reads", lambda c: detach_metadata_reads(c.gm, c.values)),
    Pass("sink_token_layouts", lambda c: sink_token_layouts(c.gm, c.values)),
)


def prepare(context: PassContext, passes: Sequence[Pass] = PREPARATION) -> PassLog:
    """Run the preparation passes on ``context.gm`` in order."""
    return run_passes(passes, context)
