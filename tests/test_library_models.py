"""Real third-party models (transformers, PEFT) built from small configs with random weights:
repc fuses them through torch.export to no more heavy ops and norms than their own conversion
(PEFT's ``merge_and_unload``), with the same outputs on other batch and sequence sizes."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import repc
from repc.capture_export import export_graph
from repc.report import op_counts

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")



def randomized(model: nn.Module) -> nn.Module:
    """All parameters moved off their init (zero biases, unit norms, zero LoRA B hide errors)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def export_counts(model, kwargs):
    """(heavy ops, norms) of ``model`` as torch.export captures it (unfused): a conversion's, or
    repc's default result's, counted the same way."""
    return op_counts(export_graph(model, (), kwargs).gm)


def assert_same_outputs(fused, reference, make_inputs, field):
    for batch, length in ((1, 5), (3, 11)):
        kwargs = make_inputs(batch, length)
        with torch.no_grad():
            got, want = getattr(fused(**kwargs), field), getattr(reference(**kwargs), field)
        assert got.shape == want.shape
        deviation = (got - want).abs().max() / want.abs().max()
        assert deviation < 1e-4, deviation


def assert_same_logits(fused, reference, calls):
    """``fused``'s logits within 1e-5 (relative max) of ``reference``'s on each call."""
    for kwargs in calls:
        with torch.no_grad():
            got, want = fused(**kwargs).logits, reference(**kwargs).logits
        assert (got - want).abs().max() / want.abs().max() < 1e-5


def assert_reloads_as(fused, cls, folder, example):
    """``fused`` saved with save_pretrained reloads as ``cls`` with no key missing or unexpected,
    and gives its logits on ``example``."""
    fused.save_pretrained(folder)
    reloaded, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**example).logits, fused(**example).logits, atol=1e-6)


def token_inputs(vocab):
    def make(batch, length):
        g = torch.Generator().manual_seed(batch * 100 + length)
        return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
                "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    return make


def image_inputs(size):
    def make(batch, length):
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))}
    return make


def bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50, max_position_embeddings=64)
    return transformers.BertModel(config), ["query", "value"], token_inputs(50), "last_hidden_state"


def vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4)
    model = transformers.ViTModel(config)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in ("q_proj", "v_proj", "query", "value") if t in names]
    return model, targets, image_inputs(16), "last_hidden_state"


def gpt2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config), ["c_attn", "c_proj"], token_inputs(50), "last_hidden_state"


MODELS = {"bert": bert, "vit": vit, "gpt2": gpt2}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_library_model_is_captured_whole_and_keeps_its_function(name):
    model, _, make_inputs, field = MODELS[name]()
    model = randomized(model)
    example = make_inputs(2, 7)
    fused = repc.compile(model, (), example)
    report = fused.repc_report
    assert report.front_end == "torch.export" and report.verification.ok and not report.rolled_back, report
    assert type(fused(**example)) is type(model(**example))  # the ModelOutput stays one
    heavy, norms = export_counts(fused, example)
    ref_heavy, ref_norms = export_counts(model, example)
    assert heavy <= ref_heavy and norms <= ref_norms
    assert_same_outputs(fused, model, make_inputs, field)


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_lora_merges_as_far_as_merge_and_unload(name):
    base, targets, make_inputs, field = MODELS[name]()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                             fan_in_fan_out=name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(base, config))
    example = make_inputs(2, 7)
    fused = repc.compile(model, (), example)
    report = fused.repc_report
    assert report.front_end == "torch.export" and report.verification.ok and not report.rolled_back, report
    merged = copy.deepcopy(model).merge_and_unload().eval()
    heavy, norms = export_counts(fused, example)
    ref_heavy, ref_norms = export_counts(merged, example)
    assert heavy <= ref_heavy and norms <= ref_norms, (heavy, norms, ref_heavy, ref_norms, report)
    assert not any("lora" in n for n, _ in fused.named_parameters())
    assert_same_outputs(fused, merged, make_inputs, field)
    assert_same_outputs(fused, model, make_inputs, field)


