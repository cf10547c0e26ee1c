"""tunemesh checkpoint service: durable, tenant-scoped adapter checkpoints."""
