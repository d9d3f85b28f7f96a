"""OpenTelemetry tracing of real services, exported over OTLP/gRPC to a real receiver.

The SDK can be installed once per process, so the receiver, the installed SDK and the traced
service are package-scoped fixtures (conftest.py) that both test modules share: test_spans.py
checks the spans and their parents, test_trace_settings.py the TraceSetting API.
"""
