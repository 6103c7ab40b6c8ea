#!/usr/bin/env bash
# Builds the project's Dockerfile with BuildKit on the engine at DOCKER_HOST, never pulling
# (the base must already be there: a real one, or stand-in-base.sh's).
# Usage: build.sh TAG VARIANT BASE_IMAGE [TARGET]
# The host's CA bundle goes to pip as a build secret: networks that re-sign TLS need it, and a
# secret never lands in an image layer.
set -euo pipefail
tag=${1:?usage: build.sh TAG VARIANT BASE_IMAGE [TARGET]}
variant=${2:?usage: build.sh TAG VARIANT BASE_IMAGE [TARGET]}
base=${3:?usage: build.sh TAG VARIANT BASE_IMAGE [TARGET]}
target=${4:-serve}
ca_bundle=${PIP_CERT_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
cd "$(dirname "$0")/../.."
secret=()
[ -f "$ca_bundle" ] && secret=(--secret "id=pip-cert,src=$ca_bundle")
# Host networking: the throw-away engine runs without a bridge (see engine.sh).
DOCKER_BUILDKIT=1 /usr/bin/docker build --pull=false --network host --progress plain \
  "${secret[@]}" --build-arg "BASE_IMAGE=$base" --build-arg "VARIANT=$variant" \
  --target "$target" --tag "$tag" .
