"""The trainer pod: one LoRA model (or sampler) on torch.distributed ranks, behind the internal API.

Knows nothing of Kubernetes, tenants or Tinker sessions: it serves one `model_id` and runs its ops in
`seq_id` order (tinkerkube_contract.pod_api).
"""
