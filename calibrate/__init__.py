"""PyTorch microbenchmarks and profile fitting (filled in by the calibrate issue)."""
