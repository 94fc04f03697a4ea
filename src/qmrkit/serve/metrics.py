"""Prometheus metrics of the service (prefix ``qmrkit_``, base units, no patient identifiers)."""

from __future__ import annotations

from typing import Any


class Metrics:
    """The service's metrics in their own registry (so several servers can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.in_flight = Gauge(
            "qmrkit_reconstructions_in_flight", "Reconstructions running now", registry=r
        )
        self.queued = Gauge(
            "qmrkit_reconstructions_queued", "Scans waiting for a reconstruction slot", registry=r
        )
        self.connections = Counter(
            "qmrkit_connections_total", "Client connections accepted", registry=r
        )
        self.duration = Histogram(
            "qmrkit_reconstruction_duration_seconds",
            "Pipeline run time",
            ["pipeline"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.stage = Histogram(
            "qmrkit_stage_duration_seconds",
            "Time per pipeline stage",
            ["pipeline", "stage"],
            registry=r,
        )
        self.queue_time = Histogram(
            "qmrkit_queue_time_seconds", "Wait for a reconstruction slot", registry=r
        )
        self.bytes_received = Counter(
            "qmrkit_received_bytes_total", "Bytes received", ["encoding"], registry=r
        )
        self.errors = Counter(
            "qmrkit_errors_total", "Failed sessions by kind", ["kind"], registry=r
        )
        self.refused = Counter(
            "qmrkit_connections_refused_total",
            "Connections refused because the server was at its connection cap",
            registry=r,
        )
        self.loop_lag = Gauge(
            "qmrkit_event_loop_lag_max_seconds",
            "Largest delay of the event loop seen since the server started",
            registry=r,
        )
        # maps forwarded to a PACS (``qmrkit serve --send-to``), per finished session
        self.pacs_sends = Counter(
            "qmrkit_pacs_sends_total",
            "Map sets of finished sessions forwarded to the PACS, by outcome (sent; failed after "
            "retries or refused; dropped: queue full or shutting down; abandoned at shutdown)",
            ["result"],
            registry=r,
        )
        for result in ("sent", "failed", "dropped", "abandoned"):
            self.pacs_sends.labels(result)  # present (0) before the first send, for alerts
        self.pacs_retries = Counter(
            "qmrkit_pacs_retries_total", "Repeated C-STORE attempts after a failure", registry=r
        )
        self.pacs_queue = Gauge(
            "qmrkit_pacs_queue_depth", "Map sets waiting for or being sent to the PACS", registry=r
        )
        self.pacs_stage = Histogram(
            "qmrkit_pacs_stage_duration_seconds",
            "Writing DICOM and sending it, per map set",
            ["stage"],
            registry=r,
        )
        self.gpu_memory = Gauge(
            "qmrkit_gpu_memory_bytes", "GPU memory allocated by torch", registry=r
        )

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_memory.set(torch.cuda.memory_allocated())
        except Exception:  # pragma: no cover - metrics must never fail a request
            pass
        return generate_latest(self.registry)

    def start_http(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``addr:port`` in a background thread."""
        from prometheus_client import start_http_server

        return start_http_server(port, addr=addr, registry=self.registry)
