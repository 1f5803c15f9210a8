#!/usr/bin/env bash
# tiers: lab
# The coordinator moves to a new address (stopped, started with the same state
# directory on another host): the node, restarted with a new token for the same
# mesh in its token file, takes the new address and is back online under its
# old name, key and mesh address, with no second node entry. The agent runs as
# systemd runs it, from a config file only (`warren agent --config FILE`).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd python3
lab_init

lab_internet
lab_public_host old 203.0.113.5
lab_public_host new 203.0.113.6
lab_public_host c 203.0.113.20
SRV_DIR=$LAB_DIR/srv
invite() { "$WARREN" server invite --state-dir "$SRV_DIR"; }
server_up() { lab_wait "coordinator admin socket" 30 "$WARREN" server nodes --state-dir "$SRV_DIR"; }

lab_bg old server-old.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
OLD_SERVER=$LAB_LAST_PID
server_up

SOCK=$LAB_DIR/c/warren.sock
CONF=$LAB_DIR/warren.toml
TOKEN_FILE=$LAB_DIR/join-token
(umask 077 && cat >"$CONF" <<TOML
[agent]
join_token_file = "$TOKEN_FILE"
name = "node-c"
state_dir = "$LAB_DIR/c"
socket = "$SOCK"
interface = "$(lab_ifname c)"
portmap = false
TOML
)
(umask 077 && invite >"$TOKEN_FILE")
OLD_TOKEN=$(cat "$TOKEN_FILE")
lab_on_cleanup "lab_exec c '$WARREN' down --socket '$SOCK'"

status() { lab_exec c "$WARREN" status --json --socket "$SOCK"; }
connected() { status | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["coordinator"] != "connected")'; }
identity() { status | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["name"], s["mesh_addr"], s["public_key"])'; }
nodes() {
    "$WARREN" server nodes --json --state-dir "$SRV_DIR" |
        python3 -c 'import json,sys; print(" ".join("%s=%s=%s" % (n["name"], n["public_key"], n["online"]) for n in json.load(sys.stdin)))'
}
agent() {
    lab_bg c "agent-$1.log" "$WARREN" agent --config "$CONF"
    AGENT=$LAB_LAST_PID
}
stop() {
    kill -TERM "$1"
    lab_wait "process $1 stopped" 15 bash -c "! kill -0 $1 2>/dev/null"
}

agent 1
lab_wait "node-c connected to 203.0.113.5" 30 connected
before=$(identity)
echo "before the move: $before"
stop "$AGENT"
stop "$OLD_SERVER"

# The same coordinator (state directory, key, database) on another host.
lab_bg new server-new.log "$WARREN" server --listen 203.0.113.6:7777 --state-dir "$SRV_DIR"
server_up
(umask 077 && invite >"$TOKEN_FILE")
agent 2
lab_wait "node-c connected to 203.0.113.6" 30 connected
after=$(identity)
echo "after the move: $after"
[ "$after" = "$before" ] || lab_fail "node-c changed: '$before' before, '$after' after the move"
grep -q "coordinator address changed from 203.0.113.5:7777 to 203.0.113.6:7777" "$LAB_DIR/agent-2.log" ||
    lab_fail "the agent did not log the new coordinator address"
key=${before##* }
nodes_are() { [ "$(nodes)" = "$1" ]; }
lab_wait "node-c alone and online in the coordinator's node list" 10 nodes_are "node-c=$key=True"
echo "nodes: $(nodes)"
# Restarted again with the same token: nothing changes, nothing is logged.
stop "$AGENT"
agent 3
lab_wait "node-c connected again" 30 connected
! grep -q "coordinator address changed" "$LAB_DIR/agent-3.log" || lab_fail "the address changed again"
# The token file put back to the first token (as after `warren up --join NEW`
# with a file nobody edited): a token followed before moves nothing, so the
# node stays with the coordinator's new address instead of the dead old one.
stop "$AGENT"
(umask 077 && printf '%s\n' "$OLD_TOKEN" >"$TOKEN_FILE")
agent 4
lab_wait "node-c connected to 203.0.113.6 with the first token in its file" 30 connected
! grep -q "coordinator address changed" "$LAB_DIR/agent-4.log" || lab_fail "the first token moved the node back"

# `warren up` reads the same [agent] section (interface, socket, state_dir)
# and hands the agent it starts the file and its --log-level: at warn, the
# agent's log has no info line.
stop "$AGENT"
out=$(lab_exec c "$WARREN" up --config "$CONF" --log-level warn 2>&1) || lab_fail "warren up --config failed: $out"
grep -q "warren is up: node-c" <<<"$out" || lab_fail "unexpected warren up output: $out"
[ "$(identity)" = "$before" ] || lab_fail "node-c changed under warren up: $(identity)"
info=$(grep -Ev '^[0-9T:.Z-]+ (WARN|ERROR) ' "$LAB_DIR/c/agent.log" || true)
[ -z "$info" ] || lab_fail "info lines at --log-level warn: $info"
echo "coord_moved: ok"
