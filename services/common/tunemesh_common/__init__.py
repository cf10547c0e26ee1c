"""Code shared by every tunemesh service: errors, tensor codecs, models, etcd registry."""
