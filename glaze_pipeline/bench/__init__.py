"""Benchmarks: figures a user can reproduce (`glaze bench ...`). Not part of the test suite."""
