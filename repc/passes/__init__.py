"""Rewriting passes: closed forms applied to matched regions, and emission."""
