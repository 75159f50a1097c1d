# desktop-snapshot: `just --list` is the manual.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Show every recipe with its one-line description.
default:
    @just --list

# Install the Debian packages and tools the tests and the demo need (as root).
deps:
    bash scripts/install-deps.sh

# Build every binary (debug profile, the one the tests use), and the tests' stargz snapshotter (Go, offline).
build:
    cargo build --workspace --bins --locked
    bash scripts/build-stargz.sh

# Run the unit and end-to-end tests against real registry and containerd (the story tests run the images).
test: deps build images manifests-check monitoring-check
    bash scripts/test.sh

# Play the whole story on this machine, webhook and sidecar from their images: login, snapshot, logoff, login again.
demo: deps build images
    bash scripts/demo.sh

# Measure the webhook (admissions/s, latency) and the sidecar (MB/s, RSS, vs stock tools), release build.
bench: deps
    cargo build --release --locked --workspace --bins
    ./target/release/webhook-bench
    ./target/release/sidecar-bench
    ./target/release/lifetime-bench
    ./target/release/increment-bench
    ./target/release/restore-bench

# Soak, release build, not part of `test`: 10 min of 200 admissions/s and a snapshot every 10 s, registry restart, cert rotation; fails on a budget overrun, a paused desktop, an incomplete image or growth (`just soak --minutes 2`).
soak *args: deps
    cargo build --release --locked --workspace --bins
    ./target/release/soak {{args}}

# The webhook's serving certificate, signed by the CA in .certs (made the first time; kept after, so the caBundle stays), and the caBundle filled into the manifests; `--new-ca` / `--drop-previous-ca` roll the CA over (docs/deploying.md).
certs *args:
    cargo run --quiet --locked -p snapshot-certs -- --write-ca-bundle manifests/base/webhook-cabundle.yaml {{args}}

# On a live install: a new serving certificate from the same CA into its secret, then wait until every webhook pod serves it (the kubelet's refresh: 60-80 s).
rotate-certs namespace="desktop-snapshot" service="snapshot-webhook" out=".certs":
    bash scripts/rotate-certs.sh {{namespace}} {{service}} {{out}}

# Render the manifests with kustomize and validate every object against the Kubernetes schemas, offline.
manifests-check:
    bash scripts/manifests-check.sh

# Check the monitoring component offline: promtool check and unit-test its alerts, metric names against the binaries' sources, kustomize render.
monitoring-check: deps
    bash scripts/monitoring-check.sh

# Build the webhook and sidecar OCI images (static binaries, no Docker daemon) into target/images, and the tests' static desktop-probe.
images tag="0.1.0":
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu -p snapshot-webhook -p snapshot-sidecar -p desktop-probe
    cargo build --locked -p snapshot-tests --bin oci-image
    ./target/debug/oci-image target/x86_64-unknown-linux-gnu/release/snapshot-webhook snapshot-webhook {{tag}} 65532 target/images/snapshot-webhook
    ./target/debug/oci-image target/x86_64-unknown-linux-gnu/release/snapshot-sidecar snapshot-sidecar {{tag}} 0 target/images/snapshot-sidecar

# Push the images built by `just images` to a registry, e.g. `just push-images registry.example.net/desktop-snapshot`; a private CA or credentials by env: PUSH_REGISTRY_CA, PUSH_REGISTRY_AUTHFILE or PUSH_REGISTRY_USERNAME and _PASSWORD.
push-images prefix tag="0.1.0":
    bash scripts/push-images.sh {{prefix}} {{tag}}

# Format and lint.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
