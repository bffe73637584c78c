"""Locust load tests of the gateway (HTTP only): see docs/load_testing.md."""
