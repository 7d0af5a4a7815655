"""repc: a structural re-parameterization compiler for PyTorch.

``repc.compile(model, example_inputs)`` traces a model, finds the regions whose composition
is affine (parallel conv/BN branches, chains, concatenations, scales), replaces each by one
closed-form merged op, and verifies the result against the original.
"""

from .api import AdaptersLeftWarning, ReparamError, UnchangedWarning, compile
from .report import Report
from . import verify  # a callable package: repc.verify(original, fused, example_inputs)

__all__ = ["compile", "verify", "ReparamError", "UnchangedWarning", "AdaptersLeftWarning", "Report"]
__version__ = "0.1.0"
