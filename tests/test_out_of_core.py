"""repc.out_of_core: a transformers directory and its adapter merged unit by unit, weights read
from the shards as each unit needs them, shards written as they fill."""

import gc
import json
import os
import warnings
import weakref

import pytest
import torch

from repc import out_of_core
from repc.out_of_core import CheckpointReader, CheckpointWriter, MergeFailed

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(tmp_path, dtype=torch.float32, tie=False, layers=3, shard="60KB", targets=TARGETS, hidden=32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=tie)
    base = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # (unit norm weights hide folding errors)
    base.save_pretrained(tmp_path / "base", max_shard_size=shard)
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
                                   autocast_adapter_dtype=False)
    lora.save_pretrained(tmp_path / "lora")
    return tmp_path / "base", tmp_path / "lora"


def _example(n=2, length=9, vocab=128):
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _peft_merged(base_dir, adapter_dir, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype)
        return peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


# ----------------------------------------------------------------------------- reading and writing

def _saved(tmp_path, tensors, name="model.safetensors"):
    from safetensors.torch import save_file
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / name))
    return CheckpointReader(str(tmp_path / name))


def test_a_checkpoint_is_written_in_the_layout_laid_out_first_and_reads_back_as_given(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(16, 16) for i in range(5)}
    tensors["big.weight"] = torch.randn(64, 64)  # larger than a shard: a shard of its own
    tensors["half.weight"] = torch.randn(3, 5).to(torch.bfloat16)
    tensors["steps"] = torch.arange(7)
    source = _saved(tmp_path / "in", tensors)
    layout = out_of_core.cut_layout(source, max_bytes=3 * 16 * 16 * 4)
    names = [name for name, _ in layout]
    assert names == [f"model-0000{i}-of-0000{len(names)}.safetensors" for i in range(1, len(names) + 1)]
    assert [k for k, _, _ in next(entries for _, entries in layout if any(k == "big.weight" for k, _, _ in entries))] \
        == ["big.weight"]
    out = tmp_path / "out"
    out.mkdir()
    writer = CheckpointWriter(str(out), layout)
    for k in reversed(list(tensors)):  # (in any order)
        writer.write(k, tensors[k])
    assert writer.finish() == names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == \
        sum(t.numel() * t.element_size() for t in tensors.values())
    reader = CheckpointReader(str(out))
    from safetensors.torch import load_file
    for name in names:  # safetensors itself reads what was written
        for k, t in load_file(str(out / name)).items():
            assert torch.equal(t, tensors[k]) and t.dtype == tensors[k].dtype
    for k, t in tensors.items():
        assert torch.equal(reader.read(k), t) and reader.shape(k) == tuple(t.shape) and reader.dtype(k) == t.dtype


def test_a_writer_refuses_a_weight_of_another_shape_or_name_and_a_missing_one(tmp_path):
    source = _saved(tmp_path / "in", {"a": torch.ones(3), "b": torch.ones(2, 2)})
    (tmp_path / "out").mkdir()
    writer = CheckpointWriter(str(tmp_path / "out"), out_of_core.same_layout(source))
    with pytest.raises(MergeFailed, match=r"the merged a is \[4\]"):
        writer.write("a", torch.ones(4))
    with pytest.raises(MergeFailed, match="c is not a weight of the checkpoint"):
        writer.write("c", torch.ones(3))
    writer.write("a", torch.ones(3))
    with pytest.raises(MergeFailed, match="b was never written"):
        writer.finish()


def test_a_shard_missing_from_its_index_is_named(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    source = _saved(tmp_path / "in", {"a": torch.ones(2), "b": torch.ones(2)})
    writer = CheckpointWriter(str(folder), out_of_core.cut_layout(source, max_bytes=8))
    writer.write("a", torch.ones(2))
    writer.write("b", torch.ones(2))
    writer.finish()
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(out_of_core.OutOfCoreError, match="model-00002-of-00002.safetensors, named in its index"):
        CheckpointReader(str(folder))


# ----------------------------------------------------------------------------- units

def _weightless(base_dir, adapter_dir=None):
    reader = CheckpointReader(str(base_dir))
    config = transformers.AutoConfig.from_pretrained(base_dir)
    model = out_of_core.weightless_model(config, out_of_core.architecture(config, False), reader.floating_dtype())
    names = out_of_core.checkpoint_names(model, out_of_core.SavedNames(model, reader))
    if adapter_dir is not None:
        model = out_of_core.attach_adapter(model, str(adapter_dir))
    return model, names


def test_a_model_built_without_weights_holds_its_adapter_and_buffers_but_no_base_weight(tmp_path):
    base_dir, adapter_dir = _llama(tmp_path)
    model, _ = _weightless(base_dir, adapter_dir)
    devices = {n: p.device.type for n, p in model.named_parameters()}
    assert all(d == "meta" for n, d in devices.items() if "lora_" not in n)
    adapter = [d for n, d in devices.items() if "lora_" in n]
    assert adapter and all(d == "cpu" for d in adapter)
    saved = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    want = dict(saved.named_parameters())
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, want[n])
    assert all(b.device.type == "cpu" for b in model.buffers())  # (rotary frequencies, computed at build)


