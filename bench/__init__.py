"""Benchmarks: every stage's speed, side by side with what a user would use instead (`make bench`)."""
