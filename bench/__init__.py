"""Benchmarks: each prints one JSON line, measured as ratios against a real peer in the same run."""
