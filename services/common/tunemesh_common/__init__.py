"""Code shared by every tunemesh service: gRPC plumbing, models, etcd registry. (Errors and
the tensor codec are the SDK's wire layer: `tunemesh.errors`, `tunemesh.tensors`.)"""
