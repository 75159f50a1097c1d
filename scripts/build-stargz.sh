#!/usr/bin/env bash
# Builds the tests' stargz snapshotter (tests/stargz, Go) into
# target/stargz/stargz-snapshotter, offline, from Debian's packaged sources
# (golang-github-containerd-stargz-snapshotter-dev) in GOPATH mode. Skips the
# build when the binary is newer than its sources. `just deps` installs Go and the sources.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/stargz
bin=$out/stargz-snapshotter
src=tests/stargz
if ! command -v go >/dev/null 2>&1 ||
   [ ! -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/snapshot ]; then
    echo "build-stargz: Go or the stargz-snapshotter sources are missing: run \`just deps\`" >&2
    exit 1
fi
if [ -x "$bin" ] && [ -z "$(find "$src" scripts/build-stargz.sh -newer "$bin" -print -quit)" ]; then
    exit 0
fi
mkdir -p "$out/gopath" "$out/go-build"
echo "build-stargz: building $bin (about a minute the first time)"
GO111MODULE=off GOFLAGS= GOPATH="$PWD/$out/gopath:/usr/share/gocode" GOCACHE="$PWD/$out/go-build" \
    go build -o "$bin.tmp" "./$src"
mv "$bin.tmp" "$bin"
