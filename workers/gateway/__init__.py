"""``tfpool gateway``: TF Serving's and the Open Inference Protocol's gRPC and REST APIs in
front of the pool, so that clients written for TF Serving, Triton or KServe work unchanged.

A stateless process: it forwards every request through one :class:`queueing.AsyncClient`
and reads what it says about models (inputs, live workers) from Redis. No TensorFlow here:
the protobuf messages are this package's own, compiled from ``proto/*.proto``.
"""
