"""What repc did to a model: rewrites, regions kept and why, parts not captured, verification."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from .reasons import RejectionKind


@dataclass
class Rewrite:
    rule: str  # the local rules that built the region: compose, sum, concat, select
    root: str  # the value the merged op now computes
    replaced: List[str]  # the original nodes / modules of the region
    result: List[str]  # the merged op(s), one per source
    params_before: int
    params_after: int
    flops_before: int  # multiply-adds on the example input
    flops_after: int
    exact: bool = True
    max_deviation: float = 0.0  # measured against the region as written
    shape_specialized: bool = False  # valid only for the example's per-sample shape
    shared_flops: int = 0  # of flops_before, what an earlier rewrite's region already counted


@dataclass
class Rejection:
    root: str
    reason: str
    kind: Optional[RejectionKind] = None  # what kind of no (repc.reasons); the reason says it in words


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
    output: str = "graph"  # what was returned: "module-preserving" (the model's own class) or "graph"
    output_note: str = ""  # why the graph was returned where the module-preserving output was asked for
    swaps: List[ModuleSwap] = field(default_factory=list)  # the modules replaced in the module-preserving output

    @property
    def flops_saved(self) -> int:
        return sum(r.flops_before - r.shared_flops - r.flops_after for r in self.rewrites)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["flops_saved"] = self.flops_saved
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
                lines.append(f"  SHAPE-SPECIALIZED {r.root} ({r.rule}): valid for the example's per-sample shape only")
            if not r.exact:
                lines.append(f"  APPROXIMATE {r.root} ({r.rule}): deviation {r.max_deviation:.3g} from the original")
        for r in self.rejected:
            lines.append(f"  kept {r.root}: {r.reason}")
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

    def __str__(self) -> str:
        lines = [f"repc: {len(self.rewrites)} rewrite(s); graph nodes {self.nodes_before} -> {self.nodes_after}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,}"
                 + (f"; captured by {self.front_end}" if self.front_end else "")]
        if self.rewrites:
            rows = [("root", "rule", "replaced", "params", "MACs", "max dev")]
            for r in self.rewrites:
                rows.append((r.root, r.rule, str(len(r.replaced)) + " ops",
                             f"{r.params_before:,} -> {r.params_after:,}",
                             f"{r.flops_before:,} -> {r.flops_after:,}", f"{r.max_deviation:.1e}"))
            lines.extend(format_table(rows))
        return "\n".join(lines + self.notes())


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