def _adapter_configs():
    """PEFT's other adapters that ``merge_and_unload`` merges, on BERT's query/value (IA3 also
    on the FFN input, where it scales a linear's input rather than its output)."""
    return {
        "dora": peft.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True),
        "rslora": peft.LoraConfig(r=4, target_modules=["query", "value"], use_rslora=True),
        "ia3": peft.IA3Config(target_modules=["query", "value", "intermediate.dense"],
                              feedforward_modules=["intermediate.dense"]),
        "loha": peft.LoHaConfig(r=4, target_modules=["query", "value"]),
        "lokr": peft.LoKrConfig(r=4, target_modules=["query", "value"]),
        "vera": peft.VeraConfig(r=4, target_modules=["query", "value"]),
        "adalora": peft.AdaLoraConfig(r=4, target_modules=["query", "value"], total_step=10),
    }


@pytest.mark.parametrize("adapter", ["dora", "rslora", "ia3", "loha", "lokr", "vera", "adalora"])
def test_peft_adapters_merge_into_the_plain_base_model_as_merge_and_unload_does(adapter):
    # DoRA's per-column norm, computed at every call from the weights and a torch.eye probe of
    # its LoRA, is a constant; export's dtype checks around peft's casts pin no value
    base, _, make_inputs, field = bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(base, _adapter_configs()[adapter]))
        merged = copy.deepcopy(model).merge_and_unload().eval()
    example = make_inputs(2, 7)
    fused = repc.compile(model, (), example)
    report = fused.repc_report
    assert report.verification.ok and not report.rolled_back, report
    assert report.output == "module-preserving", report.output_note
    assert type(fused) is transformers.BertModel
    assert not any(type(m).__module__.startswith("peft") for m in fused.modules())
    assert fused.state_dict().keys() == merged.state_dict().keys()
    linears = lambda m: sum(isinstance(x, nn.Linear) for x in m.modules())
    assert linears(fused) == linears(merged)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in merged.parameters())
    assert_same_outputs(fused, merged, make_inputs, field)
    assert_same_outputs(fused, model, make_inputs, field)


def _lora(name):
    base, targets, make_inputs, field = MODELS[name]()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                             fan_in_fan_out=name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomized(peft.get_peft_model(base, config)), make_inputs, field


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fused_peft_lora_model_is_its_base_model_with_merged_linears_and_round_trips(name, tmp_path):
    model, make_inputs, field = _lora(name)
    example = make_inputs(2, 7)
    fused = repc.compile(model, (), example, graph=False)
    report = fused.repc_report
    assert report.output == "module-preserving", report.output_note
    merged = copy.deepcopy(model).merge_and_unload().eval()
    assert type(fused) is type(merged)  # the base model, as merge_and_unload gives it
    assert not any("lora" in n for n in fused.state_dict())
    assert not any(type(m).__module__.startswith("peft") for m in fused.modules())
    # each LoRA layer is its base layer again (GPT-2's fan_in_fan_out Conv1D stays a Conv1D)
    assert [type(m) for m in fused.modules()] == [type(m) for m in merged.modules()]
    # each LoRA layer swapped at its own path (in the base model's names)
    lora_layers = {n[len("base_model.model."):] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora_layers and lora_layers <= {s.path for s in report.swaps}, (lora_layers, report.swaps)
    theirs, ours = merged.state_dict(), fused.state_dict()
    assert theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in ours)
    assert_same_outputs(fused, merged, make_inputs, field)
    fused.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    assert not any("lora" in n for n in reloaded.state_dict())
    assert_same_outputs(reloaded, fused, make_inputs, field)
    assert_same_outputs(reloaded, model, make_inputs, field)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fused_library_model_keeps_its_class_and_save_pretrained_where_a_swap_expresses_it(name, tmp_path):
    model, _, make_inputs, field = MODELS[name]()
    model = randomized(model)
    example = make_inputs(2, 7)
    fused = repc.compile(model, (), example, graph=False)
    report = fused.repc_report
    assert report.verification.ok and not report.rolled_back
    assert report.output == "module-preserving", report.output_note
    assert type(fused) is type(model) and fused.config.to_dict() == model.config.to_dict()
    assert_same_outputs(fused, model, make_inputs, field)
    fused.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    # a LayerNorm's affine folded into the linears after it: the norm keeps its class (affine 1, 0)
    folded = [s for s in report.swaps if "affine reset" in s.becomes]
    # (not in GPT-2's blocks: called with a mask on padded inputs and without one here, they keep
    # their forward, so no merge spans two of their modules)
    assert folded or name in ("bert", "gpt2")
    # the plain architecture (GPT-2's merged projections stay Conv1D, their weight in x out):
    # from_pretrained gives the fused model back
    theirs, ours = model.state_dict(), fused.state_dict()
    assert theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in ours)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert_same_outputs(reloaded, fused, make_inputs, field)
    assert_same_outputs(reloaded, model, make_inputs, field)


