"""User-facing extras with their own main(): benchmarks, visualisation, single-sketch retrieval."""
