"""The daemon exports its tool span over OTLP, nested under the fleet run's trace."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from aegis_edge_core.wire import common_pb2
from tests.agent.harness import DaemonProcess, RelayProcess, enroll_host, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class _Collector(
    trace_service_pb2_grpc.TraceServiceServicer, logs_service_pb2_grpc.LogsServiceServicer
):
    def __init__(self) -> None:
        self.spans: list = []
        self.logs: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        self.spans.extend((rs.resource, s) for s in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    self.logs.extend(sl.log_records)
            return logs_service_pb2.ExportLogsServiceResponse()


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, collector: _Collector) -> None:
        self.c = collector

    def Export(self, request, context):
        return self.c.Export(request, context)


def test_tool_span_nests_under_the_run_trace(tmp_path):
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(collector), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    relay = RelayProcess.start(tmp_path / "relay")
    daemon = None
    try:
        h = enroll_host(relay, tmp_path / "h", allow_tools=["cmd.run"])
        cfg = h.state_dir / "aegis-config.yaml"
        cfg.write_text(
            cfg.read_text()
            + "observability:\n  otlp:\n"
            + f"    endpoint: http://127.0.0.1:{port}\n    insecure: true\n"
            + "    headers:\n      x-tenant-id: ${tenant_id}\n"
        )
        daemon = DaemonProcess.start(h.state_dir)
        daemon.wait_event("otlp_enabled")
        daemon.wait_event("connected")
        run = relay.run(h.node_id, "cmd.run", {"cmd": "echo traced"})
        assert run.targets[0].outcome == common_pb2.TARGET_OUTCOME_OK
        assert run.trace_id

        def tool_span():
            with collector.lock:
                for resource, span in collector.spans:
                    if span.name == "tool cmd.run":
                        return resource, span
            return None

        resource, span = wait_until(tool_span, 15, what="tool span at the collector")
        assert span.trace_id.hex() == run.trace_id
        assert span.parent_span_id  # nested under the dispatcher's per-node span
        attrs = {a.key: a.value.string_value for a in span.attributes}
        assert attrs["fleet_command_id"] == run.fleet_command_id
        assert attrs["aegis.command_id"] == run.targets[0].command_id
        res = {a.key: a.value.string_value for a in resource.attributes}
        assert res["aegis.node_id"] == h.node_id and res["aegis.tenant_id"] == "acme"
        wait_until(lambda: collector.logs, 15, what="log records at the collector")
    finally:
        if daemon is not None:
            daemon.stop()
        relay.stop()
        server.stop(0)


def test_unreachable_collector_never_blocks(tmp_path):
    relay = RelayProcess.start(tmp_path / "relay")
    daemon = None
    try:
        h = enroll_host(relay, tmp_path / "h", allow_tools=["cmd.run"])
        cfg = h.state_dir / "aegis-config.yaml"
        cfg.write_text(
            cfg.read_text() + "observability:\n  otlp:\n"
            "    endpoint: http://127.0.0.1:9\n    insecure: true\n"
        )
        daemon = DaemonProcess.start(h.state_dir)
        daemon.wait_event("connected")
        for _ in range(3):
            run = relay.run(h.node_id, "cmd.run", {"cmd": "echo local"})
            assert run.targets[0].outcome == common_pb2.TARGET_OUTCOME_OK
        daemon.wait_event("command_finished", count=3)  # local logs keep flowing
        assert daemon.stop() == 0
    finally:
        if daemon is not None:
            daemon.stop()
        relay.stop()
