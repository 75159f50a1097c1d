#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmark need, only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for pair in containerd:containerd runc:runc docker-registry:docker-registry htpasswd:apache2-utils \
            skopeo:skopeo protoc:protobuf-compiler busybox:busybox-static; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing ${need[*]}; run as root (apt-get)" >&2
        exit 1
    fi
    echo "install-deps: apt-get install ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
