"""Equivalence checks of fused models and regions against the originals."""
