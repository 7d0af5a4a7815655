"""A transformers model directory (``save_pretrained``'s layout) and its PEFT adapter, merged.

``repc fuse BASE_DIR [--adapter ADAPTER_DIR] -o OUT_DIR``: the architecture comes from
``config.json`` (its ``architectures`` entry; no pickle, remote code only with
``--trust-remote-code``), the weights from BASE_DIR's safetensors shards, the adapter from
ADAPTER_DIR through PEFT.  The model is compiled with ``in_place=True`` (the merged weights are
written into the loaded model's own tensors, so the compile needs little more memory than the
model) on token inputs drawn from the config's vocabulary, verified as every compile is, and
saved with ``save_pretrained`` into a temporary sibling of OUT_DIR, with BASE_DIR's other files
(tokenizer, generation settings) and repc's report, then renamed to OUT_DIR: a failure leaves no
OUT_DIR.  ``AutoModel*.from_pretrained(OUT_DIR)`` loads the plain architecture.

The whole model is held in memory once (as loaded); reading and writing shard by shard, for
checkpoints larger than the machine's memory, is not done here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
REPORT_NAME = "repc_report.json"


class PretrainedError(Exception):
    """A directory that is not what it must be, or a model that cannot be merged and saved: one line."""


def is_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def load(base_dir: str, adapter_dir: Optional[str], trust_remote_code: bool, device: str = "cpu"):
    """(the model in eval mode, its config, a description)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_dir, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        if not names:
            raise PretrainedError(f"{base_dir}/config.json names no architecture ('architectures' is missing)")
        if not trust_remote_code:
            raise PretrainedError(f"{base_dir}/config.json names {names[0]}, which transformers does not define: "
                                  "pass --trust-remote-code to run the directory's own code")
        cls = transformers.AutoModelForCausalLM if names[0].endswith("ForCausalLM") else transformers.AutoModel
    model = cls.from_pretrained(base_dir, local_files_only=True, dtype="auto", trust_remote_code=trust_remote_code)
    origin = f"{os.path.basename(os.path.normpath(base_dir))} ({type(model).__name__}, " \
             f"{next(model.parameters()).dtype})"
    if adapter_dir is not None:
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise PretrainedError(f"--adapter {adapter_dir}: no adapter_config.json there (PEFT's save_pretrained layout)")
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, local_files_only=True)
        origin += f" with the adapter {os.path.basename(os.path.normpath(adapter_dir))} " \
                  f"({model.peft_config['default'].peft_type.value})"
    return model.to(device).eval(), config, origin


_INPUT = re.compile(r"^(\w+)=(\d+(?:x\d+)*)(?::(\w+))?$")


def example_inputs(config, specs, seed: int, device: str = "cpu") -> Dict[str, Any]:
    """Keyword inputs: each ``name=SHAPE[:dtype]`` of ``specs`` (``input_ids=1x32:int64``), ids
    drawn in the config's vocabulary and masks all ones; by default ``input_ids`` of 1x32 (and
    its all-ones ``attention_mask``)."""
    import torch

    vocab = int(getattr(config, "vocab_size", 0) or 0)
    specs = specs or ["input_ids=1x32:int64", "attention_mask=1x32:int64"]
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, Any] = {}
    for spec in specs:
        m = _INPUT.match(spec.replace(" ", ""))
        if m is None:
            raise PretrainedError(f"bad --example-input {spec!r}: a model directory takes keyword inputs, "
                                  "like input_ids=1x32:int64")
        name, shape, dtype = m.group(1), tuple(int(s) for s in m.group(2).split("x")), m.group(3)
        dtype = getattr(torch, dtype or ("int64" if "ids" in name or "mask" in name else "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise PretrainedError(f"bad --example-input {spec!r}: unknown dtype {m.group(3)!r}")
        if "mask" in name:
            value = torch.ones(shape, dtype=dtype)
        elif not dtype.is_floating_point:
            if not vocab:
                raise PretrainedError(f"--example-input {spec}: the config gives no vocab_size to draw ids from")
            value = torch.randint(0, vocab, shape, generator=gen, dtype=dtype)
        else:
            value = torch.randn(shape, generator=gen).to(dtype)
        out[name] = value.to(device)
    return out


def largest_shard_bytes(base_dir: str) -> int:
    """The size of BASE_DIR's largest weight file: the output's shards are cut at it."""
    sizes = [os.path.getsize(os.path.join(base_dir, f)) for f in os.listdir(base_dir)
             if WEIGHT_FILES.match(f) and not f.endswith(".json")]
    return max(sizes, default=5 * 2 ** 30)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text or "", re.IGNORECASE)
    if m is None:
        raise PretrainedError(f"bad --max-shard-size {text!r}: expected a size like 500MB or 2GB")
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


def save(fused, base_dir: str, out_dir: str, max_shard_bytes: int, report_doc: Dict[str, Any]) -> Tuple[int, int]:
    """``fused`` saved with ``save_pretrained`` into a temporary sibling of ``out_dir``, with
    BASE_DIR's other files and the report, then renamed to ``out_dir`` (an earlier OUT_DIR, one
    repc wrote, replaced only then).  Returns (weight files, bytes written)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(out_dir))}.", suffix=".tmp", dir=parent)
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # (repc's own progress line says it)
    try:
        fused.save_pretrained(tmp, max_shard_size=max_shard_bytes)
        written = set(os.listdir(tmp))
        for name in sorted(os.listdir(base_dir)):  # the tokenizer, generation settings, the model card...
            source = os.path.join(base_dir, name)
            if name in written or WEIGHT_FILES.match(name) or name in ADAPTER_FILES or not os.path.isfile(source):
                continue
            shutil.copy2(source, os.path.join(tmp, name))
        with open(os.path.join(tmp, REPORT_NAME), "w") as f:
            json.dump(report_doc, f, indent=2, default=str)
        weights = [f for f in os.listdir(tmp) if WEIGHT_FILES.match(f) and not f.endswith(".json")]
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in weights)
        if os.path.isdir(out_dir):
            old = out_dir.rstrip("/") + f".replaced-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        return len(weights), total
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
