"""Benchmarks: scripts run as modules from the repository root (`python -m bench.hardening`, ...).
Each prints its figures and writes JSON under bench/results/; helpers shared with the tests come from
tests.kit."""
