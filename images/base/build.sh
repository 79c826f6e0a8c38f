#!/usr/bin/env bash
# Build a python:3.11-slim-bookworm equivalent from Debian packages, for machines that cannot pull from Docker Hub.
#
#   images/base/build.sh [TAG]          (default TAG: localhost/editinfinity-base:py3.11-bookworm)
#
# Needs root (debootstrap), debootstrap, and docker or podman ($DOCKER). Steps: debootstrap a minimal bookworm
# root file system with Debian's python3.11 into images/base/build/rootfs, pack it as rootfs.tar, copy this
# machine's CA bundle next to it (pip inside image builds must trust the same TLS roots as the host), then build
# images/base/Containerfile, which adds a virtual environment on PATH so that `python`/`pip` behave as in the
# official python image. Environment knobs: MIRROR (Debian mirror), SUITE (bookworm), CA_BUNDLE (host bundle),
# DOCKER (docker|podman), BUILD_ARGS (extra build flags, e.g. --ulimit for podman).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="${1:-localhost/editinfinity-base:py3.11-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-bookworm}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DOCKER="${DOCKER:-$(command -v podman >/dev/null && echo podman || echo docker)}"
# Debian packages: the interpreter with its venv/ensurepip module (python3.11-venv needs python3-distutils,
# which debootstrap does not resolve through the virtual python3.11-distutils), TLS roots, and what python:3.11-slim also has.
PACKAGES="python3.11,python3.11-venv,python3-distutils,ca-certificates,netbase,tzdata"

die() { echo "images/base/build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root (or with sudo)"
command -v debootstrap >/dev/null || die "debootstrap is not installed: apt-get install debootstrap"
[ -r "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE: set CA_BUNDLE=/path/to/ca-certificates.crt"

work="$here/build"
rm -rf "$work"
mkdir -p "$work"
start=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (full log: $work/debootstrap.log)"; }
# Trim what a slim image leaves out: package caches and lists, docs, man pages, locales.
rm -rf "$work/rootfs"/var/cache/apt/archives/*.deb "$work/rootfs"/var/lib/apt/lists/* \
       "$work/rootfs"/usr/share/doc/* "$work/rootfs"/usr/share/man/* "$work/rootfs"/usr/share/info/* \
       "$work/rootfs"/var/log/*.log "$work/rootfs"/var/cache/debconf/*-old
find "$work/rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$work/rootfs/etc/apt/sources.list"
tar --numeric-owner --xattrs -C "$work/rootfs" -cf "$work/rootfs.tar" .
rm -rf "$work/rootfs"
cp "$CA_BUNDLE" "$work/ca-certificates.crt"
echo "debootstrap + pack: $((SECONDS - start)) s" >&2
# shellcheck disable=SC2086
"$DOCKER" build ${BUILD_ARGS:-} -f "$here/Containerfile" -t "$tag" "$work"
echo "base image $tag built in $((SECONDS - start)) s" >&2
