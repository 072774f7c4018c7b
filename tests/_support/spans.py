"""An OTLP/HTTP receiver that collects the spans the services export."""

from __future__ import annotations

from typing import Any


class SpanSink:
    """An OTLP/HTTP traces receiver on loopback (a thread): collects every span it is sent.

    ``spans()`` returns them as dicts: name, trace_id, span_id, parent (hex), kind, service,
    attributes (a flat dict) and status code.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        received: list[Any] = []
        self._received = received
        self._lock = threading.Lock()
        lock = self._lock

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = trace_service_pb2.ExportTraceServiceRequest()
                if "json" in self.headers.get("Content-Type", ""):
                    json_format.Parse(body, request)  # Triton's exporter sends OTLP/JSON
                else:
                    request.ParseFromString(body)
                with lock:
                    received.append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def spans(self) -> list[dict[str, Any]]:
        def value(v: Any) -> Any:
            kind = v.WhichOneof("value")
            if kind == "array_value":
                return [value(x) for x in v.array_value.values]
            return getattr(v, kind) if kind else None

        out = []
        with self._lock:
            requests = list(self._received)
        for request in requests:
            for resource in request.resource_spans:
                service = next(
                    (
                        value(a.value)
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        out.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "service": service,
                                "attributes": {a.key: value(a.value) for a in span.attributes},
                                "status": span.status.code,
                            }
                        )
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
