#!/usr/bin/env bash
# tiers: lab kernel
# Two relays: the one inside `warren server` and a separate `warren relay`
# published with --relay. Four nodes, each behind its own router that drops
# all UDP, so only the relays carry data. The coordinator spreads home relays
# by node id (embedded relay first), so with ids 1..4 two nodes live on each;
# the test reads the assignment from `warren status` rather than assuming it.
# - every pair pings both ways; homes differ; a peer homed on the other relay
#   is reached through that relay (status names it);
# - the separate relay stops: nodes homed there are cut off, the nodes homed
#   on the embedded relay still reach each other;
# - it restarts with the same key: every pair pings again, agents untouched.
set -euo pipefail
# shellcheck source=integration/lab.sh
. "$(dirname "$0")/../lab.sh"
lab_require_cmd python3
lab_init

NODES=(a b c d)
EMBEDDED=203.0.113.5:7778
SEPARATE=203.0.113.7:7778

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host relay 203.0.113.7
i=40
for n in "${NODES[@]}"; do
    i=$((i + 1))
    lab_router "r$n" udpblock "198.51.100.$i" "10.$i.0.1/24"
    lab_lan_host "$n" "r$n" "10.$i.0.2"
done

RELAY_DIR=$LAB_DIR/relay
SEP_KEY=$("$WARREN" relay --state-dir "$RELAY_DIR" --show-key)
start_relay() {
    lab_bg relay relay.log "$WARREN" relay --listen "$SEPARATE" --state-dir "$RELAY_DIR"
    RELAY_PID=$LAB_LAST_PID
    lab_wait "separate relay listening on $SEPARATE" 10 \
        bash -c "ip netns exec $(lab_ns relay) ss -Hltn | grep -q '$SEPARATE'"
}
start_relay

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR" --no-wgstun \
    --relay "$SEP_KEY@$SEPARATE"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A WGIF=() ADDR=() HOME_OF=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
has_addr() { st "$1" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["mesh_addr"] else 1)'; }
# One at a time, so the join order (and so the node ids) is a, b, c, d.
for n in "${NODES[@]}"; do
    WGIF[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${WGIF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n"
    lab_wait "$n joined" 60 has_addr "$n"
done
all_peers() { st "$1" | python3 -c 'import json,sys; sys.exit(0 if len(json.load(sys.stdin)["peers"]) == 3 else 1)'; }
for n in "${NODES[@]}"; do lab_wait "$n sees three peers" 20 all_peers "$n"; done
for n in "${NODES[@]}"; do ADDR[$n]=$(st "$n" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"])'); done

# The address of NODE's home relay, once it is connected.
home_relay() {
    st "$1" | python3 -c '
import json, sys
home = [r for r in json.load(sys.stdin)["relays"] if r["home"]]
if len(home) != 1 or home[0]["state"] != "connected":
    sys.exit(1)
print(home[0]["addr"])'
}
for n in "${NODES[@]}"; do
    lab_wait "$n connected to its home relay" 20 home_relay "$n"
    HOME_OF[$n]=$(home_relay "$n")
    case "${HOME_OF[$n]}" in
    "$EMBEDDED" | "$SEPARATE") ;;
    *) lab_fail "$n's home relay is ${HOME_OF[$n]}, neither $EMBEDDED nor $SEPARATE" ;;
    esac
    echo "node-$n (${ADDR[$n]}): home relay ${HOME_OF[$n]}"
done
ON_EMBEDDED=() ON_SEPARATE=()
for n in "${NODES[@]}"; do
    if [ "${HOME_OF[$n]}" = "$EMBEDDED" ]; then ON_EMBEDDED+=("$n"); else ON_SEPARATE+=("$n"); fi
done
if [ "${#ON_SEPARATE[@]}" -eq 0 ] || [ "${#ON_EMBEDDED[@]}" -eq 0 ]; then
    lab_fail "every node has the same home relay (${HOME_OF[a]}): homes are not spread"
fi
[ "${#ON_EMBEDDED[@]}" -ge 2 ] ||
    lab_fail "fewer than two nodes homed on the embedded relay (${ON_EMBEDDED[*]}): the relay-down half needs a pair"

every_pair_pings() {
    local what=$1 timeout=$2 x y
    for x in "${NODES[@]}"; do
        for y in "${NODES[@]}"; do
            [ "$x" = "$y" ] && continue
            lab_wait "$x pings $y $what" "$timeout" lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"
        done
    done
}
every_pair_pings "over the relays" 30

# a reaches each peer through that peer's home relay, and says so.
relay_for_peer_is() {
    st a | python3 -c '
import json, sys
addr, want = sys.argv[1], sys.argv[2]
p = [p for p in json.load(sys.stdin)["peers"] if p["mesh_addr"] == addr][0]
sys.exit(0 if p["path"] == "relay" and p["relay"] == want else 1)' "$1" "$2"
}
other=
for n in b c d; do
    if [ "${HOME_OF[$n]}" != "${HOME_OF[a]}" ]; then other=$n; fi
    lab_wait "a shows node-$n on the relay path through ${HOME_OF[$n]}" 20 relay_for_peer_is "${ADDR[$n]}" "${HOME_OF[$n]}"
done
[ -n "$other" ] || lab_fail "no peer of a has a home relay other than a's own"
lab_exec a "$WARREN" status --socket "$(sock a)"

# The separate relay stops. Nobody can deliver to the nodes homed there, but
# the nodes homed on the embedded relay keep reaching each other.
kill "$RELAY_PID"
lab_wait "separate relay stopped" 10 bash -c "! kill -0 $RELAY_PID 2>/dev/null"
relay_gone() {
    st "$1" | python3 -c '
import json, sys
sep = sys.argv[1]
sys.exit(0 if all(r["state"] != "connected" for r in json.load(sys.stdin)["relays"] if r["addr"] == sep) else 1)' "$SEPARATE"
}
for n in "${NODES[@]}"; do lab_wait "$n notices the separate relay is gone" 30 relay_gone "$n"; done
for x in "${ON_EMBEDDED[@]}"; do
    for y in "${ON_EMBEDDED[@]}"; do
        [ "$x" = "$y" ] && continue
        lab_wait "$x pings $y (both homed on the embedded relay) while the separate relay is down" 30 \
            lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"
    done
done
# ...and the others are really cut off (only the relays carry data here).
x=${ON_EMBEDDED[0]} y=${ON_SEPARATE[0]}
if lab_exec "$x" ping -c2 -W1 "${ADDR[$y]}" >/dev/null 2>&1; then
    lab_fail "$x still reaches $y (homed on the stopped relay): some other path carries data"
fi

# Back with the same key: the agents reconnect by themselves.
start_relay
for n in "${NODES[@]}"; do lab_wait "$n reconnected to its home relay" 60 home_relay "$n"; done
every_pair_pings "after the separate relay restarted" 60
lab_wait "a shows node-$other through ${HOME_OF[$other]} again" 30 relay_for_peer_is "${ADDR[$other]}" "${HOME_OF[$other]}"
echo "mesh_two_relays: ok"
