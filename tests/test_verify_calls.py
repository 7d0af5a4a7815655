"""The calls users make (repc/verify/calls.py): masks all ones or padded, inputs left out, other
sizes; and the modules whose calls differ between them."""

import torch
import torch.nn as nn

from linear_blocks import MaskedTokenModel, masked_token_example, randomize
from repc.verify.calls import call_structure, canonical_calls, observe


def test_token_inputs_get_the_mask_patterns_an_input_left_out_and_other_sizes():
    example = masked_token_example(2, 6)
    example["attention_mask"] = torch.ones_like(example["attention_mask"])
    example["attention_mask"][0, -1] = 0  # (padded as none of the patterns is, so that all are run)
    calls = canonical_calls(MaskedTokenModel(), (), example)
    by_name = {c.name: c for c in calls}
    assert calls[0].name == "example" and calls[0].kwargs is not None
    ones = by_name["all-ones mask"].kwargs["attention_mask"]
    assert bool((ones == 1).all()) and ones.dtype == example["attention_mask"].dtype
    right, left = by_name["right-padded mask"].kwargs["attention_mask"], by_name["left-padded mask"].kwargs["attention_mask"]
    assert bool(right[0].all()) and right[1, -1] == 0 and right[1, 0] == 1
    assert bool(left[0].all()) and left[1, 0] == 0 and left[1, -1] == 1
    assert torch.equal(by_name["right-padded mask"].kwargs["input_ids"], example["input_ids"])
    left_out = by_name["without attention_mask"]
    assert set(left_out.kwargs) == {"input_ids"} and left_out.omits == ("attention_mask",)
    resized = next(c for c in calls if c.name == "batch 3, length 5, random ids")
    assert resized.kwargs["input_ids"].shape == (3, 5) and bool(resized.kwargs["attention_mask"].all())
    assert int(resized.kwargs["input_ids"].max()) <= int(example["input_ids"].max())


def test_segment_ids_of_zeros_are_not_a_mask_and_keep_their_range():
    example = dict(masked_token_example(2, 6), token_type_ids=torch.zeros(2, 6, dtype=torch.long))
    calls = {c.name: c for c in canonical_calls(MaskedTokenModel(), (), example)}
    assert torch.equal(calls["all-ones mask"].kwargs["token_type_ids"], example["token_type_ids"])
    resized = calls["batch 3, length 5, random ids"].kwargs
    assert resized["token_type_ids"].shape == (3, 5) and not resized["token_type_ids"].any()


def test_a_model_of_float_inputs_gets_the_example_alone():
    calls = canonical_calls(nn.Linear(4, 4), (torch.randn(2, 4),), {})
    assert [c.name for c in calls] == ["example"]


def test_observe_finds_the_modules_called_otherwise_and_keeps_the_references():
    model = randomize(MaskedTokenModel())
    example = masked_token_example(2, 6)
    with torch.no_grad():
        seen = observe(model, canonical_calls(model, (), example))
    # an all-ones mask reaches the layers as None; the root is called without the mask once
    assert seen.varying["layers.0"] == "called with other arguments on the all-ones mask input"
    assert "layers.1" in seen.varying
    assert "" in seen.varying
    assert not any(p.startswith(("embed", "layers.0.proj", "layers.0.norm")) for p in seen.varying)
    assert seen.calls[0].name == "example"
    with torch.no_grad():
        for call in seen.calls:
            assert torch.equal(call.reference, model(*call.args, **call.kwargs))


def test_call_structure_tells_none_from_a_tensor_and_flags_apart_but_not_sizes():
    x = torch.randn(2, 3)
    assert call_structure((x,), {"mask": None}) != call_structure((x,), {"mask": x})
    assert call_structure((x,), {"flag": True}) != call_structure((x,), {"flag": False})
    assert call_structure((x, 3), {}) == call_structure((torch.randn(5, 7), 4), {})
    assert call_structure((x,), {}) != call_structure((x.long(),), {})


class _Cache:
    """A key/value cache as decoders hold one: a plain object their layers append to."""

    def __init__(self):
        self.keys = []


class _CachingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, cache, helper):
        cache.keys.append(self.proj(x))
        return helper(x) + cache.keys[-1]


class _CachingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.helper = _CachingLayer(), nn.Linear(4, 4)

    def forward(self, x, mask=None):
        return self.layer(x if mask is None else x * mask[..., None], _Cache(), self.helper)


def test_a_module_given_an_object_it_may_update_keeps_its_forward_but_not_one_given_a_module():
    model = _CachingModel().eval()
    example = {"x": torch.randn(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.long)}
    with torch.no_grad():
        seen = observe(model, canonical_calls(model, (), example))
    assert seen.varying["layer"] == "given a _Cache, which its forward may update in place"
    assert "layer.proj" not in seen.varying and "helper" not in seen.varying


def test_a_mask_pattern_equal_to_the_example_is_not_run_again():
    example = masked_token_example(2, 6)
    example["attention_mask"] = torch.ones_like(example["attention_mask"])
    names = [c.name for c in canonical_calls(MaskedTokenModel(), (), example)]
    assert "all-ones mask" not in names  # (the example is that call)
    assert {"example", "right-padded mask", "left-padded mask", "without attention_mask"} <= set(names)


def test_the_examples_run_is_recorded_module_by_module_once_and_the_other_calls_are_not():
    from repc.preserve import calls_recorded, record_calls
    model = randomize(MaskedTokenModel())
    example = masked_token_example(2, 6)
    recorded: dict = {}
    with torch.no_grad():
        seen = observe(model, canonical_calls(model, (), example),
                       around_example=lambda: calls_recorded(model, recorded))
    assert len(seen.calls) > 1  # (other calls ran: none of them is in the record)
    again = record_calls(model, (), example)  # (what placement recorded with a run of its own before)
    assert recorded.keys() == again.keys() and all(recorded[p].count == again[p].count for p in again)
    assert torch.equal(recorded[""].output, seen.calls[0].reference)
    for path, call in again.items():
        assert torch.equal(recorded[path].output, call.output), path
