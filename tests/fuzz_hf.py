"""A differential fuzzer of transformers architectures x PEFT methods.

Each case (:class:`HFCase`, a frozen description whose ``repr`` is valid Python) is a tiny
transformers model built from a config with random weights (no hub), wrapped by PEFT's
``get_peft_model`` with one adapter method on the attention, the MLP or all projections, every
parameter moved off its init.  :func:`run_case` compiles it with ``repc.compile``'s default
(module-preserving) output and compares the result with the unfused PEFT model on the inputs
users feed (:func:`user_inputs`: other masks, no mask, other batch and sequence sizes), not only
on the example it was compiled with.  The outcome is one of :data:`OUTCOMES`:

* ``exact``: every input within :data:`TOLERANCES` of the case's dtype (relative max deviation),
  or, below float32, within twice the deviation of PEFT's own ``merge_and_unload`` (the rounding
  of merged weights to bfloat16), or within twice the model's own distance from its exact
  function (its weights computed in float64) of that exact function;
* ``miscompile``: some input deviates beyond it, and repc did not roll back (or rolled back to a
  model that still deviates);
* ``crash``: the result raises on an input the unfused model accepts;
* ``rolled back``: repc's verification took every rewrite back, and the result is exact;
* ``partly merged``: the result is exact but still holds PEFT adapter layers (repc warns,
  ``repc.AdaptersLeftWarning``): what ``merge_and_unload`` merges, repc left as written;
* ``refused``: ``repc.compile`` raised;
* ``not applicable``: transformers or PEFT refused to build the case (not a failure).

Run ``python tests/fuzz_hf.py --count N --seed S [--out file.jsonl]`` for a random run, or
``--quick`` for :data:`CASES_QUICK`; :func:`hf_cases` draws cases for Hypothesis.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import peft
import torch
import torch.nn as nn
import transformers
from hypothesis import strategies as st

import repc
from repc.api import adapter_layers_left

ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "opt", "bert", "roberta", "distilbert",
         "vit")
METHODS = ("lora", "rslora", "dora", "ia3", "loha", "lokr", "vera")
TARGETS = ("attention", "mlp", "all")
ATTNS = ("eager", "sdpa")
DECODERS = frozenset({"llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "opt"})
OUTCOMES = ("exact", "miscompile", "crash", "rolled back", "partly merged", "refused", "not applicable")
FUZZER_ERROR = "fuzzer error"  # main's outcome for an exception escaping run_case: a bug here, not a finding
TOLERANCE = 1e-4
# a bfloat16 base: the merged weights are rounded to bfloat16 once (as merge_and_unload's are), so
# its outputs are as far from the unmerged model's as bfloat16 rounding takes them
TOLERANCES = {"float32": TOLERANCE, "bfloat16": 5e-2}
DTYPES = ("float32", "bfloat16")
HEADS = ("base", "classifier")
VOCAB = 100
# (arch, method) that get_peft_model refuses: LoHa and LoKr adapt Linear and conv layers, not GPT-2's Conv1D
PEFT_REFUSES = frozenset({("gpt2", "loha"), ("gpt2", "lokr")})
IMAGE = 16
SEQUENCE = 12  # the example's length; row 1 of its mask is padded from (right) or up to (left) PAD
PAD = 6

_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
_KV = dict(num_key_value_heads=2)


@dataclass(frozen=True)
class HFCase:
    """One fuzz case: an architecture of :data:`ARCHS`, a PEFT method of :data:`METHODS` on the
    projections :data:`TARGETS` names, an attention implementation (``eager`` or ``sdpa``),
    the config's ``use_cache`` (decoders only), the seed of the weights and inputs, the base
    model's dtype (``bfloat16``: PEFT keeps the adapter in float32 beside it) and its head
    (``classifier``: the architecture's sequence classifier, whose head PEFT trains as a copy,
    ``modules_to_save``; not ViT)."""

    arch: str
    method: str
    targets: str
    attn: str
    use_cache: bool
    seed: int
    dtype: str = "float32"
    head: str = "base"


@dataclass(frozen=True)
class _Arch:
    """How to build an architecture: its config keywords, its model class, and the module-name
    patterns (regex fragments matched at the end of a module's dotted name) of its attention
    and MLP projections."""

    config: Callable[..., transformers.PreTrainedConfig]
    sizes: Dict[str, Any]
    model: Callable[[transformers.PretrainedConfig], nn.Module]
    attention: Tuple[str, ...]
    mlp: Tuple[str, ...]


_LLAMA_LIKE = (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj", r"self_attn\.o_proj"), \
    (r"mlp\.gate_proj", r"mlp\.up_proj", r"mlp\.down_proj")
_BERT_LIKE = (r"attention\.self\.query", r"attention\.self\.key", r"attention\.self\.value",
              r"attention\.output\.dense"), (r"intermediate\.dense", r"layer\.\d+\.output\.dense")
_TOKENS = dict(bos_token_id=0, eos_token_id=0)

_ARCHS: Dict[str, _Arch] = {
    "llama": _Arch(transformers.LlamaConfig, {**_SIZES, **_KV}, transformers.LlamaForCausalLM, *_LLAMA_LIKE),
    "mistral": _Arch(transformers.MistralConfig, {**_SIZES, **_KV}, transformers.MistralForCausalLM, *_LLAMA_LIKE),
    "qwen2": _Arch(transformers.Qwen2Config, {**_SIZES, **_KV}, transformers.Qwen2ForCausalLM, *_LLAMA_LIKE),
    "gemma": _Arch(transformers.GemmaConfig, {**_SIZES, **_KV, "head_dim": 8}, transformers.GemmaForCausalLM,
                   *_LLAMA_LIKE),
    "phi": _Arch(transformers.PhiConfig, {**_SIZES, **_KV}, transformers.PhiForCausalLM,
                 (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj", r"self_attn\.dense"),
                 (r"mlp\.fc1", r"mlp\.fc2")),
    "gpt2": _Arch(transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                                                n_positions=64, **_TOKENS), transformers.GPT2LMHeadModel,
                  (r"attn\.c_attn", r"attn\.c_proj"), (r"mlp\.c_fc", r"mlp\.c_proj")),
    "gpt_neox": _Arch(transformers.GPTNeoXConfig, {**_SIZES, **_TOKENS}, transformers.GPTNeoXForCausalLM,
                      (r"attention\.query_key_value", r"attention\.dense"),
                      (r"mlp\.dense_h_to_4h", r"mlp\.dense_4h_to_h")),
    "opt": _Arch(transformers.OPTConfig, dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              max_position_embeddings=64),
                 transformers.OPTForCausalLM,
                 (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj", r"self_attn\.out_proj"),
                 (r"layers\.\d+\.fc1", r"layers\.\d+\.fc2")),
    "bert": _Arch(transformers.BertConfig, _SIZES, transformers.BertModel, *_BERT_LIKE),
    "roberta": _Arch(transformers.RobertaConfig, _SIZES, transformers.RobertaModel, *_BERT_LIKE),
    "distilbert": _Arch(transformers.DistilBertConfig, dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2,
                                                            n_heads=4, max_position_embeddings=64),
                        transformers.DistilBertModel,
                        (r"attention\.q_lin", r"attention\.k_lin", r"attention\.v_lin", r"attention\.out_lin"),
                        (r"ffn\.lin1", r"ffn\.lin2")),
    "vit": _Arch(transformers.ViTConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=IMAGE, patch_size=4),
                 transformers.ViTModel,
                 (r"attention\.q_proj", r"attention\.k_proj", r"attention\.v_proj", r"attention\.o_proj"),
                 (r"mlp\.fc1", r"mlp\.fc2")),
}


def target_patterns(case: HFCase) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The module-name patterns ``case.targets`` selects in its architecture: (all targeted,
    the MLP ones among them)."""
    arch = _ARCHS[case.arch]
    attention = arch.attention if case.targets in ("attention", "all") else ()
    mlp = arch.mlp if case.targets in ("mlp", "all") else ()
    return attention + mlp, mlp


def module_regex(patterns: Sequence[str]) -> str:
    """A ``target_modules`` regex (PEFT full-matches it against each module's dotted name)
    selecting the modules whose names end with one of ``patterns``."""
    return r".*\.(?:" + "|".join(patterns) + ")"


def peft_config(case: HFCase) -> peft.PeftConfig:
    """The PEFT config of ``case.method`` on ``case.targets``, initialised off the identity
    where PEFT allows it."""
    targets, mlp = target_patterns(case)
    common = dict(target_modules=module_regex(targets),
                  task_type=peft.TaskType.SEQ_CLS if case.head == "classifier" else
                  peft.TaskType.CAUSAL_LM if case.arch in DECODERS else None)
    fan_in_fan_out = case.arch == "gpt2"  # GPT-2's Conv1D stores its weight as (in, out)
    if case.method in ("lora", "rslora", "dora"):
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                               fan_in_fan_out=fan_in_fan_out, use_rslora=case.method == "rslora",
                               use_dora=case.method == "dora", **common)
    if case.method == "ia3":
        return peft.IA3Config(feedforward_modules=module_regex(mlp) if mlp else [], init_ia3_weights=False,
                              fan_in_fan_out=fan_in_fan_out, **common)
    if case.method == "loha":
        return peft.LoHaConfig(r=4, alpha=8, init_weights=False, **common)
    if case.method == "lokr":
        return peft.LoKrConfig(r=4, alpha=8, init_weights=False, **common)
    if case.method == "vera":
        return peft.VeraConfig(r=4, vera_dropout=0.1, init_weights=False, fan_in_fan_out=fan_in_fan_out,
                               projection_prng_key=case.seed, **common)
    raise ValueError(f"unknown PEFT method {case.method!r}; expected one of {', '.join(METHODS)}")


