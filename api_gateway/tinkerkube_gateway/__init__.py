"""The API gateway: the Tinker wire protocol for the unmodified SDK, futures, tenants, routing.

Knows nothing of torch. Trainers are reached over the internal API (tinkerkube_contract.pod_api)
through a SessionBackend: local processes by default, TrainingSession resources on Kubernetes.
"""
