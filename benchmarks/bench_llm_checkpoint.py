"""Merging a LoRA adapter into a Llama-style checkpoint directory, as people ship them: the CLI
``repc fuse BASE_DIR --adapter ADAPTER_DIR -o OUT_DIR`` against PEFT (``from_pretrained``, then
``merge_and_unload`` and ``save_pretrained``) and against copying the files.

A base model is built from a config with random weights (no hub) in its dtype and saved in
shards of ``--shard-size``, a rank-16 LoRA on all seven projections (random weights) beside it;
then each method runs in a fresh process, timed, its peak resident memory read from the OS
(``ru_maxrss`` of that process, imports included).  Sizes as in ``bench_llm_merge.py``.  Both merges load the whole
model into memory: repc merges in place (``in_place=True``) and verifies the result; PEFT does
not verify.  Reading and writing shard by shard is not done, so the peak is the model's size
and more, not a few shards'.

    .venv/bin/python benchmarks/bench_llm_checkpoint.py                 # small (126M, float32)
    .venv/bin/python benchmarks/bench_llm_checkpoint.py --sizes large   # 862M, bfloat16, 500 MB shards
    .venv/bin/python benchmarks/bench_llm_checkpoint.py --quick         # a 2-layer model, smoke configuration
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402
from bench_llm_merge import SIZES, TARGETS  # noqa: E402

def make_checkpoint(size: str, folder: str, shard: str) -> Dict[str, float]:
    """BASE_DIR and ADAPTER_DIR under ``folder``; returns their sizes."""
    import warnings

    import peft
    import torch
    import transformers

    hidden, layers, intermediate, vocab, dtype = SIZES[size]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 256))
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        base = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    base.save_pretrained(os.path.join(folder, "base"), max_shard_size=shard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False),
                                   autocast_adapter_dtype=False)
    lora.save_pretrained(os.path.join(folder, "lora"))
    return {"params": sum(p.numel() for p in base.parameters()),
            "base_gib": _folder_bytes(os.path.join(folder, "base")) / 2 ** 30,
            "largest_shard_gib": max(os.path.getsize(os.path.join(folder, "base", f))
                                     for f in os.listdir(os.path.join(folder, "base"))
                                     if f.endswith(".safetensors")) / 2 ** 30}


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def method(name: str, base: str, lora: str, out: str, shard: str) -> Dict[str, float]:
    """One method in this process: its seconds and this process's peak resident memory (GiB)."""
    import warnings

    start = time.perf_counter()
    if name == "copy":
        shutil.copytree(base, out)
    elif name == "peft":
        import peft
        import transformers
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        peft.PeftModel.from_pretrained(model, lora).merge_and_unload().save_pretrained(out, max_shard_size=shard)
    else:
        from repc import cli
        code = cli.main(["fuse", base, "--adapter", lora, "-o", out, "--max-shard-size", shard, "-q"])
        if code:
            raise SystemExit(code)
    return {"seconds": time.perf_counter() - start,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def in_fresh_process(name: str, base: str, lora: str, out: str, shard: str) -> Dict[str, float]:
    got = subprocess.run([sys.executable, __file__, "--method", name, base, lora, out, shard], capture_output=True,
                         text=True, check=False)
    if got.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def run(size: str, shard: str) -> Dict[str, Dict[str, float]]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        made = make_checkpoint(size, folder, shard)
        base, lora = os.path.join(folder, "base"), os.path.join(folder, "lora")
        results = {"checkpoint": made}
        for name in ("copy", "peft", "repc"):
            results[name] = in_fresh_process(name, base, lora, os.path.join(folder, name), shard)
        return results


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small"], choices=list(SIZES))
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--quick", action="store_true", help="the quick size only (a smoke run)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--method", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(method(*args.method)))
        return
    rows, results = [], {}
    for size in (["quick"] if args.quick else args.sizes):
        got = run(size, args.shard_size)
        results[size] = got
        made = got["checkpoint"]
        rows.append([size, f"{made['params'] / 1e6:.0f}M", f"{made['base_gib']:.2f}", f"{made['largest_shard_gib']:.2f}",
                     f"{got['copy']['seconds']:.1f}",
                     f"{got['peft']['seconds']:.1f} / {got['peft']['peak_gib']:.2f}",
                     f"{got['repc']['seconds']:.1f} / {got['repc']['peak_gib']:.2f}"])
    print(common.format_table(["size", "params", "base GiB", "largest shard GiB", "cp -r s", "PEFT s / peak GiB",
                               "repc fuse s / peak GiB"], rows))
    if args.json:
        common.write_json(args.json, results)


if __name__ == "__main__":
    main()
