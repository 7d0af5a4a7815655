"""What ``repc fuse BASE_DIR [--adapter ADAPTER_DIR] -o OUT_DIR`` takes and gives, as files.

BASE_DIR is in transformers' ``save_pretrained`` layout (``config.json``, safetensors shards and
their index), ADAPTER_DIR in PEFT's; OUT_DIR is written in BASE_DIR's layout.  The merge itself,
unit by unit with weights read from the shards as they are needed, is :mod:`repc.out_of_core`.
Here: the checks on the directories given, the example inputs drawn from the config, and sizes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
REPORT_NAME = "repc_report.json"


class PretrainedError(Exception):
    """A directory that is not what it must be, or a model that cannot be merged and saved: one line."""


def is_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


_INPUT = re.compile(r"^(\w+)=(\d+(?:x\d+)*)(?::(\w+))?$")


def keyword_input(spec: str, vocab: int, gen, default_float=None, device: str = "cpu") -> Optional[Tuple[str, Any]]:
    """``name=SHAPE[:dtype]`` (``input_ids=1x32:int64``) as (name, tensor): a mask all ones,
    other integer inputs (token ids) drawn below ``vocab``, floats drawn from a normal; the dtype
    by default int64 for names with ``ids`` or ``mask`` in them, else ``default_float``
    (float32).  None where ``spec`` is not of that form."""
    import torch

    m = _INPUT.match(spec.replace(" ", ""))
    if m is None:
        return None
    name, shape, given = m.group(1), tuple(int(s) for s in m.group(2).split("x")), m.group(3)
    if any(n <= 0 for n in shape):
        raise PretrainedError(f"bad --example-input {spec!r}: every size must be positive")
    if given is None:
        dtype = torch.int64 if "ids" in name or "mask" in name else (default_float or torch.float32)
    else:
        dtype = getattr(torch, given, None)
        usable = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                  torch.int64, torch.uint8, torch.bool)
        if dtype not in usable:
            raise PretrainedError(f"bad --example-input {spec!r}: unknown dtype {given!r} (one of float32, "
                                  "bfloat16, float16, float64, int64, int32, int16, int8, uint8, bool)")
    if "mask" in name:
        value = torch.ones(shape, dtype=dtype)
    elif dtype == torch.bool:
        value = torch.ones(shape, dtype=dtype)
    elif not dtype.is_floating_point:
        if vocab <= 0:
            raise PretrainedError(f"--example-input {spec}: no vocabulary size is known to draw ids from")
        value = torch.randint(0, vocab, shape, generator=gen, dtype=dtype)
    else:
        value = torch.randn(shape, generator=gen).to(dtype)
    return name, value.to(device)


def default_inputs(config) -> list:
    """What a model of ``config`` is called with by default: ``input_ids`` of 1x32 and its
    all-ones ``attention_mask`` where it has a vocabulary, else ``pixel_values`` of its image
    size and channels where it has those."""
    if getattr(config, "vocab_size", None):
        return ["input_ids=1x32:int64", "attention_mask=1x32:int64"]
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and size > 0:
        size = (size, size)
    if channels and isinstance(size, (tuple, list)) and len(size) == 2:
        return [f"pixel_values=1x{channels}x{size[0]}x{size[1]}"]
    raise PretrainedError("the config has no vocabulary and no image size: give the inputs with --example-input "
                          "NAME=SHAPE[:DTYPE], like pixel_values=1x3x224x224")


def example_inputs(config, specs, seed: int, device: str = "cpu", default_float=None) -> Dict[str, Any]:
    """Keyword inputs: each ``name=SHAPE[:dtype]`` of ``specs`` (:func:`keyword_input`), ids
    drawn in the config's vocabulary, floats in ``default_float`` unless a spec names a dtype;
    by default :func:`default_inputs`."""
    import torch

    vocab = int(getattr(config, "vocab_size", 0) or 0)
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, Any] = {}
    for spec in specs or default_inputs(config):
        got = keyword_input(spec, vocab, gen, default_float=default_float, device=device)
        if got is None:
            raise PretrainedError(f"bad --example-input {spec!r}: a model directory takes keyword inputs, "
                                  "like input_ids=1x32:int64")
        out[got[0]] = got[1]
    return out


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text or "", re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise PretrainedError(f"bad {flag} {text!r}: expected a size like 500MB or 2GB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}[unit]
    return int(float(m.group(1)) * scale)


def check_out_dir(out_dir: str, base_dir: str, adapter_dir: Optional[str], force: bool) -> None:
    """Refuse before any work: OUT_DIR one of the inputs, a file, a directory repc did not write
    (even with --force), or one it did without --force."""
    real = os.path.realpath(out_dir)
    for given in (base_dir, adapter_dir):
        if given and real == os.path.realpath(given):
            raise PretrainedError(f"OUT {out_dir} is an input directory: refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise PretrainedError(f"OUT {out_dir}: folder {parent} does not exist")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise PretrainedError(f"OUT {out_dir} exists and is not a directory: a model directory is written there")
        if not os.path.isfile(os.path.join(out_dir, REPORT_NAME)):
            raise PretrainedError(f"OUT {out_dir} is a directory repc did not write: refusing to replace it")
        if not force:
            raise PretrainedError(f"OUT {out_dir} already exists: pass --force to replace it")


def copied_file(name: str) -> bool:
    """Whether BASE_DIR's file ``name`` goes into OUT_DIR as it is (the config, tokenizer,
    generation settings, model card: not its weights, not an adapter's files)."""
    return not WEIGHT_FILES.match(name) and name not in ADAPTER_FILES and name != REPORT_NAME
