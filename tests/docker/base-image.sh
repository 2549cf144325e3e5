#!/usr/bin/env bash
# A minimal Debian bookworm image with python3 and its venv module, made without a registry:
# debootstrap from this machine's own apt mirror, then `docker import`. The tests build the
# project's image on it (Dockerfile's BASE); so can anyone whose Docker has no registry.
#   usage: tests/docker/base-image.sh TAG
set -euo pipefail
tag=${1:?usage: $0 TAG}

# the mirror of this machine's bookworm entry (deb822 .sources first, then sources.list)
mirror=$(awk '
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") ok = 1 }
    /^$/ { if (ok && uri !~ /security/) { print uri; exit } ok = 0; uri = "" }
    END { if (ok && uri !~ /security/) print uri }' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    head -n1)
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "base-image: no bookworm entry in this machine's apt sources" >&2; exit 1; }

root=$(mktemp -d /var/tmp/mfd-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -n 5 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# the certificate authorities this machine adds (a TLS-inspecting proxy's, say): pip in the
# image then trusts what pip here trusts
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . |
    docker import -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' -c 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "$tag"
