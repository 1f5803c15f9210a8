#!/usr/bin/env bash
# tiers: lab
# A separate `warren relay --coordinator KEY@HOST:PORT` learns the mesh's
# members from the coordinator and refuses everyone else. The coordinator
# runs no relay of its own (--no-relay) and publishes only that one, and
# three nodes sit behind routers that drop all UDP, so that relay carries all
# their traffic.
# - node-c is removed with the admin command: its relay connection is closed
#   and a new registration with its key is refused (so is a key that never
#   was a member), while a and b keep pinging through the relay;
# - the coordinator goes down: the relay keeps its last set, a and b keep
#   pinging, c's key stays refused;
# - the relay restarts while the coordinator is still down: it starts from
#   the set it persisted (mode 0600), a and b ping through it again, c's key
#   is still refused;
# - the coordinator comes back: the relay subscribes again.
set -euo pipefail
# shellcheck source=integration/lab.sh
. "$(dirname "$0")/../lab.sh"
lab_require_cmd python3 wg
lab_init

NODES=(a b c)
COORD=203.0.113.5:7777
RELAY=203.0.113.7:7778

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host relay 203.0.113.7
i=60
for n in "${NODES[@]}"; do
    i=$((i + 1))
    lab_router "r$n" udpblock "198.51.100.$i" "10.$i.0.1/24"
    lab_lan_host "$n" "r$n" "10.$i.0.2"
done

# The coordinator's key is chosen here, so the relay can be told it before either starts.
SRV_DIR=$LAB_DIR/srv
mkdir -m 700 "$SRV_DIR"
(umask 077 && wg genkey >"$SRV_DIR/server.key")
SRV_KEY=$(wg pubkey <"$SRV_DIR/server.key")
RELAY_DIR=$LAB_DIR/relay
RELAY_KEY=$("$WARREN" relay --state-dir "$RELAY_DIR" --show-key)

RELAY_LOG=relay-1.log
RELAY_RUNS=0
start_relay() {
    RELAY_RUNS=$((RELAY_RUNS + 1))
    RELAY_LOG=relay-$RELAY_RUNS.log
    lab_bg relay "$RELAY_LOG" "$WARREN" relay --listen "$RELAY" --state-dir "$RELAY_DIR" \
        --coordinator "$SRV_KEY@$COORD"
    RELAY_PID=$LAB_LAST_PID
    lab_wait "relay listening on $RELAY" 10 bash -c "ip netns exec $(lab_ns relay) ss -Hltn | grep -q '$RELAY'"
}
relay_log_has() { grep -Eq -- "$1" "$LAB_DIR/$RELAY_LOG"; }

start_coordinator() {
    lab_bg srv "server-$1.log" "$WARREN" server --listen "$COORD" --state-dir "$SRV_DIR" --no-wgstun \
        --no-relay --relay "$RELAY_KEY@$RELAY"
    SRV_PID=$LAB_LAST_PID
    lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
}

# The relay first, while its coordinator is not up yet: it serves as before
# and says so, and keeps trying.
start_relay
lab_wait "the relay to say it serves every key until the coordinator answers" 10 \
    relay_log_has "until it answers, every key is served"
