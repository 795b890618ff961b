"""Benchmarks behind ``carpool bench`` as a library: workloads, runners and reports.

The command-line side (flags, printing) lives in ``carpool.entrypoints``; nothing here imports it.
"""
