"""The Open Inference Protocol (KServe V2) gRPC API, proto package ``inference``."""