start_coordinator 1
lab_wait "the relay to subscribe (an empty mesh)" 40 relay_log_has "member keys from coordinator .*: 0 members"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A WGIF=() ADDR=() KEY=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
field() { st "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]] or "")' "$2"; }
has_addr() { [ -n "$(field "$1" mesh_addr)" ]; }
for n in "${NODES[@]}"; do
    WGIF[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${WGIF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n"
    lab_wait "$n joined" 60 has_addr "$n"
    ADDR[$n]=$(field "$n" mesh_addr)
    KEY[$n]=$(field "$n" public_key)
done
relay_connected() {
    st "$1" | python3 -c '
import json, sys
sys.exit(0 if any(r["state"] == "connected" for r in json.load(sys.stdin)["relays"]) else 1)'
}
for n in "${NODES[@]}"; do lab_wait "$n connected to the relay" 30 relay_connected "$n"; done

pings() {
    local what=$1 timeout=$2 x y
    shift 2
    for x in "$@"; do
        for y in "$@"; do
            [ "$x" = "$y" ] && continue
            lab_wait "$x pings $y $what" "$timeout" lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"
        done
    done
}
pings "through the relay" 30 a b c

# c's private key, to register with it at the relay after its removal (the
# agent's state file holds it; the copy stays in the lab's scratch dir).
(umask 077 && python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["private_key"])' \
    "$LAB_DIR/c/agent.json" >"$LAB_DIR/c.key")
STRANGER=$LAB_DIR/stranger.key
(umask 077 && wg genkey >"$STRANGER")
RELAY_PUB=$RELAY_KEY

# Registers at the relay with the key in FILE and holds on for 15 s; true if
# the relay closes the connection (refused), false if it kept it.
refused_at_relay() {
    local out
    out=$(lab_exec "$1" timeout 30 "$WARREN" relay-load echo --relay "$RELAY" --key "$RELAY_PUB" \
        --key-file "$2" --seconds 15 2>&1) && return 1
    [[ "$out" == *"relay closed the connection"* ]]
}

C_SHORT=${KEY[c]:0:8}
removed_at=$(date +%s%N)
lab_exec srv "$WARREN" server remove node-c --state-dir "$SRV_DIR"
# Fixed strings: a base64 key may hold regex characters (+, /).
closed_removed() { grep -F -- "$C_SHORT from " "$LAB_DIR/$RELAY_LOG" | grep -qF "closed: key removed from the mesh"; }
lab_wait "the relay to close node-c's connection" 20 closed_removed
echo "removal to relay connection closed: $((($(date +%s%N) - removed_at) / 1000000)) ms (polled every 0.1 s)"
refused_at_relay c "$LAB_DIR/c.key" || lab_fail "the relay still registers node-c's key after its removal"
refused_at_relay a "$STRANGER" || lab_fail "the relay registers a key that was never a member"
pings "after node-c was removed" 30 a b
if lab_exec a ping -c2 -W1 "${ADDR[c]}" >/dev/null 2>&1; then
    lab_fail "a still reaches the removed node-c"
fi
lab_wait "the relay to persist the set" 10 test -f "$RELAY_DIR/relay-members"
mode=$(stat -c %a "$RELAY_DIR/relay-members")
[ "$mode" = 600 ] || lab_fail "relay-members is mode $mode, not 600"
grep -qx -- "${KEY[a]}" "$RELAY_DIR/relay-members" || lab_fail "relay-members lacks node-a"
! grep -qx -- "${KEY[c]}" "$RELAY_DIR/relay-members" || lab_fail "relay-members still lists node-c"

# The coordinator goes down: the relay keeps the set it has.
lab_stop "$SRV_PID"
lab_wait "the relay to notice its coordinator is gone" 60 relay_log_has "keeping the last member set"
pings "with the coordinator down" 30 a b
refused_at_relay c "$LAB_DIR/c.key" || lab_fail "with the coordinator down, the relay registers node-c's key"

# The relay restarts while the coordinator is still down: the persisted set holds.
lab_stop "$RELAY_PID"
start_relay
lab_wait "the restarted relay to start from its persisted set" 10 \
    relay_log_has "until it answers, the 2 members in relay-members"
for n in a b; do lab_wait "$n reconnected to the restarted relay" 60 relay_connected "$n"; done
pings "through the restarted relay, coordinator down" 60 a b
refused_at_relay c "$LAB_DIR/c.key" || lab_fail "the restarted relay registers node-c's key"
refused_at_relay a "$STRANGER" || lab_fail "the restarted relay registers a key that was never a member"

# The coordinator is back: the relay subscribes again by itself (backoff with jitter, at most 30 s).
start_coordinator 2
lab_wait "the relay to subscribe again" 60 relay_log_has "member keys from coordinator .*: 2 members"
pings "with everything back" 30 a b
echo "relay_members: ok"
