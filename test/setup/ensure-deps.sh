#!/bin/sh
# Installs the Debian packages the integration tests need, when any is missing.
# Idempotent and silent when everything is already there.
set -eu

missing=''
for cmd in docker-registry skopeo containerd ctr podman htpasswd openssl curl chromium redis-server; do
  command -v "$cmd" >/dev/null 2>&1 || missing="$missing $cmd"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=''
elif command -v sudo >/dev/null 2>&1; then
  SUDO='sudo'
else
  echo "ensure-deps: missing commands:$missing" >&2
  echo "ensure-deps: not root and no sudo; install docker-registry skopeo containerd podman apache2-utils openssl curl chromium redis-server" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-deps: missing commands:$missing (and no apt-get to install them)" >&2
  exit 1
fi

$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  docker-registry skopeo containerd podman apache2-utils openssl curl chromium redis-server >/dev/null

still=''
for cmd in docker-registry skopeo containerd ctr podman htpasswd openssl curl chromium redis-server; do
  command -v "$cmd" >/dev/null 2>&1 || still="$still $cmd"
done
if [ -n "$still" ]; then
  echo "ensure-deps: still missing after install:$still" >&2
  exit 1
fi