def output_field(case: HFCase) -> str:
    """The output compared: ``logits`` of a causal LM or a classifier, else ``last_hidden_state``."""
    return "logits" if case.arch in DECODERS or case.head == "classifier" else "last_hidden_state"


def build_case(case: HFCase) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The case's ``PeftModel`` in eval mode, every parameter moved off its init by
    ``N(0, 0.1)`` noise (LoRA ``B``, DoRA magnitudes, IA3 vectors, norms, biases), and its
    example keyword inputs.  Raises where transformers or PEFT refuse the case.  The global
    random state is left alone."""
    arch = _ARCHS[case.arch]
    extra = {"use_cache": case.use_cache} if case.arch in DECODERS else {}
    if case.head == "classifier":
        extra.update(num_labels=3, pad_token_id=0)
    config = arch.config(**arch.sizes, attn_implementation=case.attn, **extra)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(case.seed)
        base = transformers.AutoModelForSequenceClassification.from_config(config) if case.head == "classifier" \
            else arch.model(config)
        model = peft.get_peft_model(base.to(getattr(torch, case.dtype)), peft_config(case))
    g = torch.Generator().manual_seed(case.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.eval(), _example(case)


def _ids(g: torch.Generator, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _pixels(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def _example(case: HFCase) -> Dict[str, torch.Tensor]:
    """Token models: ``(2, 12)`` ids and a mask with row 1 right-padded from position 6;
    ViT: ``(2, 3, 16, 16)`` pixels."""
    g = torch.Generator().manual_seed(case.seed)
    if case.arch == "vit":
        return {"pixel_values": _pixels(g, 2)}
    mask = torch.ones(2, SEQUENCE, dtype=torch.long)
    mask[1, PAD:] = 0
    return {"input_ids": _ids(g, 2, SEQUENCE), "attention_mask": mask}


def user_inputs(case: HFCase, example_kwargs: Dict[str, torch.Tensor]) -> List[Tuple[str, Dict[str, torch.Tensor]]]:
    """The inputs users feed, named: the example; its ids with an all-ones mask, with row 1
    left-padded, and with no mask; batch 3 length 11 (all-ones mask) and batch 1 length 7 (no
    mask) of fresh ids across the vocabulary.  ViT: the example, batch 3 and batch 1."""
    g = torch.Generator().manual_seed(case.seed + 1)
    if case.arch == "vit":
        return [("example", example_kwargs), ("batch 3", {"pixel_values": _pixels(g, 3)}),
                ("batch 1", {"pixel_values": _pixels(g, 1)})]
    ids = example_kwargs["input_ids"]
    left = torch.ones_like(ids)
    left[1, :PAD] = 0
    return [("example", example_kwargs),
            ("all-ones mask", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
            ("left-padded", {"input_ids": ids, "attention_mask": left}),
            ("no mask", {"input_ids": ids}),
            ("batch 3 length 11", {"input_ids": _ids(g, 3, 11), "attention_mask": torch.ones(3, 11, dtype=torch.long)}),
            ("batch 1 length 7 no mask", {"input_ids": _ids(g, 1, 7)})]


def relative_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64; NaN where both are NaN counts as equal;
    another shape, or a NaN in one only, is ``inf``."""
    if got.shape != want.shape:
        return math.inf
    got, want = got.double(), want.double()
    both = got.isnan() & want.isnan()
    got, want = got.masked_fill(both, 0), want.masked_fill(both, 0)
    deviation = ((got - want).abs().max() / want.abs().max()).item()
    return math.inf if math.isnan(deviation) else deviation


