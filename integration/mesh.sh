# shellcheck shell=bash disable=SC2034,SC2154
# (SRV_PID, PID and token are shared with the test that sources this.)
# A coordinator at 203.0.113.5 and agents in lab namespaces, for tests that
# need a plain mesh: source after lab.sh and lab_init. The caller declares
# `IF` (namespace → interface name) and `PID`; agents join with `$token`.

SRV_DIR=$LAB_DIR/srv
# Starts (or restarts, with the same state) the coordinator; its PID is SRV_PID.
start_server() {
    lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR" "$@"
    SRV_PID=$LAB_LAST_PID
    lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
}
server() { lab_exec srv "$WARREN" server "$@" --state-dir "$SRV_DIR"; }
reusable_token() { server invite --reusable --expires 1h; }

sock() { echo "$LAB_DIR/$1/warren.sock"; }
# start_agent NS [FLAG...]: an agent named node-NS on IF[NS]; its PID is PID[NS].
start_agent() {
    local n=$1
    shift
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n" "$@"
    PID[$n]=$LAB_LAST_PID
}
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
peer_count() { st "$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))'; }
has_peers() { [ "$(peer_count "$1")" = "$2" ]; }
connected() { st "$1" | grep -q '"coordinator": "connected"'; }
addr_of() { st "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"])'; }
pubkey_of() { st "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])'; }

# seen_server NS ADDR PORT: answers each TCP connection with "seen SOURCE",
# the address it sees (what masquerading and exit nodes are judged by).
seen_server() {
    lab_bg "$1" "seen-$1.log" python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
while True:
    c, a = s.accept(); c.sendall(("seen " + a[0] + "\n").encode()); c.close()
' "$2" "$3"
}
