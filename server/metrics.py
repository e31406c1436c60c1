"""Prometheus metrics, one registry per app so several servers (tests, benchmarks) can coexist in
one process without clashing on the global registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("rmt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("rmt_request_seconds", "End-to-end request latency", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode_seconds = Histogram("rmt_decode_seconds", "Image decode + preprocess time per image",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("rmt_queue_seconds", "Time a request waited for its batch to start",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.infer_seconds = Histogram("rmt_infer_seconds", "Runner time per batch", buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
        self.batch_size = Histogram("rmt_batch_size", "Images per runner call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.instance_busy_seconds = Counter("rmt_instance_busy_seconds", "Seconds each model instance spent "
                                             "running batches", ["instance"], registry=self.registry)
        self.grpc_requests = Counter("rmt_grpc_requests", "gRPC calls by method and status code", ["method", "code"],
                                     registry=self.registry)
        self.queue_depth = Gauge("rmt_queue_depth", "Images waiting for inference", registry=self.registry)