def test_a_directory_naming_code_of_its_own_is_built_through_an_auto_class_without_weights(tmp_path):
    base_dir, _ = _llama(tmp_path)
    config = transformers.AutoConfig.from_pretrained(base_dir)
    config.architectures = ["MyOwnForCausalLM"]
    with pytest.raises(out_of_core.OutOfCoreError, match="pass --trust-remote-code"):
        out_of_core.architecture(config, trust_remote_code=False)
    cls = out_of_core.architecture(config, trust_remote_code=True)
    model = out_of_core.weightless_model(config, cls, torch.bfloat16, trust_remote_code=True)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


def test_units_are_the_largest_modules_under_the_budget_and_peft_layers_are_never_split(tmp_path):
    base_dir, adapter_dir = _llama(tmp_path)
    model, names = _weightless(base_dir, adapter_dir)
    tree = model.get_base_model()
    layer_bytes = sum(p.numel() * 4 for n, p in tree.model.layers[0].named_parameters() if "lora_" not in n)
    by_layer = out_of_core.plan_units(tree, names, budget=layer_bytes)
    assert sorted(by_layer.units.values()) == sorted(
        ["model.embed_tokens", "model.norm", "lm_head"] + [f"model.layers.{i}" for i in range(3)])
    whole = out_of_core.plan_units(tree, names, budget=10 ** 9)
    assert list(whole.units.values()) == [""]
    tiny = sorted(out_of_core.plan_units(tree, names, budget=1).units.values())
    assert "model.layers.0.self_attn" in tiny and "model.layers.0.mlp" in tiny  # (they call the LoRA layers)
    assert "model.layers.0.input_layernorm" in tiny and not [u for u in tiny if "proj" in u]


def test_a_weight_two_modules_share_is_held_outside_the_units(tmp_path):
    base_dir, _ = _llama(tmp_path, tie=True)
    model, names = _weightless(base_dir)
    plan = out_of_core.plan_units(model, names, budget=40_000)
    assert "lm_head" not in plan.units.values() and "model.embed_tokens" not in plan.units.values()
    assert {names[(id(m), n)] for m, n in plan.held} == {"model.embed_tokens.weight"}


# ----------------------------------------------------------------------------- merging

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_directory_merged_layer_by_layer_reloads_to_merge_and_unload(tmp_path, dtype):
    base_dir, adapter_dir = _llama(tmp_path, dtype=dtype)
    out = tmp_path / "merged"
    result = out_of_core.merge_directory(str(base_dir), str(adapter_dir), str(out), _example(),
                                         max_shard_bytes=60_000, unit_bytes=60_000,
                                         extra_files=lambda name: name == "tokenizer_config.json")
    assert sorted(os.listdir(out)) == sorted(result.files + ["model.safetensors.index.json", "config.json",
                                                             "tokenizer_config.json", "repc_report.json"])
    assert [u.path for u in result.units] == ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(3)] + \
        ["model.norm", "lm_head"]
    assert len(result.merged_layers) == 3 * len(TARGETS) and result.check["max_deviation"] <= result.check["tolerance"]
    assert (out / "tokenizer_config.json").exists() and (out / "repc_report.json").exists()
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    merged = _peft_merged(base_dir, adapter_dir, dtype)
    for n, length, mask in ((1, 5, None), (3, 11, "ones"), (2, 7, "padded")):  # not the example's sizes
        ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(n))
        m = None if mask is None else torch.ones_like(ids)
        if mask == "padded":
            m[0, :3] = 0
        got, want = _logits(reloaded.eval(), ids, m), _logits(merged, ids, m)
        assert (got - want).abs().max() / want.abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_after_the_second_replay_its_ops_and_write_what_their_own_compiles_write(tmp_path, dtype):
    base_dir, adapter_dir = _llama(tmp_path, dtype=dtype, layers=4)
    runs = {}
    for replay in (True, False):
        out = tmp_path / f"merged-{replay}"
        runs[replay] = out_of_core.merge_directory(str(base_dir), str(adapter_dir), str(out), _example(),
                                                   unit_bytes=60_000, replay=replay)
    layers = {u.path: u for u in runs[True].units if ".layers." in u.path}
    assert layers["model.layers.0"].replay == "" and layers["model.layers.1"].replay.startswith("recorded")
    assert all(layers[f"model.layers.{i}"].replay.startswith("the ops of model.layers.1's") for i in (2, 3))
    assert not any(u.replay for u in runs[False].units)
    assert runs[True].merged_layers == runs[False].merged_layers
    replayed, compiled = CheckpointReader(str(tmp_path / "merged-True")), CheckpointReader(str(tmp_path / "merged-False"))
    assert replayed.keys() == compiled.keys()
    eps = torch.finfo(dtype).eps
    for key in compiled.keys():  # (float64 sums in another order: an ulp of the dtype at most)
        a, b = replayed.read(key).double(), compiled.read(key).double()
        assert ((a - b).abs() <= eps * b.abs() + 1e-30).all(), key


