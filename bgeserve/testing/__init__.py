"""Tools for tests and benchmarks: random checkpoints with a real model's file layout (no real weights)."""
