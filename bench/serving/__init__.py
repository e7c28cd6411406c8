"""Helpers of bench/serving_bench.py: servers under test, payloads, wrk, the report."""
