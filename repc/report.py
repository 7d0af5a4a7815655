"""What repc did to a model: rewrites, regions kept and why, parts not captured, verification.

Counts are named for what they count: ``macs_*`` are multiply-adds (a conv or linear's
multiply-accumulates, one per elementwise scale or shift), what repc's cost model compares;
FLOPs (torch's ``FlopCounterMode``, two per multiply-add) appear only in the CLI's whole-model
``gains.flops_*``.  ``str(report)`` is the table people read: one row per module, identical
blocks grouped (``stages.1.0–13  3×3 + 1×1 + BN branches → one conv  ×14``), the rules in words.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from .reasons import MergeRule, RejectionKind


@dataclass(init=False)
class Rewrite:
    """One region replaced by merged ops.  ``flops_before``, ``flops_after`` and ``shared_flops``
    are accepted and readable as the former names of the ``macs_*`` counts (they always held
    multiply-adds)."""
    rules: Tuple[MergeRule, ...]  # how the region's form was built: compose, sum... (in words: describe_rules)
    root: str  # the value the merged op now computes
    replaced: List[str]  # the original nodes / modules of the region
    result: List[str]  # the merged op(s), one per source
    params_before: int
    params_after: int
    macs_before: int  # multiply-adds of the region as written, on the example input
    macs_after: int  # multiply-adds of the merged ops
    exact: bool = True
    max_deviation: float = 0.0  # measured against the region as written
    shape_specialized: bool = False  # valid only for the example's per-sample shape
    shared_macs: int = 0  # of macs_before, what an earlier rewrite's region already counted
    module: Optional[str] = None  # the module of the model enclosing the region ("stages.1.0"; "" the model)
    # the compile's cost model priced the merged form below the region as written (``cost="latency"``:
    # fewer ops that take more multiply-adds, a 3x3 and a dilated 3x3 as one 5x5)
    cheaper: bool = False

    def __init__(self, rule, root, replaced, result, params_before, params_after, macs_before=None, macs_after=None,
                 exact=True, max_deviation=0.0, shape_specialized=False, shared_macs=None, module=None, cheaper=False,
                 *, flops_before=None, flops_after=None, shared_flops=None):
        if isinstance(rule, str):  # ("compose+sum": a report written by hand)
            rule = [MergeRule(part) for part in rule.split("+") if part and part != "fold"]
        self.rules = tuple(sorted(set(rule), key=lambda r: r.value))
        self.root, self.replaced, self.result = root, list(replaced), list(result)
        self.params_before, self.params_after = params_before, params_after
        self.macs_before = macs_before if macs_before is not None else flops_before or 0
        self.macs_after = macs_after if macs_after is not None else flops_after or 0
        self.shared_macs = shared_macs if shared_macs is not None else shared_flops or 0
        self.exact, self.max_deviation, self.shape_specialized, self.module = exact, max_deviation, \
            shape_specialized, module
        self.cheaper = cheaper

    @property
    def saves(self) -> bool:
        """Whether it saves multiply-adds or parameters, costs less by the compile's cost model,
        folds weights computed at each call, or approximates (averaged experts); else it only
        rewrites ops in place of as many (a cast merged into a multiply), and the
        module-preserving output keeps its modules as written."""
        return self.macs_after < self.macs_before - self.shared_macs or self.params_after < self.params_before \
            or self.cheaper or MergeRule.FOLD_PARAMETERS in self.rules or not self.exact

    @property
    def rule(self) -> str:
        """The rules as one string, as the report's JSON holds them: ``compose+sum`` (``fold``: a
        region of one op and the weights it folds)."""
        return "+".join(r.value for r in self.rules) or "fold"

    # the former names (multiply-adds all along)
    flops_before = property(lambda self: self.macs_before, lambda self, v: setattr(self, "macs_before", v))
    flops_after = property(lambda self: self.macs_after, lambda self, v: setattr(self, "macs_after", v))
    shared_flops = property(lambda self: self.shared_macs, lambda self, v: setattr(self, "shared_macs", v))


@dataclass
class Rejection:
    root: str  # the fx node the region ends at
    reason: str
    kind: Optional[RejectionKind] = None  # what kind of no (repc.reasons); the reason says it in words
    module: Optional[str] = None  # the module that computed it ("" the model's own forward; None unknown)


@dataclass
class SkippedPart:
    path: str
    reason: str


@dataclass
class ModuleSwap:
    """One module of the user's model replaced in the module-preserving output."""
    path: str  # where, in the user's model ("stages.1.0")
    original: str  # the class that was there
    becomes: str  # what is there now ("Conv2d", "GraphModule (2 ops: Conv2d, ReLU)", "Identity")
    rewrites: List[str] = field(default_factory=list)  # roots of the rewrites it holds
    note: str = ""  # why a larger module than the regions was replaced


