"""The tinkerkube operator: TrainingSession custom resources → trainer Pods + a headless Service.

Pure core (`manifests`, `status`, `conditions`, `policy`), thin kopf edges (`handlers`, `main`), and the
few Kubernetes API calls in `kube`. Knows nothing of the Tinker protocol or torch.
"""
