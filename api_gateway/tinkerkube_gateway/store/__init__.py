"""Persistence: futures, op log and the registry (sessions, runs, samplers, checkpoints)."""