@dataclass
class CaseResult:
    """What :func:`run_case` found: an outcome of :data:`OUTCOMES`, a one-line detail, and the
    relative deviation per user input the result answered."""

    case: HFCase
    outcome: str
    detail: str
    deviations: Dict[str, float] = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _default_compile(model: nn.Module, kwargs: Dict[str, torch.Tensor]) -> nn.Module:
    return repc.compile(model, (), kwargs)


def through_directory(unit_size: str) -> Callable[[nn.Module, Dict[str, torch.Tensor]], nn.Module]:
    """A compile that goes through the files users merge: the base model saved by
    ``save_pretrained``, the adapter by PEFT's, ``repc fuse BASE --adapter ADAPTER -o OUT
    --unit-size SIZE`` (out of core, unit by unit), and OUT loaded back with ``from_pretrained``
    in the base's class."""
    import os
    import tempfile

    from repc import cli

    def compile_fn(model: nn.Module, kwargs: Dict[str, torch.Tensor]) -> nn.Module:
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = copy.deepcopy(model).unload()
            base.save_pretrained(os.path.join(folder, "base"))
            model.save_pretrained(os.path.join(folder, "adapter"))
            argv = ["fuse", os.path.join(folder, "base"), "--adapter", os.path.join(folder, "adapter"),
                    "-o", os.path.join(folder, "out"), "-q", "--unit-size", unit_size]
            for name, value in kwargs.items():
                argv += ["--example-input", f"{name}={'x'.join(map(str, value.shape))}:{str(value.dtype)[6:]}"]
            code = cli.main(argv)
            if code:
                raise RuntimeError(f"repc fuse exited with {code}")
            return type(base).from_pretrained(os.path.join(folder, "out"),  # (eager and sdpa differ on padded rows)
                                              attn_implementation=base.config._attn_implementation).eval()

    return compile_fn


