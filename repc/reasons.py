"""Why something was not merged: a kind that code and tests branch on, and words for people.

Three stages can say no, each with its own exception or record and its own enum of kinds:

* the vocabulary (:mod:`repc.vocabulary`): a node has no canonical meaning --
  :class:`Opaque` with an :class:`OpaqueKind`;
* the closed forms (:mod:`repc.algebra`): two meanings do not merge exactly --
  :class:`repc.ops.NotMergeable` with a :class:`MergeKind`;
* the collapse pass (:mod:`repc.passes.collapse`): a region with a closed form is left as
  written -- :class:`repc.report.Rejection` with a :class:`RejectionKind`.

And how a region that merged was built: its :class:`MergeRule` s.

``str()`` of an exception is its words alone.  The kinds are strings too (their values), so a
report's JSON holds them as words.
"""

from __future__ import annotations

import enum


class MergeRule(str, enum.Enum):
    """How a region's merged form was built: the local rules of :mod:`repc.patterns.regions`
    and the passes that build forms of their own.  A rewrite holds the set of them
    (:attr:`repc.report.Rewrite.rules`); :data:`repc.report.RULE_WORDS` says each in words."""
    COMPOSE = "compose"  # chained ops composed
    SUM = "sum"  # branches summed
    CONCAT = "concat"  # a concatenation split into its parts
    SELECT = "select"  # channel slices
    DISTRIBUTE = "distribute"  # an op over a concatenation distributed
    LAYOUT = "layout"  # through reshapes and transposes
    FOLD_PARAMETERS = "fold-parameters"  # weights computed from parameters at each call, folded
    SYNTHESIZE = "synthesize"  # read off as one dense map
    AVERAGE_EXPERTS = "average-experts"  # experts averaged (approximate)


class OpaqueKind(str, enum.Enum):
    """Why a node has no meaning in the vocabulary."""
    BOUNDARY = "boundary"  # a placeholder or the output
    UNKNOWN_OP = "unknown op"  # no entry for this op in the vocabulary
    PRODUCT_OF_ACTIVATIONS = "product of activations"  # x * y for two data values (a gate from the data)
    RUNTIME_NUMBER = "number computed at run time"  # a factor or size read off the input's shape
    DATA_WEIGHT = "weight computed from the data"  # a conv or linear whose weight depends on the input
    TRAINING = "training mode"  # batch statistics or random dropout
    NOT_AFFINE = "not affine"  # an op in the vocabulary whose arguments make it non-affine (leaky slope != 1)
    UNSUPPORTED_FORM = "unsupported form"  # arguments or indexing the canonical meaning does not cover
    CONSTANTS = "constants only"  # a sum or concat with constants, a non-tensor constant


class MergeKind(str, enum.Enum):
    """Why two meanings have no exact closed form together."""
    NO_CLOSED_FORM = "no closed form"  # this pair of op kinds does not compose or add
    SHAPES_DIFFER = "shapes differ"  # channel or feature counts, dimensionality
    GRIDS_DIFFER = "grids differ"  # strides, dilations, offsets, padding modes
    BORDER = "border"  # a padded border would see a bias or a non-pointwise map
    GROUPS = "groups"  # conv groups that do not regroup
    AXIS = "axis"  # a concat, slice or scale on an axis the op does not act across
    NO_AFFINE_FORM = "no affine form"  # an operand without a form
    NOT_FLOATING = "not floating point"  # a probed value that is not a float tensor
    LAYOUT = "layout"  # a layout change that does not keep every element


class RejectionKind(str, enum.Enum):
    """Why the collapse pass left a region as written."""
    CUT = "cut"  # the region stopped below this value: an operand could not join
    DATA_GATE = "data gate"  # a product of two activations: a gate, a router, an attention product
    STOPS_REGION = "stops a region"  # an op outside the vocabulary reads an affine region
    NO_CLOSED_FORM = "no closed form"  # the region has no exact merged form
    NON_FINITE = "non-finite"  # the merged weights would hold NaN or Inf
    DOES_NOT_PAY = "does not pay"  # the merged form costs more than the region as written
    CHECK_FAILED = "check failed"  # the per-region check rolled the merge back
    NOT_APPLICABLE = "not applicable"  # a whole-model pass (expert averaging) found nothing it may do
    MODULE_BOUNDARY = "module boundary"  # merged only inside one module, so that a swap applies


class Opaque(Exception):
    """The node is not in the canonical vocabulary: :attr:`kind` says what kind of no, the
    message says why in words."""

    def __init__(self, kind: OpaqueKind, words: str):
        super().__init__(words)
        self.kind = kind
        self.words = words
