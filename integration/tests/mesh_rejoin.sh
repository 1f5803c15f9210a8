#!/usr/bin/env bash
# tiers: lab
# A node removed from the mesh while its agent was down: `warren up --join
# NEWTOKEN` on its old state works the first time (the coordinator refuses the
# old identity, the agent enrolls with the new token at once), under the same
# name, with a new key; without a new token the old state is refused as removed.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd python3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host c 203.0.113.20
SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
invite() { lab_exec srv "$WARREN" server invite --state-dir "$SRV_DIR" "$@"; }
IFC=$(lab_ifname c)
SOCK=$LAB_DIR/c/warren.sock
up() { lab_exec c "$WARREN" up --name node-c --state-dir "$LAB_DIR/c" --socket "$SOCK" --interface "$IFC" "$@"; }
key() { lab_exec c "$WARREN" status --json --socket "$SOCK" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])'; }
agent_pid() {
    local p
    for p in $(ip netns pids "$(lab_ns c)"); do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" = warren ] && echo "$p"
    done
    return 0
}
stop_agent() {
    local pid
    pid=$(agent_pid)
    [ -n "$pid" ] || lab_fail "no agent running in c"
    kill -TERM "$pid"
    lab_wait "c's agent stopped" 10 bash -c "! kill -0 $pid 2>/dev/null"
}
lab_on_cleanup "lab_exec c '$WARREN' down --socket '$SOCK'"

up --join "$(invite)"
stop_agent
lab_exec srv "$WARREN" server remove node-c --state-dir "$SRV_DIR" >/dev/null

# The old state alone: the coordinator's answer is final, said in one line.
if out=$(up 2>&1); then lab_fail "warren up on a removed node's state succeeded"; fi
echo "without a token: $out"
grep -q "removed from the mesh" <<<"$out" || lab_fail "expected 'removed from the mesh'"

# Removed again with its state restored, as if the first refusal never happened.
up --join "$(invite)"
old_key=$(key)
stop_agent
lab_exec srv "$WARREN" server remove node-c --state-dir "$SRV_DIR" >/dev/null
out=$(up --join "$(invite)" 2>&1) || lab_fail "warren up --join NEWTOKEN on the removed node's state failed: $out"
echo "with a new token: $out"
grep -q "warren is up: node-c" <<<"$out" || lab_fail "expected 'warren is up: node-c'"
new_key=$(key)
[ "$new_key" != "$old_key" ] || lab_fail "the node kept its removed key"
grep -q "joining again with the token given" "$LAB_DIR/c/agent.log" || lab_fail "the agent did not say it joins again"
nodes=$(lab_exec srv "$WARREN" server nodes --json --state-dir "$SRV_DIR" | python3 -c 'import json,sys; print(" ".join(n["name"] + "=" + n["public_key"] for n in json.load(sys.stdin)))')
[ "$nodes" = "node-c=$new_key" ] || lab_fail "coordinator's nodes: '$nodes', expected node-c with the new key"
echo "mesh_rejoin: ok"
