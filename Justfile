# desktop-snapshot: `just --list` is the manual.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Show every recipe with its one-line description.
default:
    @just --list

# Install the Debian packages and tools the tests and the demo need (as root).
deps:
    bash scripts/install-deps.sh

# Build every binary (debug profile, the one the tests use).
build:
    cargo build --workspace --bins --locked

# Run the unit and end-to-end tests against real registry and containerd.
test: deps build manifests-check
    bash scripts/test.sh

# Play the whole story on this machine: login, snapshot, logoff, login again.
demo: deps build
    bash scripts/demo.sh

# Measure the webhook (admissions/s, latency) and the sidecar (MB/s, RSS, vs stock tools), release build.
bench: deps
    cargo build --release --locked --workspace --bins
    ./target/release/webhook-bench
    ./target/release/sidecar-bench

# Make a CA and the webhook's serving certificate, and fill the caBundle into the manifests.
certs service="snapshot-webhook" namespace="desktop-snapshot" out=".certs":
    cargo run --quiet --locked -p snapshot-certs -- --service {{service}} --namespace {{namespace}} --out {{out}} --write-ca-bundle manifests/base/webhook-cabundle.yaml

# Render the manifests with kustomize and validate every object against the Kubernetes schemas, offline.
manifests-check:
    bash scripts/manifests-check.sh

# Format and lint.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
