"""Benchmarks: scripts that print numbers, and the modules of the accuracy protocol (not run in CI)."""
