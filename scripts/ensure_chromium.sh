#!/usr/bin/env bash
# Installs Debian's chromium when it is missing: the offline-docs test renders /docs and /redoc in it,
# and CI runs on a fresh machine as root.
# Exit 0: chromium is on PATH. Exit 3: this machine cannot install packages (no apt-get, or no root).
set -euo pipefail

command -v chromium >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
    echo "chromium is missing and there is no apt-get to install it" >&2
    exit 3
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        echo "chromium is missing and installing it needs root (or password-less sudo)" >&2
        exit 3
    fi
    as_root=(sudo -n)
fi
# Another apt run on the same machine holds the lock for a while; wait for it rather than fail.
apt_opts=(-q -o DPkg::Lock::Timeout=300)
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y --no-install-recommends chromium
command -v chromium >/dev/null