@dataclass
class Verification:
    ok: bool
    max_deviation: float
    tolerance: float
    inputs_checked: List[str]
    inputs_skipped: List[str]
    failing_input: Optional[str] = None
    error: Optional[str] = None
    within_noise: List[str] = field(default_factory=list)  # inputs passed by the rounding-noise floor


@dataclass
class Report:
    rewrites: List[Rewrite] = field(default_factory=list)
    rejected: List[Rejection] = field(default_factory=list)
    skipped: List[SkippedPart] = field(default_factory=list)
    verification: Optional[Verification] = None
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    rolled_back: bool = False
    specialized: Dict[str, str] = field(default_factory=dict)  # forward arguments fixed to a value
    front_end: str = ""  # what captured the model: "torch.export", "fx", "fx (in parts)"
    front_ends_declined: Dict[str, str] = field(default_factory=dict)  # front end -> why it was not used
    output: str = "graph"  # what was returned: "module-preserving" (the model's own class), "graph" or
    # "unchanged" (a copy of the model: nothing could be merged, output_note says why)
    output_note: str = ""  # why the graph was returned where the module-preserving output was asked for
    swaps: List[ModuleSwap] = field(default_factory=list)  # the modules replaced in the module-preserving output
    written_in_place: List[str] = field(default_factory=list)  # (in_place=True) merged weights written into the
    # model's own tensors: the rewrites whose merged weight is one

    @property
    def macs_saved(self) -> int:
        """Multiply-adds the rewrites save on the example input."""
        return sum(r.macs_before - r.shared_macs - r.macs_after for r in self.rewrites)

    flops_saved = macs_saved  # (the former name: multiply-adds all along)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["macs_saved"] = self.macs_saved
        for rewrite, written in zip(self.rewrites, d["rewrites"]):
            written["rules"] = [r.value for r in rewrite.rules]
            written["rule"] = rewrite.rule
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def notes(self) -> List[str]:
        """What the table of rewrites does not say: specializations, approximations, the regions
        kept and why, the parts not captured, and the verification."""
        lines = []
        if self.specialized:
            lines.append("  specialized to " + ", ".join(f"{k}={v}" for k, v in self.specialized.items())
                         + " (other values are refused at run time)")
        for r in self.rewrites:
            if r.shape_specialized:
                lines.append(f"  SHAPE-SPECIALIZED {_where(r)} ({describe_region(r)}): valid for the "
                             "example's per-sample shape only")
            if not r.exact:
                lines.append(f"  APPROXIMATE {_where(r)} ({describe_region(r)}): deviation "
                             f"{r.max_deviation:.3g} from the original")
        for where, members in group_by_path(self.rejected, _where, lambda r: r.reason):
            count = f" (×{len(members)})" if len(members) > 1 else ""
            lines.append(f"  kept {where}{count}: {members[0].reason}")
        for name, why in self.front_ends_declined.items():
            lines.append(f"  {name} not used: {why}")
        for s in self.skipped:
            lines.append(f"  not captured {s.path}: {s.reason}")
        v = self.verification
        if v is not None:
            status = "passed" if v.ok else f"FAILED on {v.failing_input}" + (f" ({v.error})" if v.error else "")
            lines.append(f"verification {status}: max deviation {v.max_deviation:.2e} (tolerance {v.tolerance:g}) "
                         f"on inputs {', '.join(v.inputs_checked) or '-'}"
                         + (f"; shapes the model rejects: {', '.join(v.inputs_skipped)}" if v.inputs_skipped else "")
                         + (f"; {', '.join(v.within_noise)} within the original's own rounding noise "
                            "(an ill-conditioned output)" if v.within_noise else ""))
        if self.rolled_back:
            lines.append("all rewrites were rolled back: the returned model computes as the original")
        return lines

    def output_lines(self) -> List[str]:
        """What was returned: the model's own class with modules swapped in, or the graph and why."""
        if self.output == "module-preserving" and not self.rolled_back and self.swaps:
            lines = ["  returned: the model's own class, these modules swapped in:"]
            rows = [("module", "was", "now", "×", "why there")]
            for where, members in group_by_path(self.swaps, lambda s: s.path,
                                                lambda s: (s.original, s.becomes, s.note)):
                s = members[0]
                rows.append((where, s.original, s.becomes, f"×{len(members)}" if len(members) > 1 else "", s.note))
            if not any(row[4] for row in rows[1:]):
                rows = [row[:4] for row in rows]
            return lines + ["  " + line for line in format_table(rows)]
        if self.output == "unchanged":
            return [f"  returned: the model unchanged, nothing merged ({self.output_note})"]
        if self.output == "graph" and self.output_note:
            return [f"  returned: the whole-model graph (a torch.fx.GraphModule): {self.output_note}"]
        what = "the model's own class" if self.output == "module-preserving" else "the whole-model graph"
        return [f"  returned: {what}" + (f" ({self.output_note})" if self.output_note else "")] if self.rewrites else []

    def __str__(self) -> str:
        idle = sum(not r.saves for r in self.rewrites)
        lines = [f"repc: {len(self.rewrites) - idle} rewrite(s)" + (f" (and {idle} that save nothing)" if idle else "")
                 + f"; graph nodes {self.nodes_before} -> {self.nodes_after}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,}; "
                 f"multiply-adds saved {self.macs_saved:,}"
                 + (f"; captured by {self.front_end}" if self.front_end else "")]
        if self.rewrites:
            lines.extend(format_table(rewrite_rows(self.rewrites)))
        return "\n".join(lines + self.output_lines() + self.notes())


