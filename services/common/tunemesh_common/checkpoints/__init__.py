"""Checkpoints as every service names and reaches them: the path scheme (`paths`) and the client of the checkpoint service's storage and call store (`client`)."""
