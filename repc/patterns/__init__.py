"""Matchers: find fusable regions; never mutate the graph."""
