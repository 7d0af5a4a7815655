"""The transformers x PEFT differential fuzzer's quick profile (tests/fuzz_hf.py): repc's default
result against the unfused model on the inputs users feed (masks all ones or padded on either
side, no mask, other batch sizes and lengths).  The slow profile is run by hand:
``python tests/fuzz_hf.py --count 1000 --seed S``."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fuzz_hf import CASES_QUICK, HFCase, run_case  # noqa: E402

# configurations the issue tracker found miscompiled (verified, wrong on an all-ones mask or no
# mask) or crashing (BERT-family layers given None for an all-ones mask), kept as regressions
REGRESSIONS = [
    HFCase("mistral", "lora", "all", "sdpa", False, 11),
    HFCase("qwen2", "ia3", "all", "sdpa", False, 12),
    HFCase("gpt_neox", "vera", "mlp", "sdpa", False, 13),
    HFCase("distilbert", "lora", "attention", "eager", False, 14),
    # found by the slow profile: a region through a decoder layer's residual add and the next
    # layer's no-op cast (eager attention); export's paths through `self.layers[:n]` (VeRA); a
    # PEFT layer that does not merge (DoRA on a bias-free base) with the cache on
    HFCase("qwen2", "ia3", "attention", "eager", False, 61525),
    HFCase("gemma", "vera", "mlp", "sdpa", False, 10353),
    HFCase("mistral", "dora", "all", "eager", True, 55130),
    # adapters left unmerged by the default result (now an outcome of its own, "partly merged"):
    # a norm's affine folded into one reader of a LoRA layer's input but not the other, so the
    # layer's sum read that value both computed and as an input; OPT's scale after q_proj, a
    # region placed at the attention, which no swap expresses, then inside q_proj
    HFCase("qwen2", "lokr", "attention", "eager", False, 64895),
    HFCase("mistral", "loha", "all", "eager", False, 12770),
    HFCase("opt", "dora", "attention", "eager", False, 7727),
    # a bfloat16 base with its float32 adapter (IA3 scales a bfloat16 input cast up to float32,
    # then cast back: the cast up is exact and belongs to the region), a sequence classifier
    # whose head peft trains as a copy
    HFCase("opt", "ia3", "mlp", "sdpa", False, 444, "bfloat16"),
    HFCase("llama", "ia3", "all", "sdpa", False, 26497, "bfloat16", "classifier"),
    HFCase("bert", "lora", "attention", "eager", False, 5, head="classifier"),
    # bfloat16 rounding after merges upstream moves a module's input off the recorded value: a
    # copy of the value the captured graph passed in is still that argument
    HFCase("opt", "vera", "all", "eager", True, 7944, "bfloat16", "classifier"),
    # a bfloat16 classifier whose output on fresh ids is 2.8% off its own exact function: the
    # result (its norms folded into the projections, which PEFT's merge leaves) 5.3% off it
    HFCase("qwen2", "ia3", "attention", "eager", False, 11086, "bfloat16", "classifier"),
]


@pytest.mark.parametrize("case", CASES_QUICK + REGRESSIONS, ids=repr)
def test_the_default_result_computes_the_model_on_the_inputs_users_feed(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_case(case)
    assert result.outcome == "exact", result.detail


def test_a_bfloat16_result_off_the_models_function_is_a_miscompile_whatever_the_rounding_allowance():
    # below float32 a result may be as far from the model's exact (float64) function as the model's
    # own output is, twice: a merge that computes another function is still told apart
    case = HFCase("llama", "lora", "all", "sdpa", False, 3, "bfloat16", "classifier")

    def wrong(model, kwargs):
        merged = copy.deepcopy(model).merge_and_unload().eval()
        with torch.no_grad():
            merged.model.layers[-1].mlp.down_proj.weight.mul_(1.25)
        return merged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_case(case, wrong).outcome == "miscompile"
        assert run_case(case, lambda model, kwargs: copy.deepcopy(model).merge_and_unload().eval()).outcome == "exact"
