#!/usr/bin/env bash
# tiers: lab
# A broken log pipe ends nothing: the coordinator and two agents run with
# stderr piped into a reader that exits after its first 64 bytes (a logger
# that died). Every later log line hits a closed pipe. Then the agents join,
# garbage connections make the coordinator log, a node is renamed and the
# mesh pings: every process is still alive, the ping goes through, and
# `warren status` answers on both nodes and counts the lines it dropped.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.21
lab_public_host b 203.0.113.22

# CMD with stderr into a reader that quits after 64 bytes; the shell execs
# CMD, so the recorded PID is CMD's.
broken_log() {
    local node=$1
    shift
    lab_bg "$node" "stdout-$node.log" bash -c 'exec 2> >(head -c 64 >/dev/null); exec "$@"' _ "$@"
}
SRV_DIR=$LAB_DIR/srv
broken_log srv "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
SRV_PID=$LAB_LAST_PID
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A PID=() ADDR=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
for n in a b; do
    broken_log "$n" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "$(lab_ifname "$n")" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n"
    PID[$n]=$LAB_LAST_PID
done
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
joined() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == 1 and s["mesh_addr"] else 1)'; }
for n in a b; do lab_wait "$n joined with one peer" 30 joined "$n"; done
ADDR[b]=$(st b | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"])')

# Garbage to the coordinator: each failed connection is something it logs (or counts).
for i in $(seq 1 20); do
    lab_exec a python3 -c "
import socket
s = socket.create_connection(('203.0.113.5', 7777), timeout=2)
s.sendall(b'garbage $i ' * 100)
s.close()" || true
done
lab_exec srv "$WARREN" server rename node-b node-bee --state-dir "$SRV_DIR" >/dev/null
lab_wait "a pings b over the mesh" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
renamed() { st a | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["peers"][0]["name"] == "node-bee" else 1)'; }
lab_wait "the rename reached a" 30 renamed

for p in "$SRV_PID" "${PID[a]}" "${PID[b]}"; do
    kill -0 "$p" 2>/dev/null || lab_fail "process $p died with its log pipe broken: $(cat "$LAB_DIR"/stdout-*.log)"
done
for n in a b; do
    dropped=$(st "$n" | python3 -c 'import json,sys; print(json.load(sys.stdin)["log_lines_dropped"])') ||
        lab_fail "$n's agent does not answer status"
    # Its lines since the reader quit were dropped and counted, not written.
    [ "$dropped" -gt 0 ] || lab_fail "$n's agent counts no dropped log lines"
done
echo "coordinator and agents kept serving with their log pipes broken"