def _own_rounding(model: nn.Module, inputs, references: Dict[str, torch.Tensor], compared: str
                  ) -> Dict[str, Tuple[torch.Tensor, float]]:
    """Per input, the model's exact output (its weights as they are, computed in float64) and how
    far the model's own output in its dtype is from it (finite only).  An ill-conditioned input
    (a chaotic random classifier) moves a bfloat16 model several percent off its own function; a
    merged model is then as far off it, another rounding of the same weights, though neither
    is wrong, and PEFT's merge of fewer ops may happen to land closer."""
    exact_model = copy.deepcopy(model).double()
    out: Dict[str, Tuple[torch.Tensor, float]] = {}
    with torch.no_grad():
        for name, kwargs in inputs:
            if name not in references:
                continue
            try:
                exact = getattr(exact_model(**kwargs), compared)
            except Exception:  # (a model that does not run in float64: the other bounds alone)
                return {}
            own = relative_deviation(references[name], exact)
            if math.isfinite(own):
                out[name] = (exact, own)
    return out


def run_case(case: HFCase, compile_fn: Optional[Callable[[nn.Module, Dict[str, torch.Tensor]], nn.Module]] = None
             ) -> CaseResult:
    """Build ``case``, compile it with ``compile_fn`` (``repc.compile``'s default output), and
    compare the result with the unfused model on :func:`user_inputs`.  An input the unfused
    model rejects is skipped; one it rejects at the example makes the case not applicable."""
    compile_fn = compile_fn or _default_compile
    try:
        model, example = build_case(case)
    except Exception as e:
        return CaseResult(case, "not applicable", f"build: {_first_line(e)}")
    compared = output_field(case)
    inputs = user_inputs(case, example)
    references: Dict[str, torch.Tensor] = {}
    skipped: List[str] = []
    with torch.no_grad():
        for name, kwargs in inputs:
            try:
                references[name] = getattr(model(**kwargs), compared)
            except Exception as e:
                skipped.append(f"{name} ({_first_line(e)})")
    if "example" not in references:
        return CaseResult(case, "not applicable", f"the unfused model rejects the example: {skipped[0]}")
    bounds = {name: TOLERANCES[case.dtype] for name in references}
    merged = None
    if case.dtype != "float32":  # the rounding merged weights bring: as far as merge_and_unload's, within 2x
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged = copy.deepcopy(model).merge_and_unload().eval()
        except Exception:  # (PEFT's own merge refuses some heads: the dtype's tolerance alone then)
            merged = None
    if merged is not None:
        with torch.no_grad():
            for name, kwargs in inputs:
                if name in references:
                    theirs = relative_deviation(getattr(merged(**kwargs), compared), references[name])
                    bounds[name] = max(bounds[name], 2 * theirs)
        del merged
    own_rounding = _own_rounding(model, inputs, references, compared) if case.dtype != "float32" else {}
    try:
        result = compile_fn(model, example)
    except Exception as e:
        return CaseResult(case, "refused", _first_line(e))

    deviations: Dict[str, float] = {}
    crashes: List[str] = []
    with torch.no_grad():
        for name, kwargs in inputs:
            if name in references:
                try:
                    deviations[name] = relative_deviation(getattr(result(**kwargs), compared), references[name])
                except Exception as e:
                    crashes.append(f"{name}: {_first_line(e)}")
    beyond = {name: d for name, d in deviations.items() if not d <= bounds[name]}
    for name in list(beyond):  # (below float32: as close to the model's exact function as the model itself, 2x)
        if name in own_rounding:
            exact, own = own_rounding[name]
            with torch.no_grad():
                if relative_deviation(getattr(result(**dict(inputs)[name]), compared), exact) <= 2 * own:
                    del beyond[name]

    report = getattr(result, "repc_report", None)
    rolled_back = bool(report is not None and report.rolled_back)
    verification = None if report is None else report.verification
    notes = [f"result {type(result).__name__}", f"output {getattr(report, 'output', '?')}"]
    if report is not None:
        notes.append(f"front end {report.front_end or '?'}; {len(report.rewrites)} rewrite(s)")
    if verification is not None and not verification.ok:
        notes.append(f"verification FAILED on {verification.failing_input}: deviation {verification.max_deviation:.3g}"
                     + (f" ({verification.error})" if verification.error else ""))
    if rolled_back:
        notes.append("rolled back")
    notes += [f"{name} deviates {d:.3g}" for name, d in beyond.items()]
    notes += [f"crash on {c}" for c in crashes]
    notes += [f"skipped {s}" for s in skipped]
    if beyond:
        outcome = "miscompile"
    elif crashes:
        outcome = "crash"
    elif rolled_back:
        outcome = "rolled back"
    else:
        left = adapter_layers_left(result)
        outcome = "partly merged" if left else "exact"
        notes += [f"{len(left)} adapter layer(s) left, as {left[0][0]}"] if left else []
    if outcome != "exact" and report is not None:
        notes += [f"{name} not used: {why}" for name, why in report.front_ends_declined.items()]
    return CaseResult(case, outcome, "; ".join(notes), deviations)


