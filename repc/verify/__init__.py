"""Equivalence checks of fused models and regions against the originals.

The package itself is callable: ``repc.verify(original, fused, example_inputs, ...)`` runs
:func:`repc.verify.equivalence.verify` (Hypothesis-driven differential checking), while its
modules stay importable as ``repc.verify.check``, ``repc.verify.proofs`` and so on.
"""

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .equivalence import verify
        return verify(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
