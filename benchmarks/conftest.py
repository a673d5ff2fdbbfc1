"""Benchmarks run against the installed package, like the tests."""