def _llama(use_cache: bool, attention: str = "sdpa"):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=use_cache,
                                      attn_implementation=attention)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomized(peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets)))


def _padded_tokens(batch, length, pad_from=None):
    g = torch.Generator().manual_seed(batch * 100 + length)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=g), "attention_mask": mask}


def test_a_lora_llama_merges_each_layer_in_place_and_holds_on_the_masks_users_feed(tmp_path):
    # the example's padded mask reaches the decoder layers as a tensor, an all-ones mask (or none)
    # as None (sdpa's causal path): the layers keep their forward, each LoRA linear is merged
    model = _llama(use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(model).merge_and_unload().eval()
    example = _padded_tokens(2, 12, pad_from=6)
    fused = repc.compile(model, (), example)
    report = fused.repc_report
    assert type(fused) is transformers.LlamaForCausalLM and report.output == "module-preserving"
    assert not any(type(m).__module__.startswith("peft") for m in fused.modules())
    assert type(fused.model.layers[0]) is type(merged.model.layers[0])
    linears = lambda m: sum(isinstance(x, nn.Linear) for x in m.modules())
    assert linears(fused) == linears(merged)
    ids = example["input_ids"]
    assert_same_logits(fused, model, (example, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                      {"input_ids": ids}, _padded_tokens(3, 11), _padded_tokens(1, 7)))
    assert_reloads_as(fused, transformers.LlamaForCausalLM, tmp_path, example)


def test_a_lora_llama_with_its_cache_on_merges_and_generates_as_before():
    # transformers' default use_cache=True: the output holds a DynamicCache (no pytree node, so
    # export captures the rest) that every decoder layer updates in place (so none is replaced)
    model = _llama(use_cache=True)
    example = _padded_tokens(2, 8)
    fused = repc.compile(model, (), example)
    assert type(fused) is transformers.LlamaForCausalLM and fused.repc_report.output == "module-preserving"
    assert not any(type(m).__module__.startswith("peft") for m in fused.modules())
    with torch.no_grad():
        got, want = fused(**example), model(**example)
        assert (got.logits - want.logits).abs().max() / want.logits.abs().max() < 1e-5
        assert len(got.past_key_values.layers) == len(want.past_key_values.layers)
        generated = fused.generate(**example, max_new_tokens=5, do_sample=False)
        assert torch.equal(generated, model.generate(**example, max_new_tokens=5, do_sample=False))


def test_a_lora_on_berts_dense_layers_saves_a_checkpoint_that_reloads_to_the_fused_outputs(tmp_path):
    # LoRA on attention.output.dense: a graph in place of BertSelfOutput (dense, dropout, LayerNorm
    # of the residual sum) would rename dense.* and LayerNorm.* in the checkpoint
    base, _, make_inputs, field = bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value", "dense"])))
    example = _padded_tokens(2, 9, pad_from=6)
    example["input_ids"] = example["input_ids"] % 50
    fused = repc.compile(model, (), example)
    assert type(fused) is transformers.BertModel and fused.repc_report.output == "module-preserving"
    fused.save_pretrained(tmp_path)
    reloaded, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for kwargs in (example, {"input_ids": example["input_ids"]}):
        with torch.no_grad():
            got, want = reloaded.eval()(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state
        assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_a_lora_llama_merged_in_place_writes_into_its_base_weights_as_merge_and_unload_does(tmp_path):
    # in_place=True consumes the model: each merged weight goes into the base layer's own tensor
    # (no new weight), the result shares every tensor with it, and is verified against the outputs
    # the model gave before
    model = _llama(use_cache=True)
    example = _padded_tokens(2, 12, pad_from=6)
    calls = [example, _padded_tokens(3, 11), {"input_ids": example["input_ids"]}]
    with torch.no_grad():
        wants = [model(**kwargs).logits for kwargs in calls]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(model).merge_and_unload().eval()
    bases = {name: m.base_layer.weight for name, m in model.named_modules() if hasattr(m, "base_layer")}
    before = {name: w.clone() for name, w in bases.items()}
    fused = repc.compile(model, (), example, in_place=True)
    report = fused.repc_report
    assert type(fused) is transformers.LlamaForCausalLM and report.output == "module-preserving"
    assert len(report.written_in_place) == len(bases) == 14
    for name, weight in bases.items():
        assert not torch.equal(weight, before[name])  # written into (the model is consumed)
    ours = {p.untyped_storage().data_ptr() for p in fused.parameters()}
    theirs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert ours <= theirs  # no tensor of its own: every one is the model's
    for kwargs, want in zip(calls, wants):
        with torch.no_grad():
            got = fused(**kwargs).logits
        assert (got - want).abs().max() / want.abs().max() < 1e-5
    fused.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**example).logits, merged(**example).logits, atol=1e-5)


