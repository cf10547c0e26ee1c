"""tunemesh gateway: Tinker's HTTP protocol (the official `tinker` SDK) in front of the
scheduler's public `tunemesh.v1` gRPC API.

Layers, imports pointing downward only:

    app        FastAPI routes: decode the HTTP body, call core, encode the answer
    core/      the translation logic (sessions, training, sampling, futures, catalog),
               on an `Upstream` port and a `GatewayStore`: testable without servers
    convert    tinker protobuf / JSON <-> tunemesh.v1 messages, pure functions
    upstream   the gRPC channel to the scheduler (the caller's API key forwarded)
    store      the gateway's own tables (model ids, sampling sessions)
"""
