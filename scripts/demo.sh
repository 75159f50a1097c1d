#!/usr/bin/env bash
# `just demo`: runs the demo binary (built by `just build`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./target/debug/demo