def _plain_llama(saved_in=None, dtype=torch.float32):
    """A random Llama; with ``saved_in`` (a folder), saved there and loaded back in ``dtype`` as
    from_pretrained gives it (its rotary buffer stays float32)."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = randomized(transformers.LlamaForCausalLM(config))
    if saved_in is None:
        return model
    model.save_pretrained(saved_in)
    return transformers.LlamaForCausalLM.from_pretrained(saved_in, dtype=dtype).eval()


def test_a_float32_lora_over_a_bfloat16_llama_merges_into_its_bfloat16_linears_as_merge_and_unload_does(tmp_path):
    # peft keeps the adapter in float32 over a bfloat16 base (autocast_adapter_dtype): its LoRA
    # forward casts the input up and the sum back; the casts are the identity up to rounding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(_plain_llama(tmp_path / "base", torch.bfloat16),
                                               peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])))
        merged = copy.deepcopy(model).merge_and_unload().eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    example = _padded_tokens(2, 9, pad_from=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", repc.AdaptersLeftWarning)
        fused = repc.compile(model, (), example)
    assert type(fused) is transformers.LlamaForCausalLM and fused.repc_report.output == "module-preserving"
    assert not any(type(m).__module__.startswith("peft") for m in fused.modules())
    assert {p.dtype for p in fused.parameters()} == {torch.bfloat16}
    ids = example["input_ids"]
    for kwargs in (example, {"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                   _padded_tokens(3, 11)):
        with torch.no_grad():
            got, want, theirs = fused(**kwargs).logits, model(**kwargs).logits, merged(**kwargs).logits
        scale = want.float().abs().max()
        # (merge_and_unload rounds the merged weights to bfloat16 too: repc is as close as it)
        assert (got.float() - want.float()).abs().max() / scale <= \
            max(2 * (theirs.float() - want.float()).abs().max() / scale, 1e-2)
    fused.save_pretrained(tmp_path / "fused")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**example).logits, fused(**example).logits)


def test_a_float32_llamas_rmsnorm_affines_fold_into_the_projections_after_them():
    # LlamaRMSNorm casts its float32 input to float32 (the tensor itself back): the residual after
    # it reads that input, not the norm's cast, and each norm's affine folds into its readers
    # (compiled on ids alone: with a mask, the decoder layers are called with other arguments on
    # the masks users feed, so no merge spans their code)
    model = _plain_llama()
    example = {"input_ids": _padded_tokens(2, 9)["input_ids"]}
    fused = repc.compile(model, (), example)
    assert type(fused) is transformers.LlamaForCausalLM and fused.repc_report.output == "module-preserving"
    for layer in fused.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(fused.model.norm.weight, torch.ones_like(fused.model.norm.weight))
    assert_same_logits(fused, model, (example, {"input_ids": _padded_tokens(3, 11)["input_ids"]}))


def test_a_lora_repc_cannot_merge_is_said_with_a_warning_and_the_peft_model_returned():
    # LoRA on the token embedding: a lookup is not a map of its input repc merges, so that layer
    # stays a peft.Embedding; the user is told (its save_pretrained would save an adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(_plain_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"])))
    example = _padded_tokens(2, 9)
    with pytest.warns(repc.AdaptersLeftWarning, match=r"1 layer\(s\), base_model.model.model.embed_tokens"):
        fused = repc.compile(model, (), example)
    assert isinstance(fused, peft.PeftModel) and fused.repc_report.output == "module-preserving"
    assert_same_logits(fused, model, (example,))


def test_dora_on_a_llama_without_biases_merges_into_its_plain_linears_as_merge_and_unload_does(tmp_path):
    # DoRA's weight norm is computed in its forward from the parameters (a torch.eye probe of its
    # LoRA), and its input cast to the weight's dtype (the tensor itself back in float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(_plain_llama(), peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)))
        merged = copy.deepcopy(model).merge_and_unload().eval()
    example = {"input_ids": _padded_tokens(2, 9)["input_ids"]}
    fused = repc.compile(model, (), example)
    assert type(fused) is transformers.LlamaForCausalLM and fused.repc_report.output == "module-preserving"
    assert not any(type(m).__module__.startswith("peft") for m in fused.modules())
    assert export_counts(fused, example)[0] <= export_counts(merged, example)[0]
    assert_same_logits(fused, model, (example, {"input_ids": _padded_tokens(3, 11)["input_ids"]}))
    assert_reloads_as(fused, transformers.LlamaForCausalLM, tmp_path, example)


def test_a_sequence_classifier_with_lora_comes_back_as_its_architecture_with_the_head_peft_trains(tmp_path):
    # task_type SEQ_CLS: peft trains a copy of the classifier (modules_to_save), behind a wrapper
    # that calls it; merge_and_unload puts that copy in the wrapper's place, and so does repc
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50, num_labels=3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomized(peft.get_peft_model(transformers.BertForSequenceClassification(config), peft.LoraConfig(
            task_type="SEQ_CLS", r=4, target_modules=["query", "value"])))
        merged = copy.deepcopy(model).merge_and_unload().eval()
    example = _padded_tokens(2, 9, pad_from=6)
    example["input_ids"] %= 50
    with warnings.catch_warnings():
        warnings.simplefilter("error", repc.AdaptersLeftWarning)
        fused = repc.compile(model, (), example)
    assert type(fused) is transformers.BertForSequenceClassification
    assert type(fused.classifier) is nn.Linear and torch.equal(fused.classifier.weight, merged.classifier.weight)
    assert fused.state_dict().keys() == merged.state_dict().keys()
    assert_same_logits(fused, merged, (example, {"input_ids": example["input_ids"]}))
    assert_reloads_as(fused, transformers.BertForSequenceClassification, tmp_path, example)


def test_a_long_rope_phi3_with_lora_is_left_as_it_was_and_merges_for_inputs_past_its_original_length():
    # the rotary embedding keeps long_inv_freq as a plain attribute (a fake tensor under
    # torch.export, which was left in the user's model: a copy of it then raised) and writes the
    # frequencies of the last input's length into its inv_freq buffer
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, pad_token_id=0,
                                     max_position_embeddings=64, original_max_position_embeddings=16,
                                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
                                                   "long_factor": [2.0 + 0.3 * i for i in range(4)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.Phi3ForCausalLM(config).eval()
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                               "down_proj"],
                                                          init_lora_weights=False)).eval()
        rotary = base.model.rotary_emb
        kept = {k: v for k, v in vars(rotary).items() if not k.startswith("_")}
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        ids = torch.randint(1, 128, (2, 12))
        fused = repc.compile(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert {k: v for k, v in vars(rotary).items() if not k.startswith("_")}.keys() == kept.keys()
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    copy.deepcopy(model)
    assert type(fused) is transformers.Phi3ForCausalLM and fused.repc_report.rewrites
    for batch, length in ((1, 5), (3, 12), (2, 30)):  # (past 16 the long factors apply)
        x = torch.randint(1, 128, (batch, length))
        with torch.no_grad():
            want = model(input_ids=x).logits
            assert (fused(input_ids=x).logits - want).abs().max() <= 1e-4 * want.abs().max()
