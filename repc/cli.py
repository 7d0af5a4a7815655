"""The ``repc`` command line: ``repc fuse IN -o OUT`` and ``repc inspect IN``.

A thin layer over :func:`repc.compile` for people who hold a checkpoint rather than a Python
session: it loads the model safely, builds example inputs from shape strings, runs the same
pipeline, prints what was rewritten and what it gained, and writes a fused ``GraphModule``
(or a ``torch.export`` program) that loads where repc is not installed.

Exit codes: 0 success, 1 internal error or output that could not be written, 2 bad input or
usage (an OUT that is not a regular file, a tolerance below the dtype's rounding), 3
verification failure (nothing written), 141 stdout closed by its reader.  Every expected
failure is one line on stderr naming the problem; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import stat
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFICATION = 3

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  internal error, or the output could not be written: a folder without write
     permission, a full disk (rerun with --debug)
  2  bad input or usage: missing/corrupt file, wrong kind of object, unknown factory,
     bad shape, a model that fails on the example input or is in training mode, an
     OUT that exists and is not a regular file (never replaced, even with --force),
     a --tolerance below the rounding of the model's dtype
  3  verification failed: the fused model does not compute what the original computes;
     nothing is written (the --report file, if asked for, says where it deviates)
  141  the reader of stdout went away (repc inspect ... | head -1), as for SIGPIPE"""

EXAMPLE_SHAPE = "1x3x32x32"
DTYPES = ("float32", "float64", "float16", "bfloat16")


