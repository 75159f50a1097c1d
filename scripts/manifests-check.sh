#!/usr/bin/env bash
# Renders manifests/base and every overlay with kustomize (kubectl's built-in) and
# validates every object offline: Kubernetes kinds against the Kubernetes JSON
# schemas (PyPI kubernetes-validate, strict: unknown fields fail), cert-manager
# kinds against manifests/schemas/cert-manager.io-v1.json. Fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=${K8S_VERSION:-1.33}

if ! command -v kubectl >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "manifests-check: installing kubectl (Debian package kubernetes-client)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null || true
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "manifests-check: kubectl (with its built-in kustomize) is needed to render the manifests." >&2
    echo "  Install it from your distribution or https://kubernetes.io/docs/tasks/tools/ and run again." >&2
    exit 1
fi
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
    echo "manifests-check: installing kubernetes-validate (PyPI; it bundles the schemas)"
    pip install --quiet kubernetes-validate
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for dir in manifests/base manifests/overlays/*/; do
    dir=${dir%/}
    name=$(echo "$dir" | tr '/' '_')
    kubectl kustomize "$dir" > "$out/$name.yaml"
done
python3 scripts/manifests_check.py "$K8S_VERSION" manifests/schemas "$out"/*.yaml