def _draw_case(choose: Callable[[Sequence[Any]], Any]) -> HFCase:
    """A case with each field picked by ``choose`` from its options: ``use_cache`` False for
    encoders and ViT, no method PEFT is known to refuse on the architecture (any other refusal
    is run_case's ``not applicable``)."""
    arch = choose(ARCHS)
    return HFCase(arch, choose(tuple(m for m in METHODS if (arch, m) not in PEFT_REFUSES)), choose(TARGETS),
                  choose(ATTNS), arch in DECODERS and choose((True, False)), choose(range(2 ** 16)), choose(DTYPES),
                  "base" if arch == "vit" else choose(HEADS))


@st.composite
def hf_cases(draw: st.DrawFn) -> HFCase:
    """Random :class:`HFCase` values for Hypothesis."""
    return _draw_case(lambda options: draw(st.sampled_from(options)))


def random_case(rng: random.Random) -> HFCase:
    """A random :class:`HFCase` drawn with ``rng`` (the command line's slow profile)."""
    return _draw_case(rng.choice)


CASES_QUICK = [
    HFCase("llama", "lora", "all", "sdpa", False, 0),
    HFCase("llama", "dora", "attention", "eager", True, 1),
    HFCase("gpt2", "vera", "attention", "sdpa", True, 2),
    HFCase("bert", "lora", "attention", "eager", False, 3),
    HFCase("gpt_neox", "lora", "mlp", "sdpa", False, 4),
    HFCase("opt", "ia3", "all", "eager", True, 5),
    HFCase("vit", "lokr", "all", "sdpa", False, 6),
]


