#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmark need, only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for pair in containerd:containerd runc:runc docker-registry:docker-registry htpasswd:apache2-utils \
            skopeo:skopeo protoc:protobuf-compiler busybox:busybox-static \
            promtool:prometheus; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# The stargz snapshotter of the lazy-restore tests: Go and the snapshotter's
# sources (built offline by scripts/build-stargz.sh), ctr-remote, and fuse3
# (its fusermount3 is a fallback only: as root the snapshotter mounts /dev/fuse itself).
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v ctr-remote >/dev/null 2>&1 || need+=(stargz-snapshotter)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
[ -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/snapshot ] ||
    need+=(golang-github-containerd-stargz-snapshotter-dev)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing ${need[*]}; run as root (apt-get)" >&2
        exit 1
    fi
    echo "install-deps: apt-get install ${need[*]}"
    apt-get update -qq -o DPkg::Lock::Timeout=300
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
fi
