"""Helpers for tests and benchmarks: tiny fake checkpoints in the real LLaDA / LLaDA-V / MMaDA layouts."""
