#!/usr/bin/env bash
# Smoke-test a built .pyz with the machine's bare /usr/bin/python3 (no venv, clean env):
#
#   bash build/smoke.sh imgproxy.pyz
#
# Starts it twice (cold: first extraction into a fresh SHIV_ROOT, then warm) with 2 workers
# on a free 127.0.0.1 port in its own session, checks passthrough, resize, AVIF, JPEG XL, /metrics and
# /health, stops it with SIGTERM to the process group, then checks --version, --help,
# --check-config (good and bad environment) and, when another CPython minor is installed,
# the wrong-interpreter message.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: build/smoke.sh PYZ" >&2; exit 2; }
pyz=$(realpath "$1")
py=${SMOKE_PYTHON:-/usr/bin/python3}
images=$PWD/data/images
tmp=$(mktemp -d "${TMPDIR:-/tmp}/imgproxy-smoke.XXXXXX")
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# a clean environment: nothing from a venv, no IMAGE_PROXY_* or PROMETHEUS_* leaking in
run_env=(env -i PATH=/usr/bin:/bin HOME="$tmp/home" LANG=C.UTF-8 SHIV_ROOT="$tmp/shiv")
mkdir -p "$tmp/home"

fail() { echo "smoke: FAIL: $*" >&2; [ -f "$tmp/server.log" ] && tail -30 "$tmp/server.log" >&2; exit 1; }

start_server() {  # $1: label; sets pid and port
    port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    t0=$(date +%s.%N)
    # setsid: Sanic SIGKILLs its own process group on some failures; give it its own.
    # (A background job of a non-interactive shell is no group leader, so setsid does not
    # fork: $! is the server's pid and its process group id.)
    "${run_env[@]}" IMAGE_PROXY_ROOT_PATH="$images" IMAGE_PROXY_WORKERS=2 \
        IMAGE_PROXY_BIND_ADDRESS="127.0.0.1:$port" \
        setsid "$py" "$pyz" >"$tmp/server.log" 2>&1 &
    pid=$!
    [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || fail "server is not its own process group"
    "$py" - "$port" "$t0" "$1" <<'PY' || fail "$1 start"
import sys, time, urllib.request
port, t0, label = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
deadline = time.time() + 90
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(f"{label}: /health did not answer within 90 s")
    time.sleep(0.05)
print(f"smoke: {label} start: /health answered after {time.time() - t0:.2f} s")
PY
}

stop_server() {
    kill -TERM -- "-$pid"
    for _ in $(seq 150); do
        kill -0 -- "-$pid" 2>/dev/null || { pid=; echo "smoke: stopped on SIGTERM"; return 0; }
        sleep 0.1
    done
    fail "process group $pid still alive 15 s after SIGTERM"
}

start_server cold
[ -d "$tmp/shiv" ] || fail "nothing extracted into SHIV_ROOT"

"$py" - "$port" "$images" <<'PY' || fail "HTTP checks"
import struct, sys, urllib.request

port, images = int(sys.argv[1]), sys.argv[2]


def get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def jpeg_size(b):
    i = 2
    while i < len(b):
        if b[i] != 0xFF:
            raise ValueError("bad JPEG marker")
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return w, h
        i += 2 + length
    raise ValueError("no SOF marker")


def check(cond, what):
    if not cond:
        sys.exit(f"check failed: {what}")
    print(f"smoke: ok  {what}")


original = open(f"{images}/coffee.jpg", "rb").read()
status, ctype, body = get("/coffee.jpg")
check(status == 200 and body == original, "passthrough bytes identical to the file")
check(ctype == "image/jpeg", "passthrough Content-Type image/jpeg")

status, ctype, body = get("/coffee.jpg?size=100")
w, h = jpeg_size(body) if body[:3] == b"\xff\xd8\xff" else (0, 0)
check(status == 200 and ctype == "image/jpeg", "?size=100 -> 200 image/jpeg")
check(max(w, h) == 100 and (w, h) == (100, 67), f"?size=100 -> JPEG {w}x{h} (600x400 source)")

status, ctype, body = get("/photos/sample.jpg?size=200&format=avif")
check(status == 200 and ctype == "image/avif", "?format=avif -> 200 image/avif")
check(body[4:12] == b"ftypavif", "AVIF magic ftypavif")

status, ctype, body = get("/coffee.jpg?w=120&h=120&fit=cover&format=jxl")
jxl = body[:2] == b"\xff\x0a" or body[4:8] == b"JXL "
check(status == 200 and ctype == "image/jxl" and jxl, "?fit=cover&format=jxl -> 200 image/jxl")
status, ctype, body = get("/coffee.jpg?format=jxl")
check(status == 200 and body[4:8] == b"JXL " and len(body) < len(original),
      f"?format=jxl: lossless JPEG recompression, {len(body)} < {len(original)} bytes")

status, ctype, body = get("/chelsea.jpg?size=120&format=webp")
check(status == 200 and body[:4] == b"RIFF" and body[8:12] == b"WEBP", "?format=webp -> RIFF/WEBP")

status, _, body = get("/health")
check(status == 200 and body.strip() == b"ok", "/health is ok")
status, _, body = get("/metrics")
check(status == 200 and b"image_requests_total" in body, "/metrics has image_requests_total")
PY
stop_server

start_server warm
stop_server

# the command-line modes, from the same pyz and interpreter
out=$("${run_env[@]}" "$py" "$pyz" --version) || fail "--version"
[[ $out == "imgproxy "* ]] || fail "--version printed '$out'"
echo "smoke: ok  --version: $out"
"${run_env[@]}" "$py" "$pyz" --help | grep -q IMAGE_PROXY_ROOT_PATH || fail "--help"
echo "smoke: ok  --help lists the variables"
out=$("${run_env[@]}" IMAGE_PROXY_ROOT_PATH="$images" "$py" "$pyz" --check-config) ||
    fail "--check-config with a good environment"
echo "smoke: ok  --check-config: $out"
set +e
out=$("${run_env[@]}" IMAGE_PROXY_ROOT_PATH=/nonexistent IMAGE_PROXY_WORKERS=zero \
    "$py" "$pyz" --check-config 2>&1)
rc=$?
set -e
[ $rc -eq 1 ] || fail "--check-config with a bad environment exited $rc, not 1: $out"
grep -q IMAGE_PROXY_ROOT_PATH <<<"$out" && grep -q IMAGE_PROXY_WORKERS <<<"$out" ||
    fail "--check-config did not name both bad variables: $out"
grep -q Traceback <<<"$out" && fail "--check-config printed a traceback: $out"
echo "smoke: ok  --check-config with a bad environment: exit 1, both variables named"

# the wrong CPython minor (only when one is installed here)
want=$("${run_env[@]}" "$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
for other in python3.13 python3.12 python3.10 /root/.pyenv/versions/3.12*/bin/python3.12; do
    other=$(command -v "$other" 2>/dev/null) || continue
    have=$("$other" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    [ "$have" != "$want" ] || continue
    set +e
    out=$("${run_env[@]}" "$other" "$pyz" --version 2>&1)
    rc=$?
    set -e
    [ $rc -eq 1 ] && grep -q "built for CPython $want" <<<"$out" && ! grep -q Traceback <<<"$out" ||
        fail "wrong interpreter $other ($have): exit $rc: $out"
    echo "smoke: ok  Python $have refused with a clear message (exit 1)"
    break
done
echo "smoke: PASS $pyz ($(stat -c %s "$pyz") bytes)"
