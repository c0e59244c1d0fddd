"""Prometheus exposition shared by brokers and workers: the `--metrics HOST:PORT` address, the
HTTP server (prometheus_client's own, on a thread), and histograms in its format.

Each process serves a registry of its own holding one collector, which builds every metric
family from a snapshot when scraped: nothing on the hot path knows Prometheus exists.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from conduit.errors import ConfigError
from conduit.histogram import EXPORTED_SECONDS, Histogram

_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]*):(?P<port>\d{1,5})$")


def parse_address(value: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty for every interface, or [v6]; PORT 0 for any free one)."""
    match = _ADDRESS.match(value.strip())
    if match is None:
        raise ConfigError(f"metrics address {value!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    port = int(match["port"])
    if port > 65535:
        raise ConfigError(f"metrics address {value!r}: port {port} is not 0..65535")
    return match["host"].strip("[]") or "0.0.0.0", port


class MetricsServer:
    """`/metrics` of one collector over HTTP, served from a daemon thread until `close()`."""

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        host, port = address
        try:
            self._httpd: WSGIServer
            self._thread: threading.Thread
            self._httpd, self._thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        bound_host, bound_port = self._httpd.server_address[:2]
        shown = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        self.port = int(bound_port)
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{bound_port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def histogram_family(
    name: str,
    documentation: str,
    labels: list[str],
    histograms: Iterable[tuple[list[str], Histogram]],
    bounds: tuple[float, ...] = EXPORTED_SECONDS,
) -> HistogramMetricFamily:
    """One family from our histograms, by label values, at `bounds` (a subset of theirs)."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, hist in histograms:
        buckets = [(_le(bound), float(n)) for bound, n in hist.cumulative(bounds)]
        family.add_metric(values, buckets, hist.sum)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