class CliError(Exception):
    """An expected failure: ``message`` is printed as one line, the process exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def _short(why: BaseException, limit: int = 300) -> str:
    """``Type: first sentence of the message``, one line (:func:`repc.graph_predicates.short_error`)."""
    from .graph_predicates import short_error  # (torch is imported only once a command needs it)
    return short_error(why, limit)


# --------------------------------------------------------------------------------------------
# progress


class Progress:
    """Step lines on stderr: ``repc: compiling ... done (4.2 s)``; a live timer on a terminal."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.stream = sys.stderr

    @contextlib.contextmanager
    def step(self, what: str, bars: bool = False):
        """``bars``: the work draws its own progress bars (repc.compile's, on a terminal): the
        line then ends before it, and no timer runs on it."""
        if self.quiet:
            yield
            return
        start = time.perf_counter()
        live = self.stream.isatty()
        stop = threading.Event()
        if bars and live:
            self.stream.write(f"repc: {what} ...\n")
            self.stream.flush()
            outcome = "failed"
            try:
                yield
                outcome = "done"
            finally:
                self.stream.write(f"repc: {what} {outcome} ({time.perf_counter() - start:.1f} s)\n")
                self.stream.flush()
            return
        self.stream.write(f"repc: {what} ...")
        self.stream.flush()

        def tick():
            while not stop.wait(1.0):
                self.stream.write(f"\rrepc: {what} ... {time.perf_counter() - start:.0f} s")
                self.stream.flush()

        ticker = threading.Thread(target=tick, daemon=True) if live else None
        if ticker:
            ticker.start()
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            stop.set()
            if ticker:
                ticker.join()
                self.stream.write(f"\rrepc: {what} ...")
            self.stream.write(f" {outcome} ({time.perf_counter() - start:.1f} s)\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(f"repc: {text}\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# arguments


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2) instead of argparse's usage block."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``; a clear CliError otherwise."""
    if not re.fullmatch(r"\s*\d+(\s*[xX]\s*\d+)*\s*", text or ""):
        raise CliError(f"bad --example-input {text!r}: expected sizes joined by 'x', like 1x3x224x224")
    shape = tuple(int(s) for s in re.split(r"[xX]", text))
    if any(s <= 0 for s in shape):
        raise CliError(f"bad --example-input {text!r}: every size must be positive")
    return shape


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    src = common.add_argument_group("model")
    src.add_argument("input", nargs="?", metavar="IN",
                     help="a pickled nn.Module (torch.save(model); needs --trust-pickle), or a state dict "
                          "(.pt/.pth loaded with weights_only=True, or .safetensors) together with --model")
    src.add_argument("--example", action="store_true",
                     help=f"use repc's built-in training-form example network instead of IN "
                          f"(example input {EXAMPLE_SHAPE} unless --example-input is given)")
    src.add_argument("--model", metavar="PKG.MODULE:FACTORY",
                     help="a callable that builds the architecture for a state dict, e.g. mypkg.nets:resnet "
                          "(the current directory is importable); the model is put in eval mode")
    src.add_argument("--model-kwargs", metavar="JSON", help='keyword arguments for --model, e.g. \'{"c": 16}\'')
    src.add_argument("--trust-pickle", action="store_true",
                     help="allow loading a pickled nn.Module: unpickling runs code named in the file, so only "
                          "for files from a trusted source")
    src.add_argument("--eval", action="store_true",
                     help="put a model that was saved in training mode in eval mode before fusing "
                          "(BatchNorm then uses its running statistics)")
    src.add_argument("--device", default="cpu", help="device to load the model and inputs on (default: cpu)")
    inp = common.add_argument_group("example inputs")
    inp.add_argument("--example-input", action="append", metavar="SHAPE", default=None,
                     help="shape of a positional input, like 1x3x224x224, or a keyword input with its dtype, like "
                          "input_ids=1x32:int64 (ids drawn below the model's embedding size, masks all ones); "
                          "repeat for several inputs")
    inp.add_argument("--dtype", choices=DTYPES,
                     help="dtype of the example inputs (default: the dtype of the model's parameters)")
    inp.add_argument("--seed", type=int, default=0, help="seed for the random example inputs (default: 0)")
    run = common.add_argument_group("run")
    run.add_argument("--tolerance", type=float, default=None,
                     help="largest relative deviation verification accepts (default: from the dtype)")
    run.add_argument("--cost", choices=("macs", "latency", "measure"), default="macs",
                     help="which merges pay: fewer multiply-adds (default), a latency model of this machine "
                          "(calibrated once, cached), or each candidate timed on the example")
    run.add_argument("--no-benchmark", action="store_true",
                     help="skip counting whole-model FLOPs and timing the original and the fused model")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    run.add_argument("--debug", action="store_true", help="show the traceback of an error")

    parser = _Parser(prog="repc", description="repc: fuse training-time branches into plain inference ops, verified.",
                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"repc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    fuse = sub.add_parser(
        "fuse", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compile a model and write the fused model",
        description=textwrap.fill(
            "Compile IN with repc.compile (trace, merge affine regions, verify) and write the fused model to OUT: "
            "a GraphModule that torch.load(OUT, weights_only=False) loads without repc, or with --format export a "
            "torch.export program (torch.export.load; batch and sizes dynamic where the model allows). OUT is written atomically and "
            "only if verification passes.", 88),
        epilog="examples:\n  repc fuse --example -o fused.pt\n"
               "  repc fuse model.pt --trust-pickle --example-input 1x3x224x224 -o fused.pt --report report.json\n"
               "  repc fuse weights.safetensors --model mypkg.nets:build --model-kwargs '{\"c\": 16}' "
               "--example-input 1x3x224x224 -o fused.pt\n"
               "  repc fuse llama-dir --adapter lora-dir -o merged-dir   # transformers + PEFT directories; "
               "keyword inputs as input_ids=1x32:int64\n\n" + EXIT_CODES_HELP)
    fuse.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the fused model")
    fuse.add_argument("--format", choices=FORMATS, default=None,
                      help="graphmodule (default, unless OUT ends in .safetensors): torch.save of the whole-model "
                           "GraphModule, which loads without repc; module: torch.save of the fused model as the "
                           "model's own class with the fused modules swapped in (loading needs the model's code); "
                           "state-dict (default for .safetensors): that model's state dict, as safetensors for "
                           "OUT.safetensors, else torch.save; export: torch.export.save of an ExportedProgram")
    fuse.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    hub = fuse.add_argument_group("a transformers model directory as IN (config.json and its weights), merged "
                                  "unit by unit")
    hub.add_argument("--adapter", metavar="ADAPTER_DIR",
                     help="a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) to merge into IN")
    hub.add_argument("--max-shard-size", metavar="SIZE",
                     help="largest weight file written into OUT_DIR, like 500MB (default: IN's own files)")
    hub.add_argument("--unit-size", metavar="SIZE",
                     help="largest module weights merged at once (default: IN's largest shard); a size as large as "
                          "the model merges it whole, in memory")
    hub.add_argument("--no-whole-model-check", action="store_true",
                     help="skip reading OUT_DIR back to compare the merged model with the original on the example "
                          "(each unit is still verified on its own)")
    hub.add_argument("--compile-every-unit", action="store_true",
                     help="compile each unit; by default a unit like two merged before (a language model's layers) "
                          "runs the ops that computed the second one's merged weights on its own weights, and is "
                          "checked against itself on the example and random inputs")
    hub.add_argument("--trust-remote-code", action="store_true",
                     help="run the model code IN's config.json asks for (only for directories from a trusted source)")
    fuse.add_argument("--force", "-f", action="store_true", help="overwrite an existing OUT / REPORT.json")

    inspect = sub.add_parser(
        "inspect", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show the fusable regions and estimated gains; writes nothing",
        description=textwrap.fill(
            "Run the same pipeline as `repc fuse` (repc.compile, with verification) and print the regions it would "
            "fuse, what each becomes and the estimated gains. Nothing is written.", 88),
        epilog="example:\n  repc inspect --example\n\n" + EXIT_CODES_HELP)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of text")
    return parser


# --------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _cwd_importable():
    """Make the current directory importable (as ``python -m`` would) while loading user code."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def read_safetensors(path: str, device: str = "cpu") -> Dict[str, Any]:
    """The tensors of a ``.safetensors`` file, read by the ``safetensors`` package (nothing in
    the file is executed); a bad file is a one-line :class:`CliError` saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
    except SafetensorError as why:
        text = str(why).split("Error while deserializing:", 1)[-1].strip().split(" at line ")[0]
        if "incomplete" in text or "too small" in text or "too large" in text:
            raise CliError(f"{name} is truncated or not a safetensors file ({text})") from why
        if "invalid JSON" in text:
            raise CliError(f"{name} is corrupt or not a safetensors file: its header is not JSON the format "
                           f"allows ({text})") from why
        raise CliError(f"{name} is corrupt or not a safetensors file ({text})") from why
    except Exception as why:  # (anything else the package raises on a foreign file)
        raise CliError(f"{name} is corrupt or not a safetensors file ({_short(why, 160)})") from why
    return {key: t.to(device) for key, t in tensors.items()}


