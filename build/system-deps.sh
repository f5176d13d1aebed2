#!/usr/bin/env bash
# System programs the test suite drives for real: redis-server (the fleet cache tier),
# chromium + chromedriver (browser checks), promtool (alert unit tests), djxl (decodes the
# JPEG XL outputs, rebuilds recompressed JPEGs bit for bit), node (runs the README's front-end
# recipes).
# Run by `make test` before pytest. Installs what is missing with apt-get when run as root on
# Debian/Ubuntu; otherwise it only says what is missing (those tests skip, except in CI) and
# exits 0. A no-op when everything is there.
set -uo pipefail

# command -> Debian package
declare -A PACKAGE=(
    [redis-server]=redis-server
    [chromium]=chromium
    [chromedriver]=chromium-driver
    [promtool]=prometheus
    [djxl]=libjxl-tools
    [node]=nodejs
)
missing=()
for cmd in redis-server chromium chromedriver promtool djxl node; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGE[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

say() { echo "system-deps: $*" >&2; }
if [ "$(id -u)" != 0 ]; then
    say "missing ${missing[*]}; as root: apt-get install -y --no-install-recommends ${missing[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "missing ${missing[*]} and no apt-get here: install them with your package manager"
    exit 0
fi
say "installing ${missing[*]}"
# These packages also ship services (redis-server, prometheus); we only want the programs.
# Debian's invoke-rc.d asks /usr/sbin/policy-rc.d: exit 101 = do not start anything.
cleanup=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    cleanup=/usr/sbin/policy-rc.d
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
rc=$?
[ -n "$cleanup" ] && rm -f "$cleanup"
[ $rc -eq 0 ] || say "apt-get failed (exit $rc); the tests that need ${missing[*]} will say so"
exit 0
