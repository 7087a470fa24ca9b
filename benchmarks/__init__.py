"""Benchmark scripts (run directly; the test suite runs them once in quick mode)."""