def _looks_like_safetensors(path: str) -> bool:
    if path.lower().endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 32


def load_file(path: str, *, trust_pickle: bool, device: str) -> Any:
    """The object stored in ``path``: a state dict from safetensors or weights-only torch.load, or
    (with ``trust_pickle``) whatever the pickle holds."""
    import torch

    name = os.path.basename(path)
    if not os.path.exists(path):
        raise CliError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise CliError(f"input is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CliError(f"input file is empty: {path}")
    if _looks_like_safetensors(path):
        return read_safetensors(path, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as why:
            if "weights only load failed" not in str(why).lower():
                raise CliError(f"cannot read {name}: corrupt or not a PyTorch checkpoint ({_short(why, 160)})") from why
            needs_code = why
        except Exception as why:  # zip/EOF/key errors: a truncated or foreign file
            raise CliError(f"cannot read {name}: truncated, corrupt or not a PyTorch checkpoint "
                           f"({_short(why, 160)})") from why
        if not trust_pickle:
            detail = _weights_only_reason(needs_code)
            if detail.startswith("Unsupported global"):
                what = f"{name} is a pickle that names code{_code_in_checkpoint(path)}: loading it runs that code"
            else:
                what = (f"{name} cannot be read as weights only ({detail}): loading it needs full unpickling, "
                        "which can run code")
            raise CliError(
                f"{what}, so it is refused. If you trust the file, pass --trust-pickle; otherwise save a state dict "
                "(torch.save(model.state_dict(), path)) and give --model package.module:factory") from needs_code
        with _cwd_importable():
            try:
                return torch.load(path, map_location=device, weights_only=False)
            except (AttributeError, ModuleNotFoundError, ImportError) as why:
                raise CliError(f"cannot load {name}: the class it was pickled with is not importable here "
                               f"({_short(why, 160)}); make that code importable (e.g. run from its directory) "
                               "or save a state dict and use --model") from why
            except Exception as why:
                raise CliError(f"cannot read {name}: corrupt or not a PyTorch checkpoint ({_short(why, 160)})") from why


def _weights_only_reason(why: BaseException) -> str:
    """The weights-only unpickler's own reason, from torch's long message."""
    text = str(why)
    tail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    lines = [l.strip() for l in tail.splitlines() if l.strip()]
    return lines[0].split(" was not an allowed global")[0][:160] if lines else "unknown reason"


def _code_in_checkpoint(path: str) -> str:
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint
        names = get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return ""
    if not names:
        return ""
    names = sorted(names, key=lambda n: (n.startswith("torch."), n))  # the user's own classes first
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f" ({shown})"


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def as_state_dict(obj: Any) -> Optional[Dict[str, Any]]:
    """``obj`` as a name -> tensor mapping, looking one level into a training checkpoint; else None."""
    import torch

    def tensors_only(m):
        return isinstance(m, Mapping) and m and all(isinstance(k, str) for k in m) and \
            all(isinstance(v, torch.Tensor) for v in m.values())

    if tensors_only(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if tensors_only(obj.get(key)):
                return dict(obj[key])
    return None


def resolve_factory(spec: str):
    """``package.module:attr[.attr]`` -> the callable it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"bad --model {spec!r}: expected package.module:factory, like mypkg.nets:build")
    with _cwd_importable():
        try:
            obj = importlib.import_module(module_name)
        except ImportError as why:
            raise CliError(f"--model {spec}: cannot import module {module_name!r} ({_short(why, 160)})") from why
        except Exception as why:
            raise CliError(f"--model {spec}: importing {module_name!r} failed ({_short(why, 160)})") from why
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"--model {spec}: unknown factory, {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"--model {spec}: {attr!r} is a {type(obj).__name__}, not a callable that builds a model")
    return obj


def _parse_kwargs(text: Optional[str]) -> Dict[str, Any]:
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as why:
        raise CliError(f"bad --model-kwargs: not valid JSON ({why})") from why
    if not isinstance(kwargs, dict):
        raise CliError(f"bad --model-kwargs: expected a JSON object like '{{\"c\": 16}}', got {type(kwargs).__name__}")
    return kwargs


def build_model(spec: str, kwargs: Dict[str, Any], state: Dict[str, Any], source: str):
    """Call the factory, load ``state`` strictly, return the model in eval mode."""
    import torch.nn as nn

    factory = resolve_factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as why:
        raise CliError(f"--model {spec}: calling it with {json.dumps(kwargs)} failed ({_short(why, 200)})") from why
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec} returned a value of type {type(model).__name__}, not an nn.Module")
    expected = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                  if k in state and hasattr(v, "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise CliError(f"the state dict in {source} does not fit the model from --model {spec}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except Exception as why:
        raise CliError(f"the state dict in {source} does not fit the model from --model {spec} "
                       f"({_short(why, 200)})") from why
    return model.eval()


def load_model(args) -> Tuple[Any, str]:
    """The model the arguments name, and a short description of where it came from."""
    import torch.nn as nn

    if args.example:
        if args.input or args.model:
            raise CliError("--example uses the built-in network: give either --example or IN, not both")
        from .examples import example_net
        return example_net().to(args.device), "the built-in example network (repc.examples.example_net)"
    if not args.input:
        raise CliError("no model given: pass IN (a checkpoint file) or --example")
    from .pretrained import is_model_dir
    if is_model_dir(args.input):
        raise CliError(f"{args.input} is a transformers model directory: `repc fuse {args.input} [--adapter DIR] "
                       "-o OUT_DIR` merges it (`repc inspect` takes a checkpoint file)")
    if args.model_kwargs is not None and not args.model:
        raise CliError("--model-kwargs needs --model")
    kwargs = _parse_kwargs(args.model_kwargs)
    name = os.path.basename(args.input)
    obj = load_file(args.input, trust_pickle=args.trust_pickle, device=args.device)
    if isinstance(obj, nn.Module):
        if args.model:
            raise CliError(f"{name} holds a whole model ({type(obj).__name__}), not a state dict: drop --model")
        training = [n or "<model>" for n, m in obj.named_modules() if m.training]
        if training:
            if not args.eval:
                shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
                raise CliError(f"the model in {name} is in training mode ({shown}): pass --eval to fuse its "
                               "inference form (BatchNorm running statistics, no dropout)")
            obj.eval()
        return obj, f"{name} ({type(obj).__name__})"
    state = as_state_dict(obj)
    if state is None:
        raise CliError(f"{name} holds a {type(obj).__name__}, not an nn.Module or a state dict of tensors")
    if not args.model:
        raise CliError(f"{name} holds a state dict ({len(state)} tensors): give --model package.module:factory "
                       "to build the architecture it belongs to")
    model = build_model(args.model, kwargs, state, name)
    return model.to(args.device), f"{name} loaded into {args.model} ({type(model).__name__})"


class ExampleCall:
    """The example inputs the model is called with: positional, then keyword."""

    def __init__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        self.args, self.kwargs = tuple(args), dict(kwargs)

    def __call__(self, model):
        return model(*self.args, **self.kwargs)

    def tensors(self) -> List[Any]:
        return list(self.args) + list(self.kwargs.values())

    def described(self) -> List[Dict[str, Any]]:
        named = [(None, t) for t in self.args] + list(self.kwargs.items())
        return [{**({"name": n} if n else {}), "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for n, t in named]

    def __str__(self) -> str:
        return ", ".join((f"{d['name']}=" if "name" in d else "") + "x".join(map(str, d["shape"])) + f" {d['dtype']}"
                         for d in self.described())


def example_inputs(args, model) -> ExampleCall:
    """``--example-input`` as inputs: ``SHAPE`` a positional float input (the model's dtype or
    ``--dtype``), ``NAME=SHAPE[:DTYPE]`` a keyword one (token ids drawn below the model's
    smallest embedding table, masks all ones: :func:`repc.pretrained.keyword_input`)."""
    import torch
    import torch.nn as nn

    from .pretrained import PretrainedError, keyword_input

    specs = args.example_input or ([EXAMPLE_SHAPE] if args.example else None)
    if not specs:
        raise CliError("give --example-input SHAPE (like 1x3x224x224, or input_ids=1x32:int64 for a keyword input): "
                       "repc runs the model on it to trace shapes and to verify the result")
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = next((t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()),
                     torch.float32)
    vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=0)
    gen = torch.Generator().manual_seed(args.seed)
    positional, keywords = [], {}
    for spec in specs:
        try:
            named = keyword_input(spec, vocab, gen, default_float=dtype, device=args.device) if "=" in spec else None
        except PretrainedError as why:
            raise CliError(str(why)) from why
        if named is not None:
            keywords[named[0]] = named[1]
        elif keywords:
            raise CliError(f"--example-input {spec}: a positional input after a keyword one")
        else:
            positional.append(torch.randn(parse_shape(spec), generator=gen).to(dtype=dtype, device=args.device))
    return ExampleCall(tuple(positional), keywords)


# --------------------------------------------------------------------------------------------
# output


def check_output_path(path: str, *, what: str, force: bool, inputs: Sequence[str]) -> None:
    """Refuse before any work: OUT equal to an input, anything but a regular file (a directory, a
    device such as /dev/null, a FIFO, a socket, a link to one of those; even with --force), a
    missing folder, or existing without --force (all exit 2); a folder that is not writable (exit 1,
    as any output that cannot be written)."""
    real = os.path.realpath(path)
    for other in inputs:
        if other and (real == os.path.realpath(other) or
                      (os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other))):
            raise CliError(f"{what} {path} is the input file: refusing to overwrite the input")
    special = not_a_regular_file(path)
    if special:
        raise CliError(f"{what} {path} {special}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{what} {path}: folder {folder} is not writable", EXIT_INTERNAL)
    if os.path.lexists(path) and not force:
        raise CliError(f"{what} {path} already exists: pass --force to overwrite it")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"))


def not_a_regular_file(path: str) -> Optional[str]:
    """What is wrong with writing a file at ``path`` when something other than a regular file
    (or a link to one) is there: ``"is a directory"``, ``"is a symlink to /dev/null, a character
    device, not a regular file: ..."``; None when ``path`` is free, a regular file, or a dangling link."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None  # nothing there, or a dangling link (the link itself is replaced)
    except OSError as why:
        return f"cannot be examined ({_short(why)})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    link = f"is a symlink to {os.path.realpath(path)}, " if os.path.islink(path) else "is "
    if kind == "a directory" and not link.startswith("is a symlink"):
        return "is a directory"
    return f"{link}{kind}, not a regular file: refusing to replace or write through it (even with --force)"


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    readers see the old file or the whole new one, never a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        special = not_a_regular_file(path)  # (again: it may have appeared since the check)
        if special:
            raise CliError(f"{path} {special}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def portable_copy(fused, report_dict: Dict[str, Any]):
    """A shallow copy of ``fused`` that pickles without repc: the report as a plain dict, and no
    repc tracer class recorded on its GraphModules.  ``fused`` itself is left as it is."""
    import torch.fx as fx

    saved = copy.copy(fused)
    if not any(m.training for m in fused.modules()):
        saved.eval()  # (the copy's new containers for dotted submodule paths start in training mode)
    saved.__dict__.pop("repc_report", None)
    saved.repc_report = report_dict
    for m in saved.modules():
        if isinstance(m, fx.GraphModule) and _from_repc(m.__dict__.get("_tracer_cls")):
            m._tracer_cls = None  # re-tracing on load then uses torch.fx's own Tracer
    return saved


def _from_repc(obj) -> bool:
    module = getattr(obj, "__module__", "") or ""
    return module == "repc" or module.startswith("repc.")


_IMPORTS_REPC = re.compile(r"(^|\n)\s*(from|import)\s+repc(\.|\s|$)")


def repc_references(data: bytes) -> List[str]:
    """What a ``torch.save`` archive (pickle protocol 2) needs from repc to load: the classes and
    functions its pickle names, and imports in the code of GraphModules.  Nothing is executed."""
    found: List[str] = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            if not name.endswith(".pkl"):
                continue
            for op, arg, _ in pickletools.genops(archive.read(name)):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    module = arg.split(" ")[0]
                    if module == "repc" or module.startswith("repc."):
                        found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append("(unchecked STACK_GLOBAL)")  # not produced by protocol 2
                elif isinstance(arg, str) and _IMPORTS_REPC.search(arg):
                    found.append("an import of repc in generated code")
    return sorted(set(found))


FORMATS = ("graphmodule", "module", "state-dict", "export")


def output_format(args) -> str:
    """``--format``, or from OUT's name: ``.safetensors`` a state dict, else the graph module."""
    if args.format:
        return args.format
    return "state-dict" if args.output.lower().endswith(".safetensors") else "graphmodule"


def plain_state_dict(module) -> Dict[str, Any]:
    """``module.state_dict()`` as plain contiguous tensors, none sharing memory (safetensors
    refuses shared storage; tied weights are written once per name)."""
    out, seen = {}, set()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        out[name] = t.clone() if key in seen else t
        if key is not None:
            seen.add(key)
    return out


def fits_architecture(model, fused) -> bool:
    """Whether ``fused``'s state dict loads into ``model``'s own architecture (same names and
    shapes): every module repc swapped in kept its class."""
    theirs, ours = model.state_dict(), fused.state_dict()
    return theirs.keys() == ours.keys() and all(tuple(theirs[k].shape) == tuple(ours[k].shape) for k in ours)


def serialize_state_dict(fused, path: str, report) -> bytes:
    """The fused model's state dict as ``.safetensors`` (the safetensors package; the report's
    output kind in its metadata) or, for any other name, ``torch.save``."""
    import torch

    tensors = plain_state_dict(fused)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save
        return save(tensors, metadata={"format": "pt", "producer": "repc", "repc_output": report.output})
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def serialize(saved, fmt: str, inputs, model_code: Sequence[str] = ()) -> bytes:
    """``saved`` as bytes: a ``torch.export`` program, or the pickled module, which must not need
    repc to load (``model_code``: the modules of the model's own classes, which a pickled
    module-preserving model needs anyway)."""
    import torch

    buf = io.BytesIO()
    if fmt == "export":
        try:
            from .capture_export import export_program
            # batch and sizes dynamic where the model allows
            program = export_program(saved, inputs.args, inputs.kwargs)
        except Exception as why:
            raise CliError(f"torch.export cannot export the fused model ({_short(why, 200)}); "
                           "use --format graphmodule", EXIT_INTERNAL) from why
        torch.export.save(program, buf)
        return buf.getvalue()
    torch.save(saved, buf, pickle_protocol=2)
    data = buf.getvalue()
    needs = [n for n in repc_references(data) if n.rpartition(".")[0] not in model_code]
    if needs:
        model_code = all(n.startswith("repc.examples.") for n in needs)
        raise CliError(f"the fused model would not load without repc: it still contains {', '.join(needs[:3])}"
                       + (" (parts of the model that were not fused)" if model_code else "")
                       + "; nothing written" + ("" if model_code else " (please report this)"), EXIT_INTERNAL)
    return data


# --------------------------------------------------------------------------------------------
# measuring


def measure_latency(models: Sequence[Any], inputs, budget_s: float = 1.0, max_rounds: int = 50) -> List[Optional[float]]:
    """Median seconds per forward pass of each model on ``inputs``.

    The models run interleaved, one pass each per round, so that a change in the machine's load
    during the measurement affects them alike; a model that raises gets None.
    """
    import torch

    def once(model) -> float:
        t0 = time.perf_counter()
        inputs(model)
        if any(getattr(t, "is_cuda", False) for t in inputs.tensors()):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    alive = list(range(len(models)))
    times: List[List[float]] = [[] for _ in models]
    with torch.no_grad():
        for i in list(alive):
            try:
                once(models[i])  # warm-up
            except Exception:
                alive.remove(i)
        start = time.perf_counter()
        rounds = 0
        while alive and (rounds < 3 or (rounds < max_rounds and time.perf_counter() - start < budget_s)):
            for i in alive:
                times[i].append(once(models[i]))
            rounds += 1
    return [statistics.median(t) if t else None for t in times]


def count_flops(model, inputs) -> Optional[int]:
    """Floating-point operations of one forward pass, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            inputs(model)
        return int(counter.get_total_flops())
    except Exception:
        return None


def measure(original, fused, inputs, benchmark: bool) -> Dict[str, Any]:
    """Parameters and the multiply-accumulates of the fused regions (from the report); with
    ``benchmark`` also whole-model FLOPs and median latency of the original and the fused model."""
    report = fused.repc_report
    gains: Dict[str, Any] = {
        "params_before": report.params_before,
        "params_after": report.params_after,
        "region_macs_before": sum(r.macs_before - r.shared_macs for r in report.rewrites),
        "region_macs_after": sum(r.macs_after for r in report.rewrites),
        "flops_before": None,
        "flops_after": None,
        "latency_ms_before": None,
        "latency_ms_after": None,
        "device": str(inputs.tensors()[0].device) if inputs.tensors() else "cpu",
    }
    if benchmark:
        gains["flops_before"], gains["flops_after"] = count_flops(original, inputs), count_flops(fused, inputs)
        before, after = measure_latency([original, fused], inputs)
        gains["latency_ms_before"] = None if before is None else before * 1e3
        gains["latency_ms_after"] = None if after is None else after * 1e3
    return gains


# --------------------------------------------------------------------------------------------
# printing


def _change(before: Optional[float], after: Optional[float]) -> str:
    if not before or after is None:
        return ""
    return f" ({(after - before) / before * 100:+.1f}%)"


def render(report, gains: Dict[str, Any], *, detailed: bool) -> str:
    """The report as text: a table of the rewrites (with what each becomes when ``detailed``),
    the regions kept and why, the parts not captured, verification and the totals."""
    from .report import describe_region, describe_rules, format_table, group_rewrites, rewrite_rows
    lines: List[str] = []
    if report.rewrites:
        lines.append(f"{len(report.rewrites)} fusable region(s):" if detailed else
                     f"{len(report.rewrites)} region(s) fused:")
        lines.extend(format_table(rewrite_rows(report.rewrites)))
        if detailed:
            lines.append("")
            for where, members in group_rewrites(report.rewrites):
                r = members[0]
                lines.append(f"  {where}: {describe_region(r)} ({describe_rules(r.rules)}"
                             f"{'' if r.exact else ', approximate'}{f'; ×{len(members)}' if len(members) > 1 else ''}):")
                lines.append(f"    replaces: {', '.join(r.replaced)}")
                for res in r.result:
                    lines.append(f"    becomes:  {res}")
    elif report.rolled_back:
        lines.append("no region fused: every rewrite was rolled back")
    else:
        lines.append("no fusable region found")
    lines.extend(report.output_lines())
    lines.extend(report.notes())
    lines.append("")
    lines.append("gains" + (" (estimated; nothing written)" if detailed else "") + ":")
    lines.append(f"  parameters   {report.params_before:,} -> {report.params_after:,}"
                 f"{_change(report.params_before, report.params_after)}")
    if report.rewrites:
        lines.append(f"  MACs         {gains['region_macs_before']:,} -> {gains['region_macs_after']:,}"
                     f"{_change(gains['region_macs_before'], gains['region_macs_after'])}  (fused regions, example input)")
    if gains.get("flops_before") is not None and gains.get("flops_after") is not None:
        lines.append(f"  FLOPs        {gains['flops_before']:,} -> {gains['flops_after']:,}"
                     f"{_change(gains['flops_before'], gains['flops_after'])}  (whole model, example input)")
    lines.append(f"  graph nodes  {report.nodes_before} -> {report.nodes_after}")
    if gains.get("latency_ms_before") is not None and gains.get("latency_ms_after") is not None:
        b, a = gains["latency_ms_before"], gains["latency_ms_after"]
        lines.append(f"  latency      {b:.3f} ms -> {a:.3f} ms ({b / a:.2f}x; median on the example input, "
                     f"{gains.get('device', 'cpu')})" if a else f"  latency      {b:.3f} ms -> {a:.3f} ms")
    return "\n".join(lines)


def report_document(command: str, args, report, gains, inputs, *, output: Optional[str], written: bool):
    from . import __version__

    return {
        "repc_version": __version__,
        "command": command,
        "input": "<built-in example>" if args.example else args.input,
        "model": args.model,
        "output": output,
        "format": getattr(args, "format", None),
        "written": written,
        "example_inputs": inputs.described(),
        "gains": gains,
        "report": json.loads(report.to_json()),
    }


# --------------------------------------------------------------------------------------------
# commands


def _compile(args, progress: Progress, graph: bool = True):
    import repc

    model, origin = load_model(args)
    inputs = example_inputs(args, model)
    progress.note(f"model: {origin}; example input {inputs}")
    with progress.step("compiling (trace, merge affine regions, verify)", bars=True):
        try:
            fused = repc.compile(model, inputs.args, inputs.kwargs, verify=True, tolerance=args.tolerance, graph=graph,
                                 progress=not progress.quiet, cost=args.cost)
        except repc.ReparamError as why:
            raise CliError(str(why).splitlines()[0] if str(why) else type(why).__name__) from why
    if args.no_benchmark:
        gains = measure(model, fused, inputs, benchmark=False)
    else:
        with progress.step("measuring FLOPs and latency"):
            gains = measure(model, fused, inputs, benchmark=True)
    return model, fused, inputs, gains


def _verification_failed(report) -> Optional[str]:
    v = report.verification
    if v is not None and not v.ok:
        return (f"verification failed on input {v.failing_input}: max deviation {v.max_deviation:.2e} > tolerance "
                f"{v.tolerance:g}" + (f" ({v.error})" if v.error else ""))
    if report.rolled_back:
        return "verification failed: every rewrite was rolled back"
    return None


def cmd_fuse_directory(args, progress: Progress) -> int:
    """``repc fuse BASE_DIR [--adapter ADAPTER_DIR] -o OUT_DIR``: merged unit by unit, weights
    read from the shards as each unit needs them (:mod:`repc.out_of_core`)."""
    import transformers

    from . import out_of_core, pretrained

    try:
        pretrained.check_out_dir(args.output, args.input, args.adapter, args.force)
        shard = pretrained.parse_size(args.max_shard_size) if args.max_shard_size else None
        unit = pretrained.parse_size(args.unit_size, "--unit-size") if args.unit_size else None
        config = transformers.AutoConfig.from_pretrained(args.input, local_files_only=True,
                                                         trust_remote_code=args.trust_remote_code)
        kwargs = pretrained.example_inputs(config, args.example_input, args.seed, args.device,
                                           default_float=out_of_core.CheckpointReader(args.input).floating_dtype())
    except (pretrained.PretrainedError, out_of_core.OutOfCoreError) as why:
        raise CliError(str(why)) from why
    except (OSError, ValueError) as why:
        raise CliError(f"cannot read {args.input}: {_short(why)}") from why
    progress.note(f"merging {args.input}" + (f" and the adapter {args.adapter}" if args.adapter else "") +
                  f" unit by unit; example input {ExampleCall((), kwargs)}")
    doc = {"command": "fuse", "input": args.input, "adapter": args.adapter, "output": args.output,
           "example_inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in kwargs.items()},
           "max_shard_bytes": shard}
    try:
        result = out_of_core.merge_directory(
            args.input, args.adapter, args.output, kwargs, max_shard_bytes=shard, unit_bytes=unit,
            trust_remote_code=args.trust_remote_code, device=args.device, tolerance=args.tolerance, cost=args.cost,
            whole_model_check=not args.no_whole_model_check, replay=not args.compile_every_unit,
            extra_files=pretrained.copied_file,
            report_name=pretrained.REPORT_NAME, report_extra=doc, note=progress.note)
    except out_of_core.MergeFailed as why:
        raise CliError(f"{why}; nothing written", EXIT_VERIFICATION) from why
    except out_of_core.OutOfCoreError as why:
        raise CliError(str(why)) from why
    except OSError as why:
        raise CliError(f"cannot merge into {args.output}: {_short(why)}", EXIT_INTERNAL) from why
    print(_merged_summary(result))
    print(f"wrote {args.output} ({len(result.files)} weight file(s), {result.bytes_written:,} bytes, "
          f"{result.copied} weight(s) copied unchanged, and {pretrained.REPORT_NAME}) in {result.seconds:.1f} s; "
          f"load it with transformers.AutoModel*.from_pretrained(path)")
    return EXIT_OK


def _merged_summary(result) -> str:
    check = result.check
    return (f"merged {len(result.merged_layers)} layer(s) in {len(result.units)} unit(s) "
            f"({sum(u.rewrites for u in result.units)} rewrite(s)), each unit verified on its own; "
            + (f"the written model matches the original on the example (max deviation {check['max_deviation']:.1e}, "
               f"tolerance {check['tolerance']:.1e}" + (f"; within 4x the {check['rounding_noise']:.1e} that rounding "
                                                        "the original's weights brings" if check.get("within_noise")
                                                        else "") + ")" if check else "whole-model check skipped"))


def cmd_fuse(args, progress: Progress) -> int:
    import torch.fx as fx
    from .pretrained import is_model_dir

    if args.input and is_model_dir(args.input):
        return cmd_fuse_directory(args, progress)
    for flag, value in (("--adapter", args.adapter), ("--max-shard-size", args.max_shard_size),
                        ("--unit-size", args.unit_size), ("--no-whole-model-check", args.no_whole_model_check),
                        ("--compile-every-unit", args.compile_every_unit),
                        ("--trust-remote-code", args.trust_remote_code)):
        if value:
            raise CliError(f"{flag} applies to a transformers model directory as IN (one with a config.json)")
    inputs_given = [args.input] if args.input else []
    check_output_path(args.output, what="OUT", force=args.force, inputs=inputs_given)
    if args.report:
        check_output_path(args.report, what="--report", force=args.force, inputs=inputs_given)
        if os.path.realpath(args.report) == os.path.realpath(args.output):
            raise CliError("--report and OUT are the same file")
    fmt = output_format(args)
    # the graph module and the export program are of the whole-model graph; the pickled module and
    # the state dict are of the module-preserving model (the model's own class, modules swapped in)
    model, fused, inputs, gains = _compile(args, progress, graph=fmt in ("graphmodule", "export"))
    report = fused.repc_report
    print(render(report, gains, detailed=False))
    failure = _verification_failed(report)
    written_as = describe_output(fmt, args.output, report)
    if failure is None and fmt == "graphmodule" and not isinstance(fused, fx.GraphModule):
        cls = type(fused)
        print(f"repc: note: the model does not trace as a whole, so {args.output} keeps its class "
              f"{cls.__module__}.{cls.__qualname__} around the fused parts: loading it needs that code importable",
              file=sys.stderr)
    if failure is None and fmt in ("module", "state-dict") and report.output != "module-preserving":
        print(f"repc: note: {args.output} holds the whole-model graph, not the model's own class: "
              f"{report.output_note}", file=sys.stderr)
    fits = fits_architecture(model, fused) if fmt == "state-dict" else None
    data = None
    if failure is None:
        saved = portable_copy(fused, json.loads(report.to_json()))
        with progress.step(f"writing {args.output} ({written_as})"):
            if fmt == "state-dict":
                data = serialize_state_dict(fused, args.output, report)
            else:
                model_code = sorted({type(m).__module__ for m in model.modules()}) if fmt == "module" else ()
                data = serialize(saved, fmt, inputs, model_code)
            try:
                atomic_write(args.output, data)
            except OSError as why:
                raise CliError(f"cannot write {args.output}: {_short(why)}", EXIT_INTERNAL) from why
    if args.report:
        doc = report_document("fuse", args, report, gains, inputs, output=args.output if data else None,
                              written=data is not None)
        doc["format"], doc["written_as"] = fmt, written_as
        if fits is not None:
            doc["state_dict_fits_architecture"] = fits
        try:
            atomic_write(args.report, json.dumps(doc, indent=2, default=str).encode())
        except OSError as why:
            raise CliError(f"cannot write {args.report}: {_short(why)}", EXIT_INTERNAL) from why
    if failure is not None:
        raise CliError(failure + "; nothing written", EXIT_VERIFICATION)
    if fmt == "export":
        loader = "torch.export.load(path)"
    elif fmt == "graphmodule":
        loader = "torch.load(path, weights_only=False); repc is not needed"
    elif fmt == "module":
        code = sorted({type(m).__module__ for m in model.modules()} - {"torch"} -
                      {n for n in {type(m).__module__ for m in model.modules()} if n.startswith("torch.")})
        loader = "torch.load(path, weights_only=False) where the model's code is importable" + \
            (f" ({', '.join(code[:3])})" if code else "")
    else:
        reader = "safetensors.torch.load_file(path)" if args.output.lower().endswith(".safetensors") \
            else "torch.load(path)"
        loader = f"{reader}, then load_state_dict into " + \
            ("the model's own architecture (every module repc swapped in kept its class)" if fits else
             "the fused model (repc.compile(model, x, graph=False)); its swapped modules differ from the "
             "architecture's")
    print(f"\nwrote {args.output} ({len(data):,} bytes, {written_as}); load it with {loader}")
    return EXIT_OK


def describe_output(fmt: str, path: str, report) -> str:
    """What OUT holds, in words: which format, of which model."""
    model = "the model's own class, fused modules swapped in" if report.output == "module-preserving" \
        else "the whole-model graph"
    if fmt == "state-dict":
        kind = "safetensors" if path.lower().endswith(".safetensors") else "torch.save"
        return f"state dict ({kind}) of {model}"
    if fmt == "export":
        return "torch.export program of the whole-model graph"
    if fmt == "module":
        return f"pickled module: {model}"
    return f"pickled GraphModule: {model}"


def cmd_inspect(args, progress: Progress) -> int:
    model, fused, inputs, gains = _compile(args, progress)
    report = fused.repc_report
    if args.json:
        doc = report_document("inspect", args, report, gains, inputs, output=None, written=False)
        print(json.dumps(doc, indent=2, default=str))
    else:
        print("repc inspect: ran the same pipeline as `repc fuse` (repc.compile); nothing is written\n")
        print(render(report, gains, detailed=True))
    failure = _verification_failed(report)
    if failure is not None:
        raise CliError(failure + "; `repc fuse` would write nothing", EXIT_VERIFICATION)
    return EXIT_OK


EXIT_BROKEN_PIPE = 128 + 13  # the reader of stdout went away (``repc inspect | head -1``), as SIGPIPE reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be handled, not at interpreter exit
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """After the reader of stdout closed the pipe: send what is still buffered to /dev/null, so
    that Python's own flush at exit does not raise again."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _flush_stdout() -> None:
    """Flush stdout before a message on stderr; a reader that went away is no new error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(args.quiet)
    command = {"fuse": cmd_fuse, "inspect": cmd_inspect}[args.command]
    try:
        if args.tolerance is not None and not args.tolerance > 0:  # (NaN too)
            raise CliError(f"bad --tolerance {args.tolerance:g}: it must be a positive number")
        return command(args, progress)
    except BrokenPipeError:
        raise
    except CliError as why:
        if args.debug:
            traceback.print_exc()
        _flush_stdout()
        print(f"repc: error: {why}", file=sys.stderr)
        return why.code
    except KeyboardInterrupt:
        print("repc: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as why:
        if args.debug:
            traceback.print_exc()
        _flush_stdout()
        print(f"repc: internal error: {_short(why)} (rerun with --debug for the traceback and please report it)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
