"""The service-to-service contract (`tunemesh.internal.v1`), generated from protos/ by
scripts/gen_protos.py. Server-side only: the SDK does not ship it."""
