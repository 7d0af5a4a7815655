"""Merging a LoRA adapter into a Llama-style checkpoint directory, as people ship them: the CLI
``repc fuse BASE_DIR --adapter ADAPTER_DIR -o OUT_DIR`` against PEFT (``from_pretrained``, then
``merge_and_unload`` and ``save_pretrained``), against copying the files, and against one
``torch.export`` of the model.

A base model is built from a config with random weights (no hub) in its dtype and saved in
shards of ``--shard-size``, a rank-16 LoRA on all seven projections (random weights) beside it;
then each method runs in a fresh process (the files synced to disk before each), timed, its
peak resident memory read from the OS (``VmHWM`` of that process, imports included; not
``ru_maxrss``, which a child process inherits from the parent it was forked from).  repc merges unit by unit
(:mod:`repc.out_of_core`): each decoder layer's weights are read from the shards when the layer
is called on the example, the layer is compiled and verified, its merged weights go to the
output shards, which are written as they fill; then the written model is run again, unit by
unit, against the original's output.  PEFT loads the whole model and does not verify.
``export`` is the time of ``torch.export.export`` alone, on the model loaded by
``from_pretrained`` (the loading is not counted).  Last, the two merged directories are loaded
with ``from_pretrained`` and their logits compared (relative to the largest logit), beside the
difference between PEFT's merge and the unmerged model (base and adapter, run by PEFT) in the
same dtype: the rounding a merge brings, which a second merge can only match.

    .venv/bin/python benchmarks/bench_llm_checkpoint.py                 # small (126M, float32)
    .venv/bin/python benchmarks/bench_llm_checkpoint.py --sizes xl      # 1.5B, bfloat16, 500 MB shards
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
    with torch.no_grad():  # (norm weights of 1 would hide an error in folding them)
        for name, p in base.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
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
    extra: Dict[str, float] = {}
    if name == "make":
        return make_checkpoint(base, lora, shard)
    if name == "copy":
        shutil.copytree(base, out)
    elif name == "export":
        import torch
        import transformers
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto").eval()
        ids = torch.randint(0, model.config.vocab_size, (1, 32))
        start = time.perf_counter()
        torch.export.export(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False},
                            strict=False)
    elif name == "peft":
        import peft
        import transformers
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        peft.PeftModel.from_pretrained(model, lora).merge_and_unload().save_pretrained(out, max_shard_size=shard)
    elif name == "compare":
        extra = compare(*base.split(os.pathsep), *lora.split(os.pathsep))
    else:
        from repc import cli
        code = cli.main(["fuse", base, "--adapter", lora, "-o", out, "--max-shard-size", shard, "-q"])
        if code:
            raise SystemExit(code)
    return {"seconds": time.perf_counter() - start,
            "peak_gib": peak_gib(), **extra}


def peak_gib() -> float:
    """This process's peak resident memory: ``VmHWM`` (reset by exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def compare(peft_dir: str, repc_dir: str, base: str, lora: str) -> Dict[str, float]:
    """The two merged directories loaded with ``from_pretrained``, their logits on token ids of
    two lengths (no mask; and a padded mask): largest difference relative to the largest logit;
    and the same between PEFT's merge and the unmerged model (the rounding floor)."""
    import warnings

    import peft
    import torch
    import transformers
    warnings.simplefilter("ignore")
    load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()  # noqa: E731
    a, b = load(peft_dir), load(repc_dir)
    unmerged = peft.PeftModel.from_pretrained(load(base), lora).eval()
    worst = {"relative_difference": 0.0, "peft_merge_vs_unmerged": 0.0}
    gen = torch.Generator().manual_seed(0)
    for n, length in ((1, 16), (2, 48)):
        ids = torch.randint(0, a.config.vocab_size, (n, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, : length // 4] = 0
        for m in (None, mask):
            with torch.no_grad():
                x, y, z = (model(input_ids=ids, attention_mask=m).logits.double() for model in (a, b, unmerged))
            scale = x.abs().max()
            worst["relative_difference"] = max(worst["relative_difference"], float((x - y).abs().max() / scale))
            worst["peft_merge_vs_unmerged"] = max(worst["peft_merge_vs_unmerged"], float((x - z).abs().max() / scale))
    return worst


def in_fresh_process(name: str, base: str, lora: str, out: str, shard: str) -> Dict[str, float]:
    os.sync()  # (what an earlier method wrote is on disk: no method pays for another's writeback)
    got = subprocess.run([sys.executable, __file__, "--method", name, base, lora, out, shard], capture_output=True,
                         text=True, check=False)
    if got.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def run(size: str, shard: str) -> Dict[str, Dict[str, float]]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        results = {"checkpoint": in_fresh_process("make", size, folder, "-", shard)}
        base, lora = os.path.join(folder, "base"), os.path.join(folder, "lora")
        for name in ("copy", "export", "peft", "repc"):
            results[name] = in_fresh_process(name, base, lora, os.path.join(folder, name), shard)
            if name == "copy":
                shutil.rmtree(os.path.join(folder, name))
        results["compare"] = in_fresh_process("compare", os.pathsep.join([os.path.join(folder, "peft"),
                                                                          os.path.join(folder, "repc")]),
                                              os.pathsep.join([base, lora]), "-", shard)
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
        baseline = got["copy"]["seconds"] + got["export"]["seconds"]
        rows.append([size, f"{made['params'] / 1e6:.0f}M", f"{made['base_gib']:.2f}", f"{made['largest_shard_gib']:.2f}",
                     f"{got['copy']['seconds']:.1f}", f"{got['export']['seconds']:.1f}",
                     f"{got['peft']['seconds']:.1f} / {got['peft']['peak_gib']:.2f}",
                     f"{got['repc']['seconds']:.1f} / {got['repc']['peak_gib']:.2f}",
                     f"{got['repc']['seconds'] / baseline:.2f}x",
                     f"{got['compare']['relative_difference']:.1e} ({got['compare']['peft_merge_vs_unmerged']:.1e})"])
    print(common.format_table(["size", "params", "base GiB", "largest shard GiB", "copy s", "export s",
                               "PEFT s / peak GiB", "repc fuse s / peak GiB", "repc / (copy + export)",
                               "repc vs PEFT logits (PEFT vs unmerged)"], rows))
    if args.json:
        common.write_json(args.json, results)


if __name__ == "__main__":
    main()
