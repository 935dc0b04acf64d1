"""Metrics in Prometheus' format: the runtime's exporter, the server's metrics, and the small
HTTP responder that serves them (docs/observability.md). Importing this loads prometheus_client,
which ``import pydisco`` does not."""

from ._http import HttpListener as HttpListener
from ._http import parse_host_port as parse_host_port
from ._http import serve_http as serve_http
from ._prometheus import RuntimeCollector as RuntimeCollector
from ._prometheus import ServerMetrics as ServerMetrics
from ._prometheus import TokenRate as TokenRate
from ._prometheus import exposition as exposition

__all__ = ["HttpListener", "RuntimeCollector", "ServerMetrics", "TokenRate", "exposition", "parse_host_port", "serve_http"]
