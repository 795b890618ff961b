"""Benchmarks behind ``carpool bench``: workloads, runners and reports."""
