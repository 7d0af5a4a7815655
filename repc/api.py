"""``repc.compile``: the Python front door over capture -> normalize -> collapse -> verify."""

from __future__ import annotations

import contextlib
import copy
import math
import gc
import warnings
import inspect
import numbers
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .capture import CaptureError, python_state_kept, split_untraceable, trace
from .capture_export import GUARD_WORDS, export_graph, register_output_dataclasses
from .graph_predicates import short_error as _short
from .latency import latency_model
from .passes.average_experts import average_experts
from .passes.collapse import CaptureMismatch, collapse
from .passes.cost import LatencyCost, MacCost, MeasuredCost
from .progress import Phases, wanted
from .preserve import (InputGuards, PreserveError, Provenance, base_of_peft, calls_recorded, is_peft, is_peft_layer,
                       own_copies, preserve, runs_graph_code, snapshot, varying_scopes)
from .reasons import MergeRule, RejectionKind
from .report import Rejection, Report, Rewrite, SkippedPart, Verification
from .values import without_opaque
from .verify.calls import canonical_calls, observe
from .verify.check import (compare, compare_calls, deviation, output_dtype, tolerance as dtype_tolerance,
                           variants_with_references)


class ReparamError(ValueError):
    """The model or the example inputs cannot be compiled as given."""


