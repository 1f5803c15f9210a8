#!/usr/bin/env bash
# tiers: lab
# What a local user and a service manager see of a running agent (userspace
# backend): no warren process carries the join token on its command line
# (`warren up --join TOKEN`, `warren agent --join-file FILE`), and once joined
# the token is nowhere in the state directory; a user who is not root gets
# one clear "permission denied" from the root-only socket, whether its mode or
# the agent's uid check stops them; SIGTERM stops the agent cleanly: its
# wireguard-go is gone with the interface, its UAPI socket, lock file and log,
# and five start/stop rounds leave no file behind.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd setpriv python3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.20
lab_public_host b 203.0.113.21
SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --expires 1h --state-dir "$SRV_DIR")

# What must appear in no command line and no file: the token and its secret.
secret=$(python3 - "$token" <<'PY'
import base64, json, sys
body = sys.argv[1].removeprefix("warren1-")
print(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["s"])
PY
)
printf '%s\n%s\n' "$token" "$secret" >"$LAB_DIR/patterns"
# Read from a file, so the scan's own command line holds no secret.
holders() {
    python3 - "$LAB_DIR/patterns" <<'PY'
import os, sys
pats = [p.encode() for p in open(sys.argv[1]).read().split()]
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if any(p in cmd for p in pats):
        print(pid, cmd.replace(b"\0", b" ")[:60].decode(errors="replace"))
PY
}
no_token_anywhere() { # WHEN STATE_DIR
    local found
    found=$(holders)
    [ -z "$found" ] || lab_fail "$1: the token is on a command line: $found"
    found=$(grep -rlF -f "$LAB_DIR/patterns" "$2" || true)
    [ -z "$found" ] || lab_fail "$1: the token is in $found"
}
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
connected() { st "$1" | grep -q '"coordinator": "connected"'; }
IFA=$(lab_ifname a)
IFB=$(lab_ifname b)

# 1a. `warren up --join TOKEN`: the agent it starts gets the token through a pipe.
lab_exec a "$WARREN" up --join "$token" --name a --state-dir "$LAB_DIR/a" --socket "$(sock a)" \
    --interface "$IFA" --backend userspace
lab_on_cleanup "lab_exec a '$WARREN' down --socket '$(sock a)'"
agents_in() { # NODE: pids of warren processes in its namespace
    local p
    for p in $(ip netns pids "$(lab_ns "$1")"); do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" = warren ] && echo "$p"
    done
    return 0
}
agent_a=$(agents_in a)
[ -n "$agent_a" ] || lab_fail "no agent running in a after warren up"
echo "a's agent: $(tr '\0' ' ' </proc/"$agent_a"/cmdline)"
no_token_anywhere "after warren up --join" "$LAB_DIR/a"

# 1b. `warren agent --join-file FILE` (the systemd unit's form), the file 0600.
(umask 077 && printf '%s\n' "$token" >"$LAB_DIR/b-token")
start_b() {
    lab_bg b "agent-b.log" "$WARREN" agent --state-dir "$LAB_DIR/b" --interface "$IFB" --socket "$(sock b)" \
        --port 51820 --backend userspace --name b --join-file "$LAB_DIR/b-token"
    PID_B=$LAB_LAST_PID
}
start_b
lab_wait "b joined" 20 connected b
no_token_anywhere "while warren agent --join-file runs" "$LAB_DIR/b"
# Joined: the token is not needed again. The unit's file may go; the agent starts without it.
rm "$LAB_DIR/b-token"
grep -q "readable by other users" "$LAB_DIR/agent-b.log" && lab_fail "a 0600 token file was called readable"

# 2. Not root: the socket's mode refuses (EACCES), and so does the agent's own uid check.
cp "$WARREN" "$LAB_DIR/warren-bin"
chmod 0755 "$LAB_DIR/warren-bin"
chmod 0711 "$LAB_DIR" "$LAB_DIR/a"
as_nobody() { lab_exec a setpriv --reuid=65534 --regid=65534 --clear-groups "$LAB_DIR/warren-bin" "$@"; }
want="warren: permission denied: this needs root (the agent's socket is root-only)"
for how in "socket mode 0600" "socket mode 0666, agent checks the uid"; do
    [ "$how" = "socket mode 0600" ] || chmod 0666 "$(sock a)"
    if out=$(as_nobody status --socket "$(sock a)" 2>&1); then lab_fail "$how: status as nobody succeeded"; fi
    echo "$how: $out"
    [ "$out" = "$want" ] || lab_fail "$how: expected '$want'"
done
chmod 0600 "$(sock a)"
chmod 0700 "$LAB_DIR" "$LAB_DIR/a"
connected a || lab_fail "a's agent stopped answering root"

# 5. SIGTERM: nothing of the agent's is left.
wg_go_of() { # IFNAME: pids of wireguard-go serving it, anywhere
    local p
    for p in $(pgrep -x wireguard-go || true); do
        tr '\0' '\n' 2>/dev/null <"/proc/$p/cmdline" | grep -qx "$1" && echo "$p"
    done
    return 0
}
leftovers() { # IFNAME: files an agent for it may leave
    ls -d /run/warren/"$1".lock /var/log/warren/"$1"-userspace.log /var/run/wireguard/"$1".sock 2>/dev/null || true
}
stop_b() { # WHEN
    local wg_pid status=0
    wg_pid=$(wg_go_of "$IFB")
    [ -n "$wg_pid" ] || lab_fail "$1: no wireguard-go for $IFB while b runs"
    [ -e "/run/warren/$IFB.lock" ] || lab_fail "$1: no lock file while b runs (is the test looking in the right place?)"
    kill -TERM "$PID_B"
    wait "$PID_B" || status=$?
    [ "$status" -eq 0 ] || lab_fail "$1: agent exited with $status on SIGTERM"
    if kill -0 "$wg_pid" 2>/dev/null; then lab_fail "$1: wireguard-go $wg_pid still runs after the agent stopped"; fi
    [ -z "$(wg_go_of "$IFB")" ] || lab_fail "$1: a wireguard-go for $IFB still runs"
    if lab_exec b ip link show "$IFB" >/dev/null 2>&1; then lab_fail "$1: interface $IFB left behind"; fi
    [ -z "$(leftovers "$IFB")" ] || lab_fail "$1: left behind: $(leftovers "$IFB")"
    [ ! -e "$(sock b)" ] || lab_fail "$1: control socket left behind"
    ip netns pids "$(lab_ns b)" | grep -q . && lab_fail "$1: processes left in b: $(ip netns pids "$(lab_ns b)")"
    return 0
}
stop_b "first stop"
grep -q "stopping on SIGTERM" "$LAB_DIR/agent-b.log" || lab_fail "the agent did not say why it stopped"
for round in 1 2 3 4 5; do
    start_b
    lab_wait "b back from its cache (round $round)" 20 connected b
    stop_b "round $round"
done
grep -q "already manages interface" "$LAB_DIR/agent-b.log" && lab_fail "a restart found the old lock held"
echo "agent_lifecycle: ok"
