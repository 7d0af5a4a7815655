"""The architecture fuzzer's transformer family: random transformer networks compiled by repc,
compared on other batch and sequence sizes.

Networks come from :func:`fuzz_transformers.transformers` (pre-LN, RMS or BatchNorm token
norms, LoRA linears, fused or separate qkv with the attention scale written four ways, FFNs
with partial activations, adapters, averaged and gated linear experts, shared linears,
residual scales), every parameter and BN statistic random.  The number of networks comes from
the Hypothesis profile selected by ``REPC_FUZZ_PROFILE`` (see tests/fuzz_profiles.py).  A
failure is a miscompile, a crash, a whole-model rollback, or a region that the per-region check
rejected: a merge repc proposed and had to take back.  It shrinks to a minimal spec; keep it as
a plain test in tests/regressions/.
"""

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import repc
from fuzz_profiles import fuzz_settings
from fuzz_transformers import TransformerSpec, build_transformer, example_tokens, transformers
from repc.verify.equivalence import ModelPair, check_case
from repc.verify.strategies import DISTRIBUTIONS, InputCase

CI_NETWORKS = 60  # the transformer family's CI share (about 15 s); the slow profile runs its full count


def other_cases(spec: TransformerSpec):
    """Input cases at another batch size and/or sequence length."""
    shapes = [(b, t, spec.d) for b in (1, 2, 3) for t in (1, 2, 3, 5, 7) if (b, t) != (spec.batch, spec.tokens)]
    return st.builds(lambda shape, dist, seed: InputCase((shape,), dist, None, seed),
                     st.sampled_from(shapes), st.sampled_from(DISTRIBUTIONS), st.integers(0, 2 ** 16))


def assert_compiles_cleanly(spec: TransformerSpec):
    """Compile ``spec``'s network: no whole-model rollback, no region taken back by its check."""
    model = build_transformer(spec)
    x = example_tokens(spec)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.verification.ok and not report.rolled_back, f"{spec!r}\n{report}"
    taken_back = [r for r in report.rejected if r.reason.startswith("rolled back:")]
    assert not taken_back, f"{spec!r}\n{report}"
    return model, x, fused


@fuzz_settings(ci_networks=CI_NETWORKS)
@given(spec=transformers(), data=st.data())
def test_compiled_transformer_matches_the_original_on_other_sizes(spec, data):
    model, x, fused = assert_compiles_cleanly(spec)
    report = fused.repc_report
    event(f"rewrites: {min(len(report.rewrites), 5)}{'+' if len(report.rewrites) >= 5 else ''}")
    models = ModelPair(model, fused)
    for _ in range(2):
        case = data.draw(other_cases(spec), label="case")
        result = check_case(models, (x,), case)
        assert not result.skipped, f"the network rejects {case.describe()}: {spec!r}"
        assert result.ok, f"{spec!r}\non {case.describe()}: {result.error or result.deviation}\n{report}"


@fuzz_settings(ci_networks=CI_NETWORKS // 3)
@given(spec=transformers())
def test_generated_transformers_accept_other_sizes_and_their_repr_rebuilds_them(spec):
    import fuzz_transformers as ft
    again = eval(repr(spec), vars(ft))
    assert again == spec
    model = build_transformer(spec)
    with torch.no_grad():
        assert torch.equal(model(example_tokens(spec)), build_transformer(again)(example_tokens(spec)))
        out = model(example_tokens(spec, batch=3, tokens=7))
        assert out.shape[:2] == (3, 7)
    with pytest.raises(Exception):
        model(torch.randn(1, 2, spec.d + 1))
