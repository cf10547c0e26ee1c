"""Numerics shared by the torch engines: batch-invariant matmuls and position-masked attention."""