def test_a_layer_whose_replay_fails_its_check_is_compiled_and_says_why(tmp_path, monkeypatch):
    base_dir, adapter_dir = _llama(tmp_path, layers=3)
    monkeypatch.setattr(out_of_core, "check_replayed", lambda *a, **k: (0.5, "on the example: deviation 5.00e-01"))
    result = out_of_core.merge_directory(str(base_dir), str(adapter_dir), str(tmp_path / "merged"), _example(),
                                         unit_bytes=60_000)
    third = next(u for u in result.units if u.path == "model.layers.2")
    assert third.replay.startswith("compiled: replaying model.layers.1's failed (on the example: deviation")
    assert third.rewrites == len(TARGETS) and result.check["max_deviation"] <= result.check["tolerance"]


def test_weights_are_read_one_unit_at_a_time(tmp_path, monkeypatch):
    base_dir, adapter_dir = _llama(tmp_path, layers=4)
    total = sum(os.path.getsize(base_dir / f) for f in os.listdir(base_dir) if f.endswith(".safetensors"))
    live, peak = [], [0]
    read = CheckpointReader.read

    def tracked(self, key):
        t = read(self, key)
        live.append(weakref.ref(t))
        gc.collect()
        peak[0] = max(peak[0], sum(r().numel() * r().element_size() for r in live if r() is not None))
        return t

    monkeypatch.setattr(CheckpointReader, "read", tracked)
    unit = 12_000 * 4  # (about one decoder layer)
    result = out_of_core.merge_directory(str(base_dir), str(adapter_dir), str(tmp_path / "merged"), _example(),
                                         unit_bytes=unit, whole_model_check=False)
    assert len(result.units) == 7 and result.check is None
    # one unit's weights (a decoder layer, or the token embedding): nothing is buffered for writing
    assert peak[0] <= unit < total / 3


def test_a_tied_embedding_is_written_once_as_the_checkpoint_has_it(tmp_path):
    base_dir, adapter_dir = _llama(tmp_path, tie=True, targets=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    out_of_core.merge_directory(str(base_dir), str(adapter_dir), str(out), _example(), max_shard_bytes=40_000)
    assert sorted(CheckpointReader(str(out)).keys()) == sorted(CheckpointReader(str(base_dir)).keys())
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = _example(3, 6)["input_ids"]
    want = _logits(_peft_merged(base_dir, adapter_dir, torch.float32), ids)
    assert (_logits(reloaded, ids) - want).abs().max() / want.abs().max() < 1e-5


def test_a_wrong_merged_weight_is_caught_by_the_whole_model_check_and_nothing_is_written(tmp_path, monkeypatch):
    base_dir, adapter_dir = _llama(tmp_path)
    unit_weights = out_of_core._unit_weights

    def off_by_a_little(path, fused, reader, saved):
        weights = unit_weights(path, fused, reader, saved)
        if path == "model.layers.1":
            weights = {k: t * 1.01 if k.endswith("o_proj.weight") else t for k, t in weights.items()}
        return weights

    monkeypatch.setattr(out_of_core, "_unit_weights", off_by_a_little)
    out = tmp_path / "merged"
    with pytest.raises(MergeFailed, match="the written model differs from the original on the example"):
        out_of_core.merge_directory(str(base_dir), str(adapter_dir), str(out), _example(), max_shard_bytes=60_000)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".merged")]


def test_an_adapter_that_does_not_fit_the_model_is_refused_in_one_line(tmp_path):
    base_dir, _ = _llama(tmp_path)
    _, other = _llama(tmp_path / "wider", hidden=64)
    with pytest.raises(out_of_core.OutOfCoreError, match=r"do not fit the model \(size mismatch for .*lora_A"):
        out_of_core.merge_directory(str(base_dir), str(other), str(tmp_path / "merged"), _example(),
                                    max_shard_bytes=60_000)
    assert not (tmp_path / "merged").exists()


