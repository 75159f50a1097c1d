#!/usr/bin/env bash
# `just rotate-certs [namespace] [service] [out]`: renews the webhook's serving
# certificate on a live install, with the CA already in `out` (the caBundle does
# not change), loads it into the `<service>-tls` secret, and waits until every
# webhook pod serves it.
#
# The kubelet refreshes a mounted secret's files 60-80 s after the secret
# changes, and the webhook then picks the files up within its
# --tls-reload-interval (5 s): the command takes about a minute and a half,
# during which the pods serve the old certificate, still trusted. It refuses to
# start when the cluster's caBundle does not trust the CA in `out` (the new
# certificate would be refused: apply the manifests first), and when
# cert-manager manages the certificate.
#
# Env: ROTATE_WAIT_SECONDS (180): how long to wait for the pods; 0: do not wait.
# Needs kubectl (its current context is the cluster) and openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
namespace=${1:-desktop-snapshot}
service=${2:-snapshot-webhook}
out=${3:-.certs}
wait_seconds=${ROTATE_WAIT_SECONDS:-180}
secret=$service-tls

say() { echo "rotate-certs: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

command -v kubectl >/dev/null || die "no kubectl on PATH"
command -v openssl >/dev/null || die "no openssl on PATH"
[ -f "$out/ca.crt" ] && [ -f "$out/ca.key" ] ||
    die "no CA in $out (ca.crt, ca.key): rotate with the CA that made the install; a first install is \`just certs\` (docs/deploying.md)"

# The webhook configuration (named like the Service in manifests/base).
inject=$(kubectl get mutatingwebhookconfiguration "$service" \
    -o jsonpath='{.metadata.annotations.cert-manager\.io/inject-ca-from}') ||
    die "cannot read MutatingWebhookConfiguration $service: is the webhook installed in this cluster?"
[ -z "$inject" ] || die "cert-manager manages this certificate ($inject): it renews it itself"
kubectl -n "$namespace" get secret "$secret" >/dev/null ||
    die "no secret $namespace/$secret: a first install loads it by hand (docs/deploying.md)"

# The caBundle must already trust the CA that will sign the new certificate.
fingerprints() { # PEM bundle on stdin -> one SHA-256 fingerprint a line
    local block="" line
    while IFS= read -r line; do
        block+="$line"$'\n'
        if [ "$line" = "-----END CERTIFICATE-----" ]; then
            printf '%s' "$block" | openssl x509 -noout -fingerprint -sha256
            block=""
        fi
    done
}
bundle=$(kubectl get mutatingwebhookconfiguration "$service" \
    -o jsonpath='{.webhooks[0].clientConfig.caBundle}' | base64 -d 2>/dev/null) || bundle=
ca_fp=$(fingerprints <"$out/ca.crt")
fingerprints <<<"$bundle" | grep -qxF "$ca_fp" ||
    die "the cluster's caBundle does not trust $out/ca.crt ($ca_fp): apply the caBundle \
first (kubectl apply -k <your kustomization>), or a certificate from this CA is refused"

# A new serving certificate from the same CA, into the secret.
cargo run --quiet --locked -p snapshot-certs -- --service "$service" --namespace "$namespace" \
    --out "$out" --write-ca-bundle manifests/base/webhook-cabundle.yaml >/dev/null
kubectl -n "$namespace" create secret tls "$secret" --cert="$out/tls.crt" --key="$out/tls.key" \
    --dry-run=client -o yaml | kubectl apply -f -
new_fp=$(openssl x509 -noout -fingerprint -sha256 -in "$out/tls.crt")
say "secret $namespace/$secret updated ($new_fp)"
[ "$wait_seconds" -gt 0 ] || { say "not waiting: the pods serve it within 60-80 s (kubelet) + 5 s (reload)"; exit 0; }

# What a pod serves on 8443, through a port-forward of our own.
served() { # pod -> fingerprint of the certificate it serves, or nothing
    local pod=$1 log port pid fp=
    log=$(mktemp)
    kubectl -n "$namespace" port-forward "pod/$pod" :8443 >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log" | head -n1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    if [ -n "${port:-}" ]; then
        fp=$(timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername "$service.$namespace.svc" \
            </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 2>/dev/null) || fp=
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$log"
    printf '%s' "$fp"
}

say "waiting for every webhook pod to serve it (kubelet's secret refresh: 60-80 s, then up to 5 s)"
start=$SECONDS
while :; do
    pods=$(kubectl -n "$namespace" get pods -l "app.kubernetes.io/name=$service" \
        --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}')
    [ -n "$pods" ] || die "no running webhook pod in $namespace"
    old=()
    for pod in $pods; do
        [ "$(served "$pod")" = "$new_fp" ] || old+=("$pod")
    done
    if [ ${#old[@]} -eq 0 ]; then
        say "done in $((SECONDS - start)) s: every pod serves the new certificate"
        exit 0
    fi
    [ $((SECONDS - start)) -lt "$wait_seconds" ] ||
        die "after $wait_seconds s, still the old certificate (or no answer) from: ${old[*]}"
    sleep 5
done
