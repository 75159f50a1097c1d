#!/usr/bin/env bash
# `just push-images <registry>/<path> [tag]`: pushes the two OCI images `just
# images` built (target/images) to a registry with skopeo, as
# <registry>/<path>/snapshot-webhook:<tag> and .../snapshot-sidecar:<tag>.
#
# A registry with a private CA or credentials (env, all optional):
#   PUSH_REGISTRY_CA        the registry's CA certificate (PEM file); given to
#                           skopeo as a folder holding only ca.crt (a key beside
#                           it would make skopeo look for a client certificate)
#   PUSH_REGISTRY_AUTHFILE  a Docker config JSON with the registry's credentials:
#                           ~/.docker/config.json, or the .dockerconfigjson of the
#                           registry secret
#   PUSH_REGISTRY_USERNAME, PUSH_REGISTRY_PASSWORD
#                           credentials, written to a temporary authfile (0600),
#                           never on a command line
# IMAGES_DIR (target/images): where the OCI layouts are.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:?usage: push-images <registry>/<path> [tag]}
tag=${2:-0.1.0}
images=${IMAGES_DIR:-target/images}
host=${prefix%%/*}

say() { echo "push-images: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

command -v skopeo >/dev/null || die "no skopeo on PATH (Debian: apt-get install skopeo)"
for image in snapshot-webhook snapshot-sidecar; do
    [ -f "$images/$image/index.json" ] || die "no $images/$image: run \`just images $tag\` first"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
opts=()
if [ -n "${PUSH_REGISTRY_CA:-}" ]; then
    [ -f "$PUSH_REGISTRY_CA" ] || die "PUSH_REGISTRY_CA: no file $PUSH_REGISTRY_CA"
    mkdir "$work/certs"
    cp "$PUSH_REGISTRY_CA" "$work/certs/ca.crt"
    opts+=(--dest-cert-dir "$work/certs")
fi
if [ -n "${PUSH_REGISTRY_USERNAME:-}" ] || [ -n "${PUSH_REGISTRY_PASSWORD:-}" ]; then
    [ -z "${PUSH_REGISTRY_AUTHFILE:-}" ] || die "give PUSH_REGISTRY_AUTHFILE or PUSH_REGISTRY_USERNAME/PASSWORD, not both"
    [ -n "${PUSH_REGISTRY_USERNAME:-}" ] && [ -n "${PUSH_REGISTRY_PASSWORD:-}" ] ||
        die "PUSH_REGISTRY_USERNAME and PUSH_REGISTRY_PASSWORD go together"
    auth=$(printf '%s:%s' "$PUSH_REGISTRY_USERNAME" "$PUSH_REGISTRY_PASSWORD" | base64 -w0)
    (umask 077 && printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$host" "$auth" >"$work/auth.json")
    opts+=(--dest-authfile "$work/auth.json")
elif [ -n "${PUSH_REGISTRY_AUTHFILE:-}" ]; then
    [ -f "$PUSH_REGISTRY_AUTHFILE" ] || die "PUSH_REGISTRY_AUTHFILE: no file $PUSH_REGISTRY_AUTHFILE"
    opts+=(--dest-authfile "$PUSH_REGISTRY_AUTHFILE")
fi

for image in snapshot-webhook snapshot-sidecar; do
    skopeo copy "${opts[@]}" "oci:$images/$image:$tag" "docker://$prefix/$image:$tag" ||
        die "pushing $image to $prefix (a private CA: PUSH_REGISTRY_CA; credentials: PUSH_REGISTRY_AUTHFILE or PUSH_REGISTRY_USERNAME/PASSWORD)"
    say "pushed $prefix/$image:$tag"
done