def _cost_model(cost: str, model: nn.Module):
    """The collapse pass's cost model for ``cost`` (see :mod:`repc.passes.cost`), for the model's
    device and dtype."""
    if cost == "macs":
        return MacCost()
    if cost == "measure":
        return MeasuredCost()
    tensor = next(iter(model.parameters()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    return LatencyCost(latency_model(device, dtype), torch.empty((), dtype=dtype).element_size())


def _training_modules(model: nn.Module):
    return [name or "<model>" for name, m in model.named_modules() if m.training]


FRONT_ENDS = ("auto", "export", "fx")

# What ``repc.compile`` returns when ``graph`` is not given: the module-preserving output (the
# user's own model with the fused modules swapped in), not the whole-model GraphModule.
GRAPH_BY_DEFAULT = False
COSTS = ("macs", "latency", "measure")


def compile(model: nn.Module, example_inputs: Any = (), kwargs: Optional[Dict[str, Any]] = None, *,
            verify: bool = True, tolerance: Optional[float] = None, specialize: Optional[Dict[str, Any]] = None,
            allow_approximate: bool = False, approximate_tolerance: Optional[float] = None,
            front_end: str = "auto", graph: Optional[bool] = None, progress: Optional[bool] = None,
            cost: str = "macs", in_place: bool = False) -> nn.Module:
    """Return a new module computing ``model``'s function with its affine regions merged.

    The result is the user's own model, copied, each fused region replaced at the module that
    computed it (a RepVGG block by a module of its merged conv and activation, a LoRA linear by a
    plain ``nn.Linear``, a BatchNorm folded into its conv by ``nn.Identity``): class, methods,
    attributes and untouched modules stay (:mod:`repc.preserve`).  A PEFT model comes back as its
    base model with the merged weights, as ``merge_and_unload`` gives it.  ``graph=True`` returns
    the whole-model ``torch.fx.GraphModule`` instead; so does the default (``graph=None``, or
    ``graph=False``) where the fused graph cannot be written back
    into the model's modules, or where the model so written fails the same verification as the
    graph (``report.output`` and ``report.output_note`` say which).

    ``cost`` decides which merges pay: ``"macs"`` (multiply-adds, the default), ``"latency"``
    (a latency model of the machine, calibrated once per device and dtype and cached:
    :mod:`repc.latency`), or ``"measure"`` (each candidate timed on the example: slower to
    compile, and only as steady as the machine).

    ``progress``: a bar over the phases (capture and fuse, verify, write back) on long compiles,
    on stderr where it is a terminal; ``False`` turns it off.

    ``example_inputs`` is a tuple of positional inputs (a single tensor is accepted) and
    ``kwargs`` the keyword inputs (``input_ids=..., attention_mask=...``).  The model must be
    in eval mode; it is never modified.

    ``front_end`` chooses how the model is captured: ``"export"`` (``torch.export``, the model's
    Python run as Python), ``"fx"`` (fx symbolic tracing, in parts where the whole does not
    trace), or ``"auto"``: fx where it captures the whole model, else export, else fx in
    parts (also where export's graph holds for fewer inputs than the model accepts).  The
    report says which captured what and why another was not used.

    ``verify`` checks the result against the original on the example and on random inputs of
    other batch and spatial sizes; a result that fails is rolled back.  The report is in
    ``result.repc_report``.

    Non-tensor example inputs (a task id, a flag) are constants the result is specialized to,
    and so are the forward arguments named in ``specialize`` (tensors too): gates computed from
    them fold away.  The result refuses other values at run time.

    ``in_place=True`` consumes the model, as PEFT's ``merge_and_unload`` does: each merged weight
    that replaces one weight of the model (a LoRA layer's base weight) is written into that
    tensor once its region is checked, and the result shares every tensor with the model, so
    the compile needs little memory beyond the model's.  The model given is no longer valid
    afterwards (its layers hold merged weights); use the result.  The whole-model check then
    compares with the outputs the model gave before (no rounding-noise floor), and a result
    that fails it raises :class:`ReparamError` instead of being rolled back.

    ``allow_approximate=True`` also averages mixtures of identical nonlinear experts into one
    expert (Experts Weights Averaging).  That changes the function: the report marks it
    approximate with the deviation measured against the original, and with
    ``approximate_tolerance`` an averaging that deviates more is not applied.
    """
    enabled = gc.isenabled()
    gc.disable()  # the graphs built here are webs of objects that all die together at the end
    phases = Phases(["capture and fuse", "verify", "write back into the model's modules"], wanted(progress))
    try:
        return Compilation(model, example_inputs, dict(kwargs or {}), verify, tolerance, specialize,
                           allow_approximate, approximate_tolerance, front_end,
                           GRAPH_BY_DEFAULT if graph is None else graph, phases, cost, in_place).run()
    finally:
        phases.close()
        if enabled:
            gc.enable()


class Compilation:
    """One call of :func:`compile`, as named stages, each a method:

    * **call** (``__init__``): the arguments checked, the model observed on the example and on
      the calls users make (:func:`repc.verify.calls.observe`: the references of the checks,
      and the modules whose forward stays the model's code);
    * **build** (:meth:`build`): capture and fuse, one graph (:func:`_build`);
    * **place** (:meth:`place`): the fused graph written back into a copy of the model's modules,
      built again with regions kept inside modules where some spanned modules no swap expresses;
    * **verify** (:meth:`check`): the result against the model, on the example, random inputs of
      other sizes and the calls users make;
    * **finish** (:meth:`finish`): what is returned and what the report counts and says.

    :meth:`run` runs them; a build whose result fails is built again as the failure asks (a
    dense map read off by probing, an export graph that holds for fewer inputs than the model
    accepts), and a result that still fails is rolled back (:meth:`verified_build`)."""

    def __init__(self, model, example_inputs, kwargs, verify, tolerance, specialize, allow_approximate,
                 approximate_tolerance, front_end, graph=False, phases: Optional["Phases"] = None, cost: str = "macs",
                 in_place: bool = False):
        self.phases = phases or Phases([], False)
        if in_place and (graph or allow_approximate):
            raise ReparamError("in_place=True writes merged weights into the model and returns the model's own class: "
                               "not with graph=True, nor with allow_approximate")
        if cost not in COSTS:
            raise ReparamError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
        if not isinstance(model, nn.Module):
            raise ReparamError(f"repc.compile expects an nn.Module, got {type(model).__name__}")
        if front_end not in FRONT_ENDS:
            raise ReparamError(f"front_end must be one of {', '.join(FRONT_ENDS)}, got {front_end!r}")
        if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        example_inputs = _with_specialized_values(model, tuple(example_inputs), specialize)
        training = _training_modules(model)
        if training:
            raise ReparamError(
                f"the model is in training mode ({', '.join(training[:3])}{'...' if len(training) > 3 else ''}): "
                "call model.eval() first; merging BatchNorm is only valid with its running statistics")
        self.model, self.example_inputs, self.kwargs = model, example_inputs, kwargs
        self.verify, self.tolerance, self.graph, self.in_place, self.front_end = verify, tolerance, graph, in_place, \
            front_end
        # the model run on the example and the calls users make (masks all ones or padded, inputs
        # left out, other sizes): the references of the check, and the modules whose forward stays
        # the model's code (called otherwise there, or given a cache they update), which no region
        # spans; and, on the example's run, each module's call, for placement (the whole-model graph
        # asked for places nothing), recorded before the compile writes into the model (in_place)
        self.recorded = {} if not graph else None
        # (kept up to a quarter of the weights' bytes, or 64 MiB: a net of large maps would hold
        # its modules' inputs and outputs through the build beside its values, so placement runs
        # the model once more for them instead; not in_place, whose model then holds merged weights)
        budget = None if in_place else \
            max(RECORDS_FLOOR, RECORDS_KEPT * sum(p.numel() * p.element_size() for p in model.parameters()))
        record = (lambda: calls_recorded(model, self.recorded, budget)) if not graph else contextlib.nullcontext
        try:
            with python_state_kept(model):  # (the calls at other sizes leave the model as it was)
                self.observed = observe(model, canonical_calls(model, example_inputs, kwargs), around_example=record)
        except Exception as why:
            raise ReparamError(f"the model fails on the example inputs: {_short(why)}") from why
        self.expected = self.observed.calls[0].reference
        self.recorded = self.recorded or None  # (empty: past its budget, recorded again at placement)
        register_output_dataclasses(self.expected)  # so that captures and checks see into ``Output(logits=...)``
        if tolerance is not None:
            _check_tolerance(tolerance, model, self.expected)
        positional = _as_positional(model, example_inputs, kwargs)
        constants = _specialized_arguments(model, positional if positional is not None else example_inputs,
                                           specialize)
        self.fixed = _positions(model, constants)
        self.build_args = dict(model=model, example_inputs=example_inputs, kwargs=kwargs, positional=positional,
                               constants=constants, fixed=self.fixed, expected=self.expected,
                               allow_approximate=allow_approximate, approximate_tolerance=approximate_tolerance,
                               front_end=front_end, specialize=specialize, cost_model=_cost_model(cost, model),
                               captures={}, varying={} if graph else self.observed.varying)
        self.varying = self.observed.varying
        if in_place:  # (what the checks read off the model, taken before anything is written)
            self.build_args["write_into"] = _writable_storages(model)
        self.check_inputs, self.as_flat = _flat_calling(example_inputs, kwargs)
        # the inputs held as given: the specialized positions, or among flat leaves the non-tensors
        self.held = self.fixed if not kwargs else \
            {i for i, v in enumerate(self.check_inputs) if not isinstance(v, torch.Tensor)}
        self.variants = None
        if in_place and verify:  # the original's outputs on the check's inputs, before the compile writes into it
            skipped: list = []
            with python_state_kept(model):
                self.variants = (variants_with_references(self.as_flat(model), self.check_inputs, self.held,
                                                          skipped), skipped)

    # -- stages -------------------------------------------------------------------------------
    def build(self, **overrides):
        """Capture and fuse: (the fused graph or module, its report, the reference it fuses).  The
        model's Python state and buffers are put back after (a captured graph holds the model's
        own buffers, and runs on the example may write them); merged weights written into its
        parameters (``in_place``) stay."""
        with python_state_kept(self.model):
            return _build(**{**self.build_args, **overrides})

    def place(self, fused, report, reference, build_args):
        """The module-preserving copy where it applies: (copy, swaps, report, reference, confined)
        candidates in the order they are tried (a build confined to module scopes first, where
        the first copy left regions out), each not yet verified; none where the fused result is
        already the output (fx in parts, or graph=True)."""
        model, in_place = self.model, self.in_place
        with self.phases.step("write back into the model's modules"):
            written = _write_back(fused, model, report, reference, self.example_inputs, self.kwargs,
                                  self.phases.enabled, varying=self.varying, recorded=self.recorded, in_place=in_place)
        with self.phases.step("capture and fuse"):  # (the write-back of the rebuild counts here)
            # (not once the model was written into: a rebuild would read merged weights)
            confined = None if in_place else \
                _confined_copy(written, lambda scopes: self.build(**build_args, confine=scopes), model,
                               self.example_inputs, self.kwargs, self.phases.enabled, self.varying,
                               first_applied=_applied(written, report), recorded=self.recorded)
        candidates = []
        if confined is not None:
            copy_, swaps, confined_report, confined_reference = confined
            candidates.append((copy_, swaps, confined_report, confined_reference, True))
        if written is not None and written[0] is not None:
            candidates.append((written[0], written[1], report, reference, False))
        return candidates

    def check(self, fused, reference, whole_graph: bool = False):
        """``fused`` against the model: the example (whose reference was computed when the model
        was observed), random inputs of other sizes, then the calls users make."""
        model, in_place = self.model, self.in_place
        # (the calls at other sizes leave both as they were: Swin keeps a window size lowered on a small input)
        with python_state_kept(model), python_state_kept(fused):
            result = compare(self.as_flat(fused), None if in_place else self.as_flat(reference), self.check_inputs,
                             self.tolerance, self.held, expected=self.expected if reference is model else None,
                             variants=self.variants, beyond=self.sizes_outside_the_graph())
            if reference is not model:
                return result  # (expert averaging: the reference is the averaged graph)
            # (a whole-model graph asked for takes every input of the example: calls that leave one out are skipped)
            return compare_calls(fused, None if in_place else model, self.observed.calls, result, self.tolerance,
                                 structure_kept=whole_graph)

    def sizes_outside_the_graph(self) -> List[Tuple[int, int, int]]:
        """(flat input, axis, size) just outside the sizes the model's export holds for (the other
        side of a test on a size the example took): the check tries them, whatever front end the
        result came from."""
        capture = self.build_args["captures"].get("export")
        return list(getattr(capture, "sizes_outside", ()))

    def verified_output(self, fused, report, reference, build_args):
        """The output to return, verified, with its report: the module-preserving copy where it
        applies and passes (built again with regions kept inside modules where some spanned
        modules no swap expresses), else the graph (one whole-model check where a copy passes)."""
        if not self.graph and isinstance(fused, fx.GraphModule):
            for copy_, swaps, copy_report, copy_reference, confined in self.place(fused, report, reference,
                                                                                  build_args):
                with self.phases.step("verify"):
                    result = self.check(copy_, copy_reference)
                if result.ok:
                    _accept_copy(copy_report, swaps, confined=confined)
                    return copy_, copy_report, result
                if not confined:
                    report.output_note = _copy_failed(result)
        with self.phases.step("verify"):
            return fused, report, self.check(fused, reference, whole_graph=self.graph)

    def verified_build(self, build_args):
        """Build, place and verify; where the result fails and the build read a dense map off by
        probing (it fits the example's size only), built again without."""
        with self.phases.step("capture and fuse"):
            fused, report, reference = self.build(**build_args, synthesize=True)
        fused, report, result = self.verified_output(fused, report, reference, dict(build_args, synthesize=True))
        dense = [r.root for r in report.rewrites if r.shape_specialized]
        if not result.ok and dense and not report.written_in_place:
            # a map read off by probing fits the example's size; the model accepts others
            fused, report, reference = self.build(**build_args, synthesize=False)
            fused, report, result = self.verified_output(fused, report, reference,
                                                         dict(build_args, synthesize=False))
            report.rejected.extend(Rejection(root, "rolled back: the dense map read off this region fits the "
                                                   "example's per-sample size only, and the model accepts others",
                                             RejectionKind.CHECK_FAILED)
                                   for root in dense)
        return fused, report, reference, result

    def run(self) -> nn.Module:
        """The stages in order; the result (see :func:`compile`)."""
        if not self.verify:
            with self.phases.step("capture and fuse"):
                fused, report, reference = self.build(synthesize=True)
            with self.phases.step("write back into the model's modules"):
                fused, report = _module_preserving(
                    fused, self.model, report, reference, self.graph, self.example_inputs, self.kwargs,
                    self.expected, self.tolerance, self.phases.enabled,
                    rebuild=None if self.in_place else lambda scopes: self.build(synthesize=True, confine=scopes),
                    varying=self.varying, recorded=self.recorded, in_place=self.in_place)
            return self.finish(fused, report)
        fused, report, reference, result = self.verified_build({})
        if not result.ok and report.front_end == "torch.export" and GUARD_WORDS in (result.error or "") \
                and self.front_end == "auto" and not report.written_in_place:
            # export's graph holds for fewer inputs than the model accepts (a branch on a size, a
            # size-1 axis): the fx front end captures what holds for all of them
            refused = f"on the {result.failing_input} input, which the model accepts, {result.error}"
            fused, report, reference, result = self.verified_build(dict(front_end="fx"))
            report.front_ends_declined["torch.export"] = refused
        report.verification = Verification(result.ok, result.max_deviation, result.tolerance, result.checked,
                                           result.skipped, result.failing_input, result.error, result.within_noise)
        if not result.ok and report.written_in_place:
            raise ReparamError(
                f"in_place=True: the result failed verification on the {result.failing_input} input "
                f"({(result.error or '').splitlines()[0][:200] or f'deviation {result.max_deviation:.3g}'}) after "
                f"{len(report.written_in_place)} merged weight(s) were written into the model, which is no longer "
                "valid: reload it and compile without in_place")
        if not result.ok:
            # a miscompile that slipped past the per-region checks: never return it
            fused = copy.deepcopy(self.model)
            report.rolled_back = True
            for r in report.rewrites:
                report.rejected.append(Rejection(r.root, "rolled back: whole-model verification failed",
                                                 RejectionKind.CHECK_FAILED))
            report.rewrites = []
            report.nodes_after = report.nodes_before
        if isinstance(fused, fx.GraphModule):
            _write_back(fused, self.model, report, reference, self.example_inputs, self.kwargs, False,
                        modules_only=True)
        else:
            report.output = "module-preserving"  # (the verified copy, fx in parts, or rolled back: the model's class)
        return self.finish(fused, report)

    def finish(self, fused: nn.Module, report: Report) -> nn.Module:
        """The result as returned: sharing nothing with the model (unless compiled in place), its
        report's parameter count, the warnings it owes, in eval mode."""
        model = self.model
        if isinstance(fused, fx.GraphModule) and not self.in_place:
            own_copies(fused, model)  # the graph is the output: it shares nothing with the model
        # parameters, plus the tensors repc registered as buffers (merged scales, norm affines)
        original_buffers = {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()}
        report.params_after = sum(p.numel() for p in fused.parameters()) + \
            sum(b.numel() for n, b in fused.named_buffers()
                if n.rsplit(".", 1)[-1] not in original_buffers and b.is_floating_point())
        _say_if_unchanged(report)
        _say_if_adapters_left(fused, report)
        fused.repc_report = report
        return fused.eval()  # like the model: new GraphModules start in training mode


class UnchangedWarning(UserWarning):
    """repc returns the model's function unmerged: every rewrite rolled back, or the model not
    captured as a whole and nothing merged in its parts."""


def _say_if_unchanged(report: Report) -> None:
    """A result that merges nothing because something failed is said so (``report.output`` is
    then "unchanged", and a warning names the cause), never returned as if it were fused."""
    if report.rolled_back:
        v = report.verification
        why = f"verification failed on the {v.failing_input} input" if v is not None and v.failing_input else \
            "verification failed"
        if v is not None and v.error:
            why += f" ({v.error.splitlines()[0][:200]})"
    elif not report.rewrites and any(s.path == "<model>" for s in report.skipped):
        why = "the model could not be captured as a whole (" + \
              next(s.reason for s in report.skipped if s.path == "<model>").splitlines()[0][:200] + ")"
        declined = "; ".join(f"{k}: {v.splitlines()[0][:200]}" for k, v in report.front_ends_declined.items())
        why += f"; {declined}" if declined else ""
    else:
        return
    report.output = "unchanged"
    report.output_note = why
    warnings.warn(f"repc: the model is returned unchanged (a copy, nothing merged): {why}", UnchangedWarning,
                  stacklevel=3)


class AdaptersLeftWarning(UserWarning):
    """repc returns a PEFT model with adapter layers not merged into their base layers: its
    ``save_pretrained`` writes the adapter only, as the PEFT model it still is."""


def _say_if_adapters_left(fused: nn.Module, report: Report) -> None:
    """A PEFT model returned with adapter layers as written is said so with a warning: the user
    asked for a plain model and would otherwise save an adapter believing it merged."""
    left = adapter_layers_left(fused)
    if left and report.output != "unchanged":
        where = ", ".join(f"{path} ({cls})" for path, cls in left[:3]) + (f" and {len(left) - 3} more"
                                                                            if len(left) > 3 else "")
        warnings.warn(f"repc: the adapter is left unmerged in {len(left)} layer(s), {where}: the PEFT model is "
                      "returned with them as written (its save_pretrained saves an adapter)", AdaptersLeftWarning,
                      stacklevel=3)


def adapter_layers_left(model: nn.Module) -> List[Tuple[str, str]]:
    """(path, class) of each outermost PEFT layer in ``model`` (LoRA's ``peft.Linear``, a
    ``ModulesToSaveWrapper``), not counting the PEFT model and tuner that wrap the base model;
    none where peft is not imported."""
    if sys.modules.get("peft.tuners.tuners_utils") is None:
        return []
    left: List[Tuple[str, str]] = []
    for path, m in model.named_modules():
        if is_peft_layer(m) and not any(path.startswith(p + ".") for p, _ in left):
            left.append((path, _short_class(m)))
    return left


# the module calls recorded on the example are kept for placement up to this fraction of the
# weights' bytes, or up to this many bytes
RECORDS_KEPT, RECORDS_FLOOR = 0.25, 64 * 2 ** 20


def _write_back(fused: nn.Module, model: nn.Module, report: Report, reference, args, kwargs,
                progress: bool = False, modules_only: bool = False, varying: Optional[Dict[str, str]] = None,
                recorded=None, in_place: bool = False):
    """The module-preserving copy of the model with ``fused``'s regions swapped in, not yet
    verified, its swaps, and the module scopes of the regions no swap applied (for a build
    confined to them: :meth:`Provenance.module_scopes`; empty where all applied); None (and the reason in
    ``report.output_note``) where it does not apply.  Names each rewrite's module in the report
    either way (``modules_only``: only that).  ``varying``: the modules whose forward stays the
    model's code (:func:`repc.verify.calls.observe`), which are not replaced.  ``recorded``: the
    model's module calls on the example, recorded when it was observed (before the compile
    wrote into it, ``in_place``: the copy then shares the model's tensors)."""
    source = fused.meta.pop("repc_source", None) if isinstance(fused, fx.GraphModule) else None
    report.output = "graph" if isinstance(fused, fx.GraphModule) else "module-preserving"
    provenance, unplaced = None, "no captured graph to write back"
    if source is not None:  # each rewrite's and rejection's module, for the report (whichever output is returned)
        try:
            provenance = Provenance(source["source"], source["prefix"], source["captured"], fused)
            modules, computed_by = provenance.region_paths(report.rewrites), provenance.computed_by()
        except Exception as why:  # (the report then names the fx nodes)
            provenance, modules, computed_by = None, {}, {}
            unplaced = f"the fused graph could not be written back into the model's modules ({_short(why)})"
        for r in report.rewrites:
            r.module = modules.get(r.root, r.module)
        for r in report.rejected:
            r.module = computed_by.get(r.root, r.module)
    if modules_only or not isinstance(fused, fx.GraphModule):
        return None  # (fx in parts, or rolled back: already the model's own class)
    if provenance is None or reference is not model:
        report.output_note = "expert averaging: its reference is the averaged graph" if reference is not model \
            else unplaced
        return None
    try:
        preserved, swaps = preserve(model, fused, args=args, kwargs=kwargs, rewrites=report.rewrites,
                                    progress=progress, varying=varying, recorded=recorded, in_place=in_place,
                                    provenance=provenance,
                                    **source)
    except PreserveError as why:
        report.output_note = str(why)
        # no copy; a build confined to modules may still give one
        scopes = provenance.module_scopes(report.rewrites, set(why.left_out)) if why.left_out else {}
        return (None, None, scopes) if scopes else None
    except Exception as why:  # a case the write-back does not handle: the graph is still a verified result
        report.output_note = f"the fused graph could not be written back into the model's modules ({_short(why)})"
        return None
    base = base_of_peft(preserved)
    if base is not None:  # the merged base model, as merge_and_unload gives it; paths then as in it
        at = next(name for name, m in preserved.named_modules() if m is base)
        for s in swaps:
            s.path = s.path[len(at) + 1:] if s.path.startswith(at + ".") else s.path
            s.note = s.note.replace(at + ".", "")
        for r in report.rewrites + report.rejected:
            r.module = r.module[len(at) + 1:] if r.module and r.module.startswith(at + ".") else r.module
    left_out = {root for s in swaps if s.becomes == "not applied" for root in s.rewrites}
    scopes = provenance.module_scopes(report.rewrites, left_out) if left_out else {}
    if base is not None:
        left = sorted({_short_class(m) for m in base.modules() if is_peft(m)})
        if left:  # the PEFT model itself then, with the merges that apply (not a base model with adapters)
            report.output_note = f"{', '.join(left)} layers not merged (no swap of a module expresses their " \
                                 "merge): the PEFT model is returned with the merges that apply"
        else:
            preserved = base.eval()
    guards = fused.meta.get("repc_guards")
    if guards and runs_graph_code(preserved, model):
        # parts of export's graph hold where its guards do (the branch of a test on a size the
        # example took, in a module whose forward is now its part): the copy refuses the rest, as
        # the whole-model graph does
        checked = InputGuards.made(preserved, guards, source["flat_inputs"], args, kwargs)
        if checked is None:
            report.output_note = "export's conditions on the inputs could not be placed on the model's arguments, " \
                                 "which the modules running parts of its graph need: the whole-model graph is returned"
            return None
        preserved.register_forward_pre_hook(checked, with_kwargs=True)
    return preserved, swaps, scopes


def _confined_copy(written, rebuild, model: nn.Module, args, kwargs, progress: bool, varying=None,
                   rounds: int = 3, first_applied: int = 0, recorded=None):
    """Where the written-back copy (``_write_back``'s result) left regions out that span modules
    no swap expresses: the model built again by ``rebuild(scopes)`` with those regions kept
    inside modules, written back, as (copy, swaps, its report, its reference) when it applies
    more rewrites (or as many, leaving fewer out); else None.  A confined build that still leaves some out gives their
    scopes in turn (a LoRA merge and the scale its attention applies after it, placed at the
    attention first, then kept inside the LoRA layer): up to ``rounds`` builds, each kept only
    while it does better so than the build before (``first_applied``: how many ``written``
    applies).  Not yet verified."""
    best, scopes, current, current_applied = None, {}, written, first_applied
    for _ in range(rounds):
        if current is None or not current[2]:
            break
        scopes = {**scopes, **current[2]}  # (a later round's scope of a node is the narrower one)
        fused, report, reference = rebuild(scopes)
        rewritten = _write_back(fused, model, report, reference, args, kwargs, progress, varying=varying,
                                recorded=recorded)
        if rewritten is None:
            break
        if rewritten[0] is None:  # (still no copy: the regions it left out are kept finer in the next round)
            current = rewritten
            continue
        applied = len(report.rewrites) - _left_out(rewritten[1])
        # (kept while it applies more: a build cut finer can leave fewer out by merging less)
        if applied < current_applied or (applied == current_applied and
                                         _left_out(rewritten[1]) >= _left_out(current[1])):
            break
        best = (rewritten[0], rewritten[1], report, reference)
        current, current_applied = rewritten, applied
    return best


def _applied(written, report: Report) -> int:
    """How many of ``report``'s rewrites the written-back copy (``_write_back``'s result) applies."""
    if written is None or written[1] is None:
        return 0
    return len(report.rewrites) - int(_left_out(written[1]))


def _left_out(swaps) -> float:
    """How many rewrites the copy leaves out (no swap of a module expresses them); all (inf)
    where there is no copy (``swaps`` None)."""
    return math.inf if swaps is None else sum(len(s.rewrites) for s in swaps if s.becomes == "not applied")


def _accept_copy(report: Report, swaps, confined: bool = False) -> None:
    """The verified copy is returned: the report says so and lists its swaps (``confined``: of
    a build whose regions were kept inside modules)."""
    report.output, report.swaps = "module-preserving", swaps
    if _left_out(swaps):
        report.output_note = f"{_left_out(swaps)} rewrite(s) not applied in the model's own " \
                             "modules, which no swap of a module expresses (graph=True applies them all)"
    elif confined:
        spanning = sum(r.kind is RejectionKind.MODULE_BOUNDARY for r in report.rejected)
        report.output_note = f"{f'{spanning} region(s)' if spanning else 'Regions'} spanning modules merged inside " \
                             "each module instead, so that " \
                             "the model keeps its modules (graph=True merges them whole)"


def _copy_failed(result) -> str:
    why = f"on the {result.failing_input} input: {result.error or ''} max deviation {result.max_deviation:.3g}"
    return f"the model with the fused modules swapped in failed verification ({why.strip()}); " \
           "the whole-model graph is returned"


def _module_preserving(fused: nn.Module, model: nn.Module, report: Report, reference, graph: bool, args, kwargs,
                       expected, tolerance, progress: bool = False, rebuild=None, varying=None, recorded=None,
                       in_place: bool = False):
    """With ``verify=False``: (the output, its report): the module-preserving copy where it
    applies and computes the graph's output on the example (built again by ``rebuild(scopes)``
    with regions kept inside modules where some spanned modules no swap expresses), else
    ``fused`` (the whole-model graph) with the reason in ``report.output_note``.  (Verified
    compiles write back inside their verification.)"""
    def deviates(candidate) -> Optional[float]:
        with torch.no_grad():
            dev = deviation(candidate(*args, **kwargs), expected)
        return dev if dev > (tolerance or dtype_tolerance(output_dtype(expected))) else None

    written = _write_back(fused, model, report, reference, args, kwargs, progress, modules_only=graph, varying=varying,
                          recorded=recorded, in_place=in_place)
    if written is None:
        return fused, report
    confined = _confined_copy(written, rebuild, model, args, kwargs, progress, varying,
                              first_applied=_applied(written, report), recorded=recorded) \
        if rebuild is not None else None
    if confined is not None and deviates(confined[0]) is None:
        _accept_copy(confined[2], confined[1], confined=True)
        return confined[0], confined[2]
    preserved, swaps, _ = written
    if preserved is None:
        return fused, report
    dev = deviates(preserved)
    if dev is not None:
        report.output_note = f"the model with the fused modules swapped in failed verification (deviation " \
                             f"{dev:.3g} on the example); the whole-model graph is returned"
        return fused, report
    _accept_copy(report, swaps)
    return preserved, report


def _short_class(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _check_tolerance(tolerance, model: nn.Module, expected) -> None:
    """Refuse a tolerance no result can meet: below the rounding (eps) of the least precise
    floating dtype among the model's output, parameters and buffers."""
    floats = [t.dtype for t in tree_leaves(expected) + list(model.parameters())
              + list(model.buffers()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    dtype = max(floats, key=lambda d: torch.finfo(d).eps, default=torch.float32)
    eps, name = torch.finfo(dtype).eps, str(dtype).replace("torch.", "")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or tolerance != tolerance:
        raise ReparamError(f"tolerance must be a number (at least {eps:.3g}, the rounding of {name}), "
                           f"got {tolerance!r}")
    if tolerance < eps:
        raise ReparamError(f"tolerance {tolerance:g} is below the rounding of {name} (eps {eps:.3g}): "
                           f"no result can be verified that closely; use at least {eps:.3g}")


def _build(model, example_inputs, kwargs, positional, constants, fixed, expected, allow_approximate,
           approximate_tolerance, synthesize: bool, front_end: str, specialize, cost_model=None, confine=None,
           captures: Optional[dict] = None, varying: Optional[Dict[str, str]] = None, write_into=None):
    """Capture and fuse ``model``: (the fused module, its report, the reference it must equal).

    ``positional`` is the example as positional inputs only (None where keyword inputs cannot
    be passed by position), what the fx front end needs.  ``confine``: see :func:`collapse`;
    ``varying``: the modules whose forward stays the model's code, which no region spans
    (:func:`repc.preserve.varying_scopes`).
    ``captures`` keeps the model's export between builds of one compile (each fuses a fresh copy).
    ``write_into``: the storages of the model's tensors merged weights may be written into
    (``in_place``; see :func:`collapse`)."""
    report = Report()
    report.params_before = sum(p.numel() for p in model.parameters())
    traced = dict(model=model, example_inputs=positional, constants=constants, fixed=fixed, expected=expected,
                  allow_approximate=allow_approximate, approximate_tolerance=approximate_tolerance,
                  synthesize=synthesize, report=report, cost_model=cost_model, confine=confine, varying=varying,
                  write_into=write_into)
    with torch.no_grad():
        export_next = _export_applies(front_end, allow_approximate, specialize, example_inputs, kwargs)
        if front_end != "export" and positional is not None:
            # fx first where it captures the whole model: its graph keeps the model's modules
            built = _build_traced(**traced, parts=front_end == "fx", opaque_leaves=not export_next)
            if built is not None:
                return built
        elif front_end != "export":
            report.front_ends_declined["fx"] = _NOT_POSITIONAL
        if export_next:
            fx_failed = report.skipped.pop() if report.skipped and report.skipped[-1].path == "<model>" else None
            defaults = {k: v for k, v in constants.items() if k not in kwargs and k in
                        _positional_names(model)[len(example_inputs):]}
            fused = _fuse_exported(model, example_inputs, kwargs, defaults, constants, expected, report, synthesize,
                                   cost_model, confine, captures, varying, write_into)
            if fused is not None:
                if fx_failed is not None:
                    report.front_ends_declined["fx"] = fx_failed.reason
                report.nodes_after = _graph_nodes(fused)
                return fused, report, model
            if front_end == "export":
                raise ReparamError(f"front_end='export': {report.front_ends_declined['torch.export']}")
            if fx_failed is not None:
                report.skipped.append(fx_failed)
        if positional is None:
            report.skipped.append(SkippedPart("<model>", f"fx: {_NOT_POSITIONAL}"))
            return copy.deepcopy(model), report, model
        # (the whole was tried above; again where only its opaque leaves declined it)
        retry_whole = bool(report.skipped) and report.skipped[-1].reason.startswith(_OPAQUE_LEAVES)
        if retry_whole:
            report.skipped.pop()
        return _build_traced(**traced, parts=True, whole=retry_whole)


_NOT_POSITIONAL = "keyword inputs that forward does not take by position"
_OPAQUE_LEAVES = "its graph calls torch.nn modules whose own layers it does not trace into"


def _opaque_leaves(gm: fx.GraphModule) -> List[str]:
    """The classes of the modules ``gm`` calls that hold layers of their own (``nn.MultiheadAttention``'s
    in- and out-projections, transformer layers): fx keeps torch.nn modules as leaves, so no
    adapter or norm around them folds into their layers; torch.export records their parts."""
    modules = dict(gm.named_modules())
    names = []
    for node in gm.graph.find_nodes(op="call_module"):
        module = modules.get(node.target)
        if module is not None and any(True for _ in module.children()) and type(module).__name__ not in names \
                and type(module).__module__.startswith("torch.nn"):
            names.append(type(module).__name__)
    return names


def _writable_storages(model: nn.Module) -> set:
    """The storages of the model's parameters that no other parameter or buffer shares (a tied
    embedding is read elsewhere): where ``in_place`` may write a merged weight."""
    count: Dict[int, int] = {}
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)] + \
        [t for _, t in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        count[ptr] = count.get(ptr, 0) + 1
    return {t.untyped_storage().data_ptr() for t in model.parameters() if count[t.untyped_storage().data_ptr()] == 1}


def _export_applies(front_end: str, allow_approximate: bool, specialize, args, kwargs) -> bool:
    """Whether ``torch.export`` is tried: not for EWA (its matcher reads fx module calls) nor
    with ``specialize`` (the fx front end binds tensors to constants and guards them); export
    itself guards the non-tensor inputs it specializes to."""
    return not (front_end == "fx" or allow_approximate or specialize)


def _fuse_exported(model, args, kwargs, defaults, constants, expected, report: Report,
                   synthesize: bool, cost_model=None, confine=None, captures: Optional[dict] = None,
                   varying=None, write_into=None) -> Optional[nn.Module]:
    """``model`` captured by ``torch.export`` (or a fresh copy of its capture in ``captures``)
    and fused, with the model's calling convention; None (and the reason in the report) where
    export does not capture it."""
    captures = {} if captures is None else captures
    if "export" not in captures:
        try:
            captures["export"] = export_graph(model, args, kwargs, expected)
        except Exception as why:  # CaptureError says why; anything else is reported the same way, not raised
            captures["export"] = CaptureError(str(why) if isinstance(why, CaptureError) else _short(why))
    if isinstance(captures["export"], CaptureError):
        report.front_ends_declined["torch.export"] = str(captures["export"])
        return None
    if write_into is not None and captures["export"].sizes_outside:
        # (the check tries sizes outside them on the original, which in_place will have written into)
        leaf, axis, size = captures["export"].sizes_outside[0]
        report.front_ends_declined["torch.export"] = (
            f"its graph does not hold for size {size} on axis {axis} of input {leaf} (the other side of a test on "
            "that size the example took), which in_place cannot check")
        return None
    captured = captures["export"].fresh()
    report.front_end = "torch.export"
    report.nodes_before = len(captured.gm.graph.nodes)
    prefix = captured.prefix
    try:
        fused = _fuse_traced(captured.gm, captured.flat_inputs, report, tuple(tree_leaves(without_opaque(expected))),
                             synthesize, cost_model, confine, varying, prefix, write_into)
    except CaptureMismatch as why:
        report.front_ends_declined["torch.export"] = str(why)
        report.front_end, report.nodes_before = "", 0
        return None
    captured.give_signature(fused, defaults)
    fused.meta["repc_guards"] = captured.guards  # (a module-preserving copy running parts of the graph checks them)
    report.specialized = {name: _brief(value) for name, value in constants.items()}
    return fused  # (sharing the model's tensors that stay: copied only where the graph is the output)


def _build_traced(model, example_inputs, constants, fixed, expected, allow_approximate, approximate_tolerance,
                  synthesize: bool, report: Report, parts: bool = True, whole: bool = True, cost_model=None,
                  confine=None, varying=None, write_into=None, opaque_leaves: bool = True):
    """The fx front end: ``model`` traced as a whole (``whole``; its failure is the last
    ``<model>`` entry of ``report.skipped``), or in parts where it does not trace (``parts``;
    None without).  Without ``opaque_leaves``, a whole graph that calls torch.nn modules made
    of layers (:func:`_opaque_leaves`) is declined, for torch.export to record their parts."""
    report.specialized = {name: _brief(value) for name, value in constants.items()}
    reference = model
    # the traced graph's leaves are the model's own modules: repc only reads them, and the
    # graph copies what it still shares with the model where it is the output (in Compilation.finish)
    gm = _trace_whole(model, constants, report, example_inputs) if whole else None
    opaque = _opaque_leaves(gm) if gm is not None and not opaque_leaves else []
    if opaque:
        report.skipped.append(SkippedPart("<model>", f"{_OPAQUE_LEAVES} ({', '.join(opaque)})"))
        if not parts:
            report.specialized = {}
            return None
        gm = None
    if gm is not None:
        report.nodes_before = len(gm.graph.nodes)
    if gm is not None and allow_approximate:
        averaged = _average_experts(model, gm, example_inputs, approximate_tolerance, report, fixed)
        if averaged is not None:
            gm, reference = averaged
    if gm is not None:
        try:
            fused = _fuse_traced(gm, example_inputs, report, None if reference is not model else expected,
                                 synthesize, cost_model, confine, varying, write_into=write_into)
        except CaptureMismatch as why:
            report.skipped.append(SkippedPart("<model>", str(why)))
            report.nodes_before = 0
            gm = None
    if gm is None:
        if not parts:
            report.specialized = {}
            return None
        report.front_end = "fx (in parts)"
        fused = _fuse_parts(copy.deepcopy(model), example_inputs, report, synthesize, cost_model)
    else:
        report.front_end = "fx"
    report.nodes_after = _graph_nodes(fused)
    return fused, report, reference


class _FlatCall(nn.Module):
    """``module`` called on the flat tensor leaves of its ``(args, kwargs)``: how the checks,
    which vary positional tensors, reach a model that takes keyword inputs."""

    def __init__(self, module: nn.Module, in_spec):
        super().__init__()
        self.module, self.in_spec = module, in_spec

    def forward(self, *leaves):
        args, kwargs = tree_unflatten(list(leaves), self.in_spec)
        return self.module(*args, **kwargs)


def _flat_calling(args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """The check's inputs and how to call a model on them: the positional example as it is, or
    with keyword inputs, the flat leaves of ``(args, kwargs)``."""
    if not kwargs:
        return args, lambda module: module
    leaves, spec = tree_flatten((args, kwargs))
    return tuple(leaves), lambda module: _FlatCall(module, spec)


def _as_positional(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
    """``(args, kwargs)`` as positional inputs only, the parameters between them at their
    defaults; None where a keyword input is not a positional parameter of ``forward``."""
    if not kwargs:
        return args
    names = _positional_names(model)
    if any(k not in names[len(args):] for k in kwargs):
        return None
    last = max(names.index(k) for k in kwargs)
    defaults = _defaults(model, names)
    if any(n not in kwargs and n not in defaults for n in names[len(args):last + 1]):
        return None
    return tuple(args) + tuple(kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):last + 1])


def _positional_names(model: nn.Module):
    """Names of ``model.forward``'s positional parameters (empty if they cannot be read)."""
    try:
        return [p.name for p in inspect.signature(model.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _defaults(model: nn.Module, names) -> Dict[str, Any]:
    """The non-tensor default values of the named forward parameters (``mask=None``, ``flag=False``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {n: parameters[n].default for n in names if n in parameters
            and parameters[n].default is not inspect.Parameter.empty
            and not isinstance(parameters[n].default, torch.Tensor)}


def _specialized_arguments(model: nn.Module, example_inputs, specialize) -> Dict[str, Any]:
    """Forward arguments the result is specialized to: non-tensor example inputs, ``specialize``."""
    names = _positional_names(model)
    constants = {}
    for name, value in zip(names, example_inputs):
        if not isinstance(value, torch.Tensor):
            constants[name] = value
    for name, default in _defaults(model, names[len(example_inputs):]).items():
        constants[name] = default  # left out of the example: the result computes the default's path
    for name, value in (specialize or {}).items():
        if name not in names:
            raise ReparamError(f"cannot specialize '{name}': forward has no such positional argument ({', '.join(names)})")
        constants[name] = value
        at = names.index(name)
        if at < len(example_inputs) and isinstance(value, torch.Tensor) != isinstance(example_inputs[at], torch.Tensor):
            raise ReparamError(f"specialize['{name}'] and the example input for it differ in kind")
    return constants


def _with_specialized_values(model: nn.Module, example_inputs: Tuple[Any, ...], specialize) -> Tuple[Any, ...]:
    """The example inputs, extended by the specialized values of the arguments that follow them."""
    extended = list(example_inputs)
    for name in _positional_names(model)[len(extended):] if specialize else ():
        if name not in specialize:
            break
        extended.append(specialize[name])
    return tuple(extended)


def _positions(model: nn.Module, constants: Dict[str, Any]):
    """Positional indices of the specialized arguments (verification keeps them as given)."""
    names = _positional_names(model)
    return {names.index(n) for n in constants if n in names}


def _brief(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}" if value.numel() > 8 else f"tensor({value.tolist()})"
    return repr(value)


def _trace_whole(work: nn.Module, constants: Dict[str, Any], report: Report,
                 example_inputs: Tuple[Any, ...]) -> Optional[fx.GraphModule]:
    """``work`` traced as a whole, with specialized arguments bound; None if it does not trace."""
    plain = {k: v for k, v in constants.items() if not isinstance(v, torch.Tensor)}
    try:
        gm = trace(work, concrete_args=plain or None, example_inputs=example_inputs)
    except Exception as why:
        report.skipped.append(SkippedPart("<model>", _short(why)))
        return None
    _keep_argument_names(gm, plain)
    _bind_tensor_arguments(gm, {k: v for k, v in constants.items() if isinstance(v, torch.Tensor)})
    return gm


def _keep_argument_names(gm: fx.GraphModule, specialized: Dict[str, Any]) -> None:
    """fx names a specialized argument's placeholder ``mask_1``: give the signature back ``mask``,
    so that ``fused(x, mask=m)`` reaches the check that refuses other values."""
    taken = {n.target for n in gm.graph.find_nodes(op="placeholder")}
    renamed = False
    for node in gm.graph.find_nodes(op="placeholder"):
        base, _, suffix = node.target.rpartition("_")
        if base in specialized and suffix.isdigit() and base not in taken:
            node.target = base
            taken.add(base)
            renamed = True
    if renamed:
        gm.recompile()


def _bind_tensor_arguments(gm: fx.GraphModule, tensors: Dict[str, torch.Tensor]) -> None:
    """Turn the named tensor inputs into constants, guarded by a check of the value passed."""
    if not tensors:
        return
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.target not in tensors:
            continue
        name = f"_repc_specialized_{node.target}"
        gm.register_buffer(name, tensors[node.target].detach().clone())
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(name)
        node.replace_all_uses_with(const)
        with gm.graph.inserting_after(const):
            same = gm.graph.call_function(torch.equal, (node, const))
        with gm.graph.inserting_after(same):
            gm.graph.call_function(torch._assert, (same, f"{node.target} has been specialized to a fixed value"))
    gm.recompile()


def _average_experts(model, gm, example_inputs, limit, report: Report, fixed):
    """Apply Experts Weights Averaging on ``gm``; (averaged gm, reference for the exact part) or None."""
    candidate = copy.deepcopy(gm)
    averaged = average_experts(candidate, example_inputs)
    if not averaged:
        report.rejected.append(Rejection("<model>", "allow_approximate: no mixture of identical experts found",
                                         RejectionKind.NOT_APPLICABLE))
        return None
    measured = compare(candidate, model, example_inputs, float("inf"), fixed)
    deviation = measured.max_deviation
    if limit is not None and deviation > limit:
        for a in averaged:
            report.rejected.append(Rejection(a.root, f"expert averaging deviates by {deviation:.3g} > "
                                                     f"approximate_tolerance {limit:g}: not applied",
                                             RejectionKind.CHECK_FAILED))
        return None
    for a in averaged:
        report.rewrites.append(Rewrite(
            rule={MergeRule.AVERAGE_EXPERTS}, root=a.root, replaced=a.replaced,
            result=[f"one expert with the weights averaged over {a.experts} (weights {a.weights})"],
            params_before=a.params_before, params_after=a.params_after, flops_before=a.flops_before,
            flops_after=a.flops_after,
            exact=False, max_deviation=deviation))
    return candidate, copy.deepcopy(candidate)


def _fuse_traced(gm: fx.GraphModule, example_inputs, report: Report, expected=None, synthesize=True,
                 cost_model=None, confine=None, varying=None, prefix: str = "", write_into=None) -> nn.Module:
    captured = snapshot(gm)
    # no region spans a module whose forward stays the model's code (called otherwise on the calls
    # users make, or given a cache), nor one that encloses it
    scopes = (lambda prepared: varying_scopes(prepared, captured, varying, prefix)) if varying else None
    result = collapse(gm, example_inputs, expected_output=expected, synthesize=synthesize, cost_model=cost_model,
                      confine=confine, scopes=scopes, write_into=write_into)
    report.written_in_place.extend(result.written_in_place)
    # the collapse's web of graphs, recorded values and float64 weights is garbage now, but in
    # cycles (the collector is off during a compile): freed here, so that what comes next reuses
    # that memory rather than touching fresh pages (which cost ~10 us each on a VM)
    gc.collect(0)
    report.rewrites.extend(result.rewrites)
    report.rejected.extend(result.rejections)
    report.rejected.extend(Rejection(path or "<model>", f"no merge spans its own code: it is {why}",
                                     RejectionKind.MODULE_BOUNDARY) for path, why in sorted((varying or {}).items()))
    # what the module-preserving output is read from: the captured graph its rewrites name, the
    # names of its nodes before repc's passes, the inputs its placeholders take, the wrapper
    # prefix of its module paths
    result.module.meta["repc_source"] = dict(source=gm, captured=captured, flat_inputs=tuple(example_inputs),
                                             prefix=prefix)
    return result.module


def _fuse_parts(work: nn.Module, example_inputs, report: Report, synthesize: bool = True, cost_model=None) -> nn.Module:
    """The largest traceable parts of ``work`` (repc's copy) fused in place; the shells kept."""
    why = report.skipped.pop().reason if report.skipped and report.skipped[-1].path == "<model>" else "does not trace"
    parts, skipped = split_untraceable(work, example_inputs, why)
    report.skipped.extend(SkippedPart(s.path, s.reason) for s in skipped)
    for path, inputs in parts:
        parent_path, _, name = path.rpartition(".")
        parent = work.get_submodule(parent_path) if parent_path else work
        try:
            gm = trace(getattr(parent, name), example_inputs=inputs)
            nodes = len(gm.graph.nodes)
            result = collapse(gm, inputs, prefix=f"{path}.", synthesize=synthesize, cost_model=cost_model)
        except Exception as err:
            report.skipped.append(SkippedPart(path, _short(err)))
            continue
        for r in result.rewrites:
            r.module = path  # (the part; its nodes' own modules are not read here)
        report.rewrites.extend(result.rewrites)
        report.rejected.extend(result.rejections)
        report.nodes_before += nodes
        _keep_attributes(result.module, getattr(parent, name))
        setattr(parent, name, result.module)
    return work


def _keep_attributes(fused: nn.Module, original: nn.Module) -> None:
    """The fused part keeps the original's plain Python attributes, which the forward of the
    module that calls it may read (timm EfficientViT's ``self.attn.resolution``)."""
    for key, value in vars(original).items():
        if not key.startswith("_") and not isinstance(value, (nn.Module, torch.Tensor)) and not hasattr(fused, key):
            setattr(fused, key, value)


def _graph_nodes(module: nn.Module) -> int:
    return sum(len(m.graph.nodes) for m in module.modules() if isinstance(m, fx.GraphModule))