RULE_WORDS = {
    MergeRule.COMPOSE: "chained ops composed", MergeRule.SUM: "branches summed",
    MergeRule.CONCAT: "concatenation split into its parts", MergeRule.SELECT: "channel slices",
    MergeRule.DISTRIBUTE: "an op over a concatenation distributed", MergeRule.LAYOUT: "through reshapes and transposes",
    MergeRule.FOLD_PARAMETERS: "weights computed from parameters folded",
    MergeRule.SYNTHESIZE: "read off as one dense map", MergeRule.AVERAGE_EXPERTS: "experts averaged (approximate)",
}


def describe_rules(rules) -> str:
    """``(COMPOSE, SUM)`` -> ``chained ops composed, branches summed`` (none: ``folded``)."""
    return ", ".join(RULE_WORDS[r] for r in rules) or "folded"


_KINDS = [  # (words for a kind of op, names it goes by in a region's list) in the order shown
    ("conv", ("Conv1d", "Conv2d", "Conv3d", "conv1d", "conv2d", "conv3d", "convolution")),
    ("linear", ("Linear", "linear", "addmm", "Conv1D", "mm", "matmul")),
    ("BN", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm")),
    ("avg-pool", ("AvgPool1d", "AvgPool2d", "AvgPool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d")),
    ("pad", ("pad", "ZeroPad2d", "ConstantPad2d")),
    ("scale", ("mul", "div", "truediv", "Mul")),
]


def _kind_of(entry: str) -> str:
    match = re.match(r"^.* \((?P<kind>[^()]*)\)$", entry)
    return match.group("kind") if match else entry


def describe_region(rewrite: Rewrite) -> str:
    """A rewrite in words: ``2 conv + 3 BN branches → one 3×3 conv``."""
    kinds = [_kind_of(e) for e in rewrite.replaced]
    parts = []
    for word, names in _KINDS:
        n = sum(k in names for k in kinds)
        if n:
            parts.append(f"{n} {word}" if n > 1 else word)
    what = " + ".join(parts) or f"{len(kinds)} ops"
    if MergeRule.SUM in rewrite.rules:
        what += " branches"
    results = [r.split("(")[0].strip() for r in rewrite.result]
    if len(results) == 1:
        kernel = re.search(r"k=(\d+(?:x\d+)*)", rewrite.result[0])
        name = {"Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "Linear": "linear", "Dense": "dense map",
                "Elementwise": "scale and shift", "Identity": "nothing (an identity)"}.get(results[0], results[0])
        becomes = f"one {kernel.group(1).replace('x', '×')} {name}" if kernel and name == "conv" else \
            (name if name.startswith("nothing") else f"one {name}")
    else:
        becomes = " + ".join(dict.fromkeys(results)) + f" ({len(results)} inputs)"
    return f"{what} → {becomes}"


def _numbered(path: str) -> Tuple[str, Optional[int]]:
    """``stages.1.7`` -> (``stages.1.{}``, 7): the path with its last number taken out."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i] + ["{}"] + parts[i + 1:]), int(parts[i])
    return path, None


def _ranges(numbers: List[int]) -> str:
    """[0, 1, 2, 5] -> ``0–2,5``."""
    numbers, out, start = sorted(set(numbers)), [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}–{n}")
            start = None
    return ",".join(out)


def group_by_path(items, path_of, same_of) -> List[Tuple[str, list]]:
    """``items`` as (path, items) groups, in order: items alike (``same_of``) at paths that differ
    by one index (``stages.1.0`` ... ``stages.1.13``) are one group, written ``stages.1.0–13``."""
    groups: Dict[Tuple, list] = {}
    for item in items:
        pattern, number = _numbered(path_of(item))
        key = (pattern if number is not None else path_of(item), same_of(item))
        groups.setdefault(key, []).append(item)
    out = []
    for (pattern, _), members in groups.items():
        if len(members) == 1:
            out.append((path_of(members[0]), members))
        else:
            out.append((pattern.replace("{}", _ranges([_numbered(path_of(m))[1] for m in members])), members))
    return out


def _where(r) -> str:
    """Where a rewrite or a rejection is: its module's path, the node where no module is known."""
    return r.root if r.module is None else r.module or "<model>"


def group_rewrites(rewrites: List[Rewrite]) -> List[Tuple[str, List[Rewrite]]]:
    """The rewrites as (module, rewrites) groups, in order: the same rewrite (same words, counts and
    parameters) in blocks that differ by one index is one group (``stages.1.0–13``)."""
    return group_by_path(rewrites, _where, lambda r: (describe_region(r), r.rule, r.params_before, r.params_after,
                                                      r.macs_before - r.shared_macs, r.macs_after, r.exact,
                                                      r.shape_specialized))


def rewrite_rows(rewrites: List[Rewrite]) -> List[Tuple[str, ...]]:
    """The table of rewrites: a header, then one row per module (identical blocks grouped)."""
    rows = [("module", "what", "how", "×", "params", "MACs", "max dev")]
    for where, members in group_rewrites(rewrites):
        r = members[0]
        n = len(members)
        rows.append((where, describe_region(r), describe_rules(r.rules), f"×{n}" if n > 1 else "",
                     f"{r.params_before:,} -> {r.params_after:,}",
                     f"{r.macs_before - r.shared_macs:,} -> {r.macs_after:,}",
                     f"{max(m.max_deviation for m in members):.1e}"))
    return rows


def format_table(rows) -> List[str]:
    """Rows of strings as aligned columns, a rule under the first (the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


HEAVY_OPS = {"linear", "conv1d", "conv2d", "conv3d", "addmm", "mm", "bmm", "matmul", "baddbmm"}
NORM_OPS = {"layer_norm", "batch_norm", "group_norm"}
HEAVY_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_MODULES = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


def op_counts(module: nn.Module) -> Tuple[int, int]:
    """(heavy ops, norm layers) the fx graphs inside ``module`` run, as module calls or as
    functional calls: how a fused model compares with the model's own conversion."""
    heavy = norms = 0
    for gm in (m for m in module.modules() if isinstance(m, fx.GraphModule)):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                heavy += isinstance(mod, HEAVY_MODULES)
                norms += isinstance(mod, NORM_MODULES)
            elif node.op in ("call_function", "call_method"):
                name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                name = name.split(".")[0]
                heavy += name in HEAVY_OPS
                norms += name in NORM_OPS
    return heavy, norms