def _summary(results: Sequence[CaseResult]) -> str:
    """The count of each outcome, and of fuzzer errors where there were any."""
    counts = [f"{sum(r.outcome == o for r in results)} {o}" for o in OUTCOMES]
    errors = sum(r.outcome == FUZZER_ERROR for r in results)
    return ", ".join(counts + ([f"{errors} {FUZZER_ERROR}"] if errors else []))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run random cases (or :data:`CASES_QUICK`), one line each, then the outcome counts.
    Returns 1 where any case miscompiled or crashed, or the fuzzer failed on one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="random cases to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case draw")
    parser.add_argument("--quick", action="store_true", help="run CASES_QUICK instead of random cases")
    parser.add_argument("--out", help="append one JSON line per case to this file")
    parser.add_argument("--through-directory", metavar="UNIT_SIZE",
                        help="merge through the files: save_pretrained, repc fuse DIR --adapter A --unit-size "
                             "UNIT_SIZE, from_pretrained (out of core)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    rng = random.Random(args.seed)
    cases = CASES_QUICK if args.quick else [random_case(rng) for _ in range(args.count)]
    results: List[CaseResult] = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        try:
            result = run_case(case, through_directory(args.through_directory) if args.through_directory else None)
        except Exception as e:  # a bug of this fuzzer, not a finding: reported, and the run goes on
            traceback.print_exc()
            result = CaseResult(case, FUZZER_ERROR, _first_line(e))
        seconds = time.perf_counter() - start
        results.append(result)
        print(f"[{i + 1}/{len(cases)}] {result.outcome:<14} {seconds:5.1f}s {case!r}: {result.detail}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"case": asdict(case), "repr": repr(case), "outcome": result.outcome,
                                    "detail": result.detail, "deviations": result.deviations,
                                    "seconds": round(seconds, 3)}) + "\n")
    print(_summary(results))
    return int(any(r.outcome in ("miscompile", "crash", FUZZER_ERROR) for r in results))


if __name__ == "__main__":
    sys.exit(main())
