#!/usr/bin/env bash
# kind end to end: a real cluster from kind-config.yaml, the three images built and loaded, the CRD
# applied, ingress-nginx, `helm install` with ci/kind-values.yaml, then the real tinker SDK through the
# ingress (tests/kind/sdk_smoke.py: supervised loop, sampling, checkpoint). On failure it collects logs,
# events and the TrainingSessions into $E2E_ARTIFACTS; the cluster is always deleted (KEEP_CLUSTER=1 keeps it).
#
# Where docker (with a running engine), kind, kubectl or helm is missing it prints SKIPPED and exits 0.
#
# Knobs (environment):
#   KIND_CLUSTER_NAME   cluster name (default tinkerkube-e2e)
#   E2E_INGRESS         nginx (default: ingress-nginx on host port 80) | port-forward (no host ports needed)
#   E2E_HTTP_PORT       host port of the ingress (default 80, must match kind-config.yaml)
#   E2E_ARTIFACTS       where logs go on failure (default var/e2e-artifacts)
#   E2E_WORKDIR         port-forward log and phase watch (default var/e2e)
#   INGRESS_NGINX_MANIFEST  the ingress-nginx kind manifest URL or file
#   PYTHON              interpreter with the tinker SDK (default .venv/bin/python, else python3)
#   KEEP_CLUSTER=1      leave the cluster running after the test
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