def test_a_model_with_norm_statistics_in_its_checkpoint_reads_them_and_keeps_its_names(tmp_path):
    # a ResNet: BatchNorm running statistics are buffers the checkpoint holds; each conv-BN folds
    # inside its unit and the BN stays a BN (identity statistics), so every name is kept
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="basic", num_labels=10)
    model = transformers.ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    model.save_pretrained(tmp_path / "base")
    out = tmp_path / "merged"
    result = out_of_core.merge_directory(str(tmp_path / "base"), None, str(out),
                                         {"pixel_values": torch.randn(2, 3, 32, 32)}, unit_bytes=20_000)
    assert len(result.units) > 2 and sum(u.rewrites for u in result.units) >= 4
    reloaded, info = transformers.ResNetForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        want = model(x).logits
        assert (reloaded.eval()(x).logits - want).abs().max() / want.abs().max() < 1e-5
    stats = CheckpointReader(str(out))
    assert any(torch.equal(stats.read(k), torch.zeros_like(stats.read(k))) for k in stats.keys()
               if k.endswith("running_mean"))  # (a BN folded into its conv: identity statistics)



@pytest.mark.parametrize("unit_bytes", [1_000, 10 ** 9])  # (each block's attention and MLP; the whole model)
def test_gpt2_conv1d_layers_with_a_tied_head_merge_by_units_or_whole(tmp_path, unit_bytes):
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                                                 bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                         fan_in_fan_out=True, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    out = tmp_path / "merged"
    result = out_of_core.merge_directory(str(tmp_path / "base"), str(tmp_path / "lora"), str(out),
                                         _example(vocab=100), unit_bytes=unit_bytes)
    assert len(result.merged_layers) >= 8 and (len(result.units) > 4) == (unit_bytes < 10 ** 9)
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                                tmp_path / "lora").merge_and_unload().eval()
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(2))
    want = _logits(merged, ids)
    assert (_logits(reloaded.eval(), ids) - want).abs().max() / want.abs().max() < 1e-5


@pytest.mark.parametrize("method", ["vera", "dora", "classifier head"])
def test_adapters_with_shared_buffers_magnitudes_or_a_trained_head_copy_merge_as_merge_and_unload(tmp_path, method):
    # VeRA: projections shared by every layer (buffers the adapter holds); DoRA: magnitudes;
    # modules_to_save: PEFT trains a copy of the classifier head, which the merge takes
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    cls = transformers.LlamaForSequenceClassification if method == "classifier head" else transformers.LlamaForCausalLM
    base = cls(config).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base.save_pretrained(tmp_path / "base")
    adapter = {"vera": peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False),
               "dora": peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                                       init_lora_weights=False),
               "classifier head": peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"],
                                                  init_lora_weights=False)}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(base, adapter)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "modules_to_save" in name or "lora_magnitude" in name or "vera_lambda" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    lora.save_pretrained(tmp_path / "lora")
    out = tmp_path / "merged"
    out_of_core.merge_directory(str(tmp_path / "base"), str(tmp_path / "lora"), str(out), _example(), unit_bytes=1)
    reloaded = cls.from_pretrained(out).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"),
                                                tmp_path / "lora").merge_and_unload().eval()
    ids = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = reloaded(input_ids=ids).logits.double(), merged(input_ids=ids).logits.double()
    assert (got - want).abs().max() / want.abs().max() < 1e-5


@pytest.mark.parametrize("case", [
    # found by tests/fuzz_hf.py --through-directory 20KB (seed 8): bfloat16 rounding through the
    # layers moves the output past the dtype's tolerance; rounding the original's own weights moves
    # it as far, so the written model is within the noise (as the compile's own check judges it)
    "HFCase(arch='vit', method='vera', targets='all', attn='eager', use_cache=False, seed=30072, dtype='bfloat16')",
    # found with --through-directory 1KB (seed 7): a classifier head PEFT trains a copy of was left wrapped
    "HFCase(arch='llama', method='rslora', targets='mlp', attn='sdpa', use_cache=False, seed=16448, "
    "head='classifier')",
])
def test_fuzz_cases_through_the_directory_path_are_exact(case):
    import fuzz_hf
    from fuzz_hf import HFCase  # noqa: F401 (the case's repr names it)

    result = fuzz_hf.run_case(eval(case), fuzz_hf.through_directory("20KB"))
    assert result.outcome == "exact", result.detail
