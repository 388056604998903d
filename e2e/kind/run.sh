#!/usr/bin/env bash
# Run the e2e suite on kind instead of the from-source local cluster (needs Docker, kind, kubectl).
# It cannot run on the project's own machines (no Docker engine there); see e2e/cluster/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
K8S=$("$PY" -c 'from e2e.cluster import versions; print(versions.KUBERNETES)')
KWOK=$("$PY" -c 'from e2e.cluster import versions; print(versions.KWOK)')
NAME=sarathi
KUBECONFIG_FILE=.cache/kind/kubeconfig

if ! kind get clusters | grep -qx "$NAME"; then
  kind create cluster --config e2e/kind/kind-config.yaml --image "${KIND_NODE_IMAGE:-kindest/node:$K8S}"
fi
mkdir -p "$(dirname "$KUBECONFIG_FILE")"
kind get kubeconfig --name "$NAME" > "$KUBECONFIG_FILE"
export KUBECONFIG=$PWD/$KUBECONFIG_FILE

# kwok in the cluster, with the same Stage objects and fake GPU nodes the local cluster uses.
kubectl apply -f "https://github.com/kubernetes-sigs/kwok/releases/download/$KWOK/kwok.yaml"
kubectl -n kube-system rollout status deployment/kwok-controller --timeout=180s
kubectl apply -f e2e/cluster/kwok-stages.yaml
"$PY" -m e2e.cluster gpu-nodes --gpu-nodes 2 | kubectl apply -f -
kubectl wait --for=condition=Ready node -l type=kwok --timeout=120s

# The fixture uses $KUBECONFIG; tests that start their own local cluster are left out.
"$PY" -m pytest e2e -m "not localcluster" "$@"
