"""Merging a LoRA adapter into a Llama-style model: ``repc.compile`` against PEFT's
``merge_and_unload`` and against ``torch.export`` of the same model, time and peak memory.

Each (size, method) runs in a fresh process, as a user merges a model: the model is built from a
config with random weights (no hub), LoRA of rank 16 on all seven projections with every adapter
weight random, then one of

* ``peft``: ``merge_and_unload()`` (the adapter written into the model's own weights, in place);
* ``export``: repc's capture alone (``torch.export``, non-strict, every axis ``Dim.AUTO``);
* ``repc``: ``repc.compile(model, (), {"input_ids", "attention_mask"})``, the default output
  (the model's own class, each LoRA layer a plain ``nn.Linear``; the user's model untouched),
  with its per-region and whole-model checks.

Reported per run: the parameters and their bytes, the time of the call, and the growth of the
peak resident memory during it (``ru_maxrss`` after, less the resident memory before: what the
merge needs above the loaded model).  ``repc`` also shows its time and memory as ratios to
``export``, and its memory as what it needs beyond the parameter bytes (the merged weights are
new tensors, since the user's model is not mutated: the parameter bytes are the floor).  Sizes
(hidden, layers, intermediate, vocabulary, dtype):

    tiny    256 x 4,  688, 32000, float32   (~21M parameters)
    small   768 x 12, 2048, 32000, float32  (~126M)
    medium  1024 x 16, 2816, 32000, float32 (~230M)
    large   2048 x 16, 5632, 32000, bfloat16 (~850M)

    .venv/bin/python benchmarks/bench_llm_merge.py                  # tiny and small (~2 minutes)
    .venv/bin/python benchmarks/bench_llm_merge.py --sizes medium large
    .venv/bin/python benchmarks/bench_llm_merge.py --quick          # a 2-layer model, smoke configuration
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

SIZES: Dict[str, Tuple[int, int, int, int, str]] = {
    "quick": (64, 2, 128, 1000, "float32"),
    "tiny": (256, 4, 688, 32000, "float32"),
    "small": (768, 12, 2048, 32000, "float32"),
    "medium": (1024, 16, 2816, 32000, "float32"),
    "large": (2048, 16, 5632, 32000, "bfloat16"),
    "xl": (2048, 30, 5632, 32000, "bfloat16"),  # 1.48B parameters
}
METHODS = ("peft", "export", "repc")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def run_one(size: str, method: str) -> Dict[str, float]:
    """One merge in this process: its time and its peak memory above the loaded model."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    hidden, layers, intermediate, vocab, dtype = SIZES[size]
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 256))
    torch.set_default_dtype(dtype)  # (built in its dtype: no float32 model first)
    try:
        base = transformers.LlamaForCausalLM(config).eval()
        model = get_peft_model(base, LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False),
                               autocast_adapter_dtype=False).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = model(**inputs)
    before = _resident_gib()
    start = time.perf_counter()
    if method == "peft":
        model.merge_and_unload()
    elif method == "export":
        from repc.capture_export import export_graph, register_output_dataclasses
        register_output_dataclasses(expected)
        export_graph(model, (), inputs, expected)
    else:
        import repc
        fused = repc.compile(model, (), inputs, progress=False)
        assert fused.repc_report.output == "module-preserving", fused.repc_report
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"params": params, "param_gib": param_bytes / 2 ** 30, "dtype": str(dtype).replace("torch.", ""),
            "seconds": seconds, "extra_gib": peak - before}


def run_fresh(size: str, method: str) -> Dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--one", size, method], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{size}/{method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="the quick size only (a smoke run)")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    sizes = ["quick"] if args.quick else args.sizes
    rows, results = [], {}
    for size in sizes:
        got = {method: run_fresh(size, method) for method in METHODS}
        results[size] = got
        repc_run, export_run, peft_run = got["repc"], got["export"], got["peft"]
        rows.append([size, f"{repc_run['params'] / 1e6:.1f}M", f"{repc_run['param_gib']:.2f}",
                     f"{peft_run['seconds']:.2f} / {peft_run['extra_gib']:.2f}",
                     f"{export_run['seconds']:.2f} / {export_run['extra_gib']:.2f}",
                     f"{repc_run['seconds']:.2f} / {repc_run['extra_gib']:.2f}",
                     common.fmt_ratio(common.ratio(repc_run["seconds"], export_run["seconds"])),
                     f"{repc_run['extra_gib'] - repc_run['param_gib']:+.2f}"])
    print(common.format_table(["size", "params", "param GiB", "peft s / +GiB", "export s / +GiB",
                               "repc s / +GiB", "repc/export time", "repc +GiB beyond params"], rows))
    if args.json:
        common.write_json(args.json, results)


if __name__ == "__main__":
    main()
