#!/usr/bin/env bash
# Makes a local stand-in for a Debian-based Python base image (python:3.11-slim) where no image
# registry can be reached: debootstrap bookworm from Debian's mirror, add Python 3.11 with venv,
# import it under the real image's name. The project's Dockerfile then builds unchanged with
# --pull=never. Usage: DOCKER_HOST=... stand-in-base.sh TAG [CACHE_DIR]
# CACHE_DIR keeps the root file system tarball between runs (CI starts from nothing anyway).
# STAND_IN_PACKAGES=ca-certificates makes a Python-less base, like the CUDA runtime images (only
# to build the GPU variant: it has Debian's Python where the real one gets Ubuntu's, and no CUDA).
set -euo pipefail
tag=${1:?usage: stand-in-base.sh TAG [CACHE_DIR]}
cache=${2:-}
docker_cli=/usr/bin/docker
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=${STAND_IN_PACKAGES:-python3,python3-venv,ca-certificates}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarball="$work/rootfs.tar"
if [ -n "$cache" ] && [ -f "$cache/bookworm-${packages//,/-}.tar" ]; then
  tarball="$cache/bookworm-${packages//,/-}.tar"
else
  root="$work/root"
  debootstrap --variant=minbase --include="$packages" \
    bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # What the slim image leaves out too: package caches, docs, man pages.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  [ -e "$root/usr/bin/python3" ] && ln -sf python3 "$root/usr/bin/python"
  # A tarball keeps file ownership and modes; `docker import` then keeps them as well.
  tar -C "$root" --numeric-owner -cf "$tarball" .
  if [ -n "$cache" ]; then
    mkdir -p "$cache"
    cp "$tarball" "$cache/bookworm-${packages//,/-}.tar"
  fi
fi
"$docker_cli" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  "$tarball" "$tag" >/dev/null
echo "$tag"
