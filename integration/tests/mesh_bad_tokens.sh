#!/usr/bin/env bash
# tiers: lab
# `warren up` with a reused single-use token, a forged token and an expired
# token: each refused with a one-line reason, nothing enrolled, nothing left
# running; a token whose server key was swapped gets its likely cause named in
# one line, and that is final too: the agent `warren up` started stops and no
# interface is left. A damaged token is called damaged or truncated, nothing
# more. The coordinator keeps serving the node that joined properly.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host x 203.0.113.30
lab_public_host y 203.0.113.31
SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
invite() { lab_exec srv "$WARREN" server invite --state-dir "$SRV_DIR" "$@"; }
up() { # NODE TOKEN
    lab_exec "$1" "$WARREN" up --join "$2" --name "$1" --state-dir "$LAB_DIR/$1" \
        --socket "$LAB_DIR/$1/warren.sock" --interface "$(lab_ifname "$1")"
}
expect_refused() { # DESC NODE TOKEN WANT
    local out
    if out=$(up "$2" "$3" 2>&1); then lab_fail "$1: warren up succeeded"; fi
    echo "$1: $out"
    [ "$(wc -l <<<"$out")" -eq 1 ] || lab_fail "$1: error is not one line"
    grep -qF "$4" <<<"$out" || lab_fail "$1: expected '$4'"
    if lab_exec "$2" ip link show "$(lab_ifname "$2")" >/dev/null 2>&1; then lab_fail "$1: interface left behind"; fi
    local left
    left=$(ip netns pids "$(lab_ns "$2")")
    [ -z "$left" ] || lab_fail "$1: still running in $2: $(for p in $left; do tr '\0' ' ' <"/proc/$p/cmdline"; echo; done)"
}

once=$(invite)
up x "$once"
expect_refused "reused token" y "$once" "invite was already used (it is single-use)"

# Same format, same server key and address, but a secret the coordinator never issued.
forged=$(python3 - "$once" <<'PY'
import base64, json, os, sys
body = sys.argv[1].removeprefix("warren1-")
t = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
t["s"] = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
print("warren1-" + base64.urlsafe_b64encode(json.dumps(t).encode()).rstrip(b"=").decode())
PY
)
expect_refused "forged token" y "$forged" "invite not recognised"
expect_refused "damaged token" y "${once:0:40}" "invalid join token"
out=$(up y "${once:0:40}" 2>&1) || true
[ "$out" = "warren: invalid join token: damaged or truncated" ] || lab_fail "damaged token: '$out'"

short=$(invite --expires 1s)
expires_at=$(($(date +%s) + 2))
lab_wait "the short token's lifetime to pass" 5 bash -c "[ \$(date +%s) -ge $expires_at ]"
expect_refused "expired token" y "$short" "invite expired"

# Right address and secret, another server's key: the coordinator cannot
# decrypt the handshake and hangs up. A node that is only joining gives up
# after a few such hang-ups, and `warren up` names the cause.
swapped=$(python3 - "$(invite)" "$(wg genkey | wg pubkey)" <<'PY'
import base64, json, sys
body = sys.argv[1].removeprefix("warren1-")
t = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
t["k"] = sys.argv[2]
print("warren1-" + base64.urlsafe_b64encode(json.dumps(t).encode()).rstrip(b"=").decode())
PY
)
expect_refused "swapped server key" y "$swapped" "the token's server key is wrong"
[ ! -e "$LAB_DIR/y/agent.json" ] || lab_fail "swapped server key: a state for the failed join was kept"

nodes=$(lab_exec srv "$WARREN" server nodes --json --state-dir "$SRV_DIR" | python3 -c 'import json,sys; print(" ".join(n["name"] for n in json.load(sys.stdin)))')
[ "$nodes" = "x" ] || lab_fail "enrolled nodes: '$nodes', expected only x"
lab_exec x "$WARREN" status --socket "$LAB_DIR/x/warren.sock" | grep -q "coordinator: connected" ||
    lab_fail "x lost the coordinator"
echo "mesh_bad_tokens: ok"