CLUSTER=${KIND_CLUSTER_NAME:-tinkerkube-e2e}
NAMESPACE=tinkerkube
RELEASE=tinkerkube
INGRESS=${E2E_INGRESS:-nginx}
HTTP_PORT=${E2E_HTTP_PORT:-80}
ARTIFACTS=${E2E_ARTIFACTS:-$ROOT/var/e2e-artifacts}
WORK=${E2E_WORKDIR:-$ROOT/var/e2e}  # port-forward log and the TrainingSession phase watch
INGRESS_NGINX_MANIFEST=${INGRESS_NGINX_MANIFEST:-https://raw.githubusercontent.com/kubernetes/ingress-nginx/controller-v1.12.1/deploy/static/provider/kind/deploy.yaml}
API_KEY=tml-kind-e2e   # ci/kind-values.yaml: gateway.apiKeys.keys
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

log() { printf '\n==> %s\n' "$*"; }
skip() { echo "SKIPPED: kind e2e: $*"; exit 0; }

# ---- prerequisites --------------------------------------------------------------------------------
missing=()
for tool in docker kind kubectl; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
HELM=$(command -v helm || true)
if [ -z "$HELM" ] && [ -x "$ROOT/tools/helm/helm" ]; then HELM=$ROOT/tools/helm/helm; fi
[ -n "$HELM" ] || missing+=("helm (or ./tools/helm/helm: python tests/chart/helm_tool.py)")
if [ ${#missing[@]} -gt 0 ]; then
  skip "missing ${missing[*]}; install them (and start a Docker engine) to run the real-cluster test"
fi
docker info >/dev/null 2>&1 || skip "docker is installed but no Docker engine answers (docker info failed)"
"$PYTHON" -c 'import tinker' 2>/dev/null || skip "$PYTHON cannot import the tinker SDK (make venv)"

# ---- teardown and diagnostics ---------------------------------------------------------------------
PF_PID=""
WATCH_PID=""
collect() {
  mkdir -p "$ARTIFACTS"
  echo "collecting diagnostics into $ARTIFACTS"
  kubectl get all,ts,pvc,ingress -A -o wide >"$ARTIFACTS/get-all.txt" 2>&1 || true
  kubectl -n "$NAMESPACE" get ts -o yaml >"$ARTIFACTS/trainingsessions.yaml" 2>&1 || true
  kubectl -n "$NAMESPACE" describe ts >"$ARTIFACTS/describe-ts.txt" 2>&1 || true
  kubectl -n "$NAMESPACE" describe pods >"$ARTIFACTS/describe-pods.txt" 2>&1 || true
  kubectl get events -A --sort-by=.lastTimestamp >"$ARTIFACTS/events.txt" 2>&1 || true
  for pod in $(kubectl -n "$NAMESPACE" get pods -o name 2>/dev/null); do
    kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix >"$ARTIFACTS/logs-${pod#pod/}.txt" 2>&1 || true
    kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix --previous \
      >"$ARTIFACTS/logs-${pod#pod/}-previous.txt" 2>/dev/null || true
  done
  kubectl -n ingress-nginx logs deploy/ingress-nginx-controller >"$ARTIFACTS/ingress-nginx.txt" 2>&1 || true
  "$HELM" -n "$NAMESPACE" status "$RELEASE" >"$ARTIFACTS/helm-status.txt" 2>&1 || true
  tail -n 40 "$ARTIFACTS"/logs-*gateway*.txt 2>/dev/null || true
}
cleanup() {
  status=$?
  for pid in $PF_PID $WATCH_PID; do kill "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ]; then
    echo "FAILED: kind e2e (exit $status)"
    collect
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "KEEP_CLUSTER=1: cluster $CLUSTER left running (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap cleanup EXIT

# ---- cluster --------------------------------------------------------------------------------------
mkdir -p "$WORK"
log "creating kind cluster $CLUSTER"
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "building images"
docker build -f api_gateway/Dockerfile -t tinkerkube/gateway:local .
docker build -f operator/Dockerfile -t tinkerkube/operator:local .
docker build -f trainer_pod/Dockerfile --build-arg VARIANT=cpu -t tinkerkube/trainer:local-cpu .
log "loading images into kind"
for image in tinkerkube/gateway:local tinkerkube/operator:local tinkerkube/trainer:local-cpu; do
  kind load docker-image --name "$CLUSTER" "$image"
done

# Checkpoints are a hostPath on the node; trainer and gateway pods run as uid 10001.
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" sh -c 'mkdir -p /var/lib/tinkerkube/checkpoints && chown 10001:10001 /var/lib/tinkerkube/checkpoints'
done

log "applying the CRDs"
kubectl apply --server-side -f crds/
kubectl wait --for condition=established --timeout=60s crd/trainingsessions.tinkerkube.dev \
  crd/trainerpools.tinkerkube.dev

HELM_ARGS=(-f charts/tinkerkube/ci/kind-values.yaml)
if [ "$INGRESS" = nginx ]; then
  log "installing ingress-nginx"
  kubectl apply -f "$INGRESS_NGINX_MANIFEST"
  kubectl -n ingress-nginx rollout status deploy/ingress-nginx-controller --timeout=300s
  kubectl -n ingress-nginx wait --for=condition=complete job --all --timeout=120s || true
else
  HELM_ARGS+=(--set ingress.enabled=false)
fi

log "helm install"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
"$HELM" upgrade --install "$RELEASE" charts/tinkerkube -n "$NAMESPACE" "${HELM_ARGS[@]}" --wait --timeout 10m
kubectl -n "$NAMESPACE" rollout status "deploy/$RELEASE-gateway" --timeout=300s
kubectl -n "$NAMESPACE" rollout status "deploy/$RELEASE-operator" --timeout=300s

if [ "$INGRESS" = nginx ]; then
  BASE_URL="http://127.0.0.1:$HTTP_PORT"
else
  PF_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  kubectl -n "$NAMESPACE" port-forward "svc/$RELEASE-gateway" "$PF_PORT:80" >"$WORK/port-forward.log" 2>&1 &
  PF_PID=$!
  BASE_URL="http://127.0.0.1:$PF_PORT"
fi

log "waiting for the gateway at $BASE_URL"
for _ in $(seq 1 60); do
  curl -fsS "$BASE_URL/api/v1/healthz" >/dev/null 2>&1 && break
  sleep 2
done
curl -fsS "$BASE_URL/api/v1/healthz"; echo

log "running the tinker SDK smoke test"
# Record every phase the TrainingSessions pass through (the gateway may delete them once its session ends).
kubectl -n "$NAMESPACE" get ts --watch --no-headers \
  -o custom-columns=NAME:.metadata.name,PHASE:.status.phase >"$WORK/ts-watch.txt" 2>&1 &
WATCH_PID=$!
TINKER_BASE_URL=$BASE_URL TINKER_API_KEY=$API_KEY "$PYTHON" tests/kind/sdk_smoke.py
sleep 2
kill "$WATCH_PID" 2>/dev/null || true

log "checking the cluster saw it"
kubectl -n "$NAMESPACE" get ts -o wide
sort -u "$WORK/ts-watch.txt"
sessions=$(awk '$2 == "Ready" {print $1}' "$WORK/ts-watch.txt" | sort -u | wc -l)
# Two runs: the trained one, and the one restored from its checkpoint.
[ "$sessions" -ge 2 ] || { echo "expected 2 TrainingSessions to reach Ready, saw $sessions"; exit 1; }
kubectl -n "$NAMESPACE" get pods -l tinkerkube.dev/role=trainer -o wide

echo "PASSED: kind e2e"
