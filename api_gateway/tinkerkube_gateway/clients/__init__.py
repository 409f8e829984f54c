"""Clients of other services: trainers (pod_client)."""
