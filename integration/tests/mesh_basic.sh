#!/usr/bin/env bash
# tiers: lab kernel
# A coordinator and three nodes (two on one NATed LAN, one on a public
# address): everyone pings everyone over mesh addresses and `wg show` matches
# the peer map; rename and removal propagate; traffic survives the
# coordinator going down, nodes reconnect when it returns with the same names
# and addresses; an agent restarted while the coordinator is down restores the
# mesh from its cache; garbage to the coordinator port and a second agent on
# the same state directory change nothing.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host c 203.0.113.20
lab_router r1 cone 198.51.100.10 10.1.0.1/24
lab_lan_host a r1 10.1.0.2
lab_lan_host b r1 10.1.0.3

SRV_DIR=$LAB_DIR/srv
start_server() {
    lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
    SRV_PID=$LAB_LAST_PID
    lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
}
start_server
token=$(lab_exec srv "$WARREN" server invite --reusable --expires 1h --state-dir "$SRV_DIR")

declare -A IF=() PID=() ADDR=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
start_agent() {
    local n=$1
    shift
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port 51820 "$@"
    PID[$n]=$LAB_LAST_PID
}
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
peer_count() { st "$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))'; }
has_peers() { [ "$(peer_count "$1")" = "$2" ]; }
connected() { st "$1" | grep -q '"coordinator": "connected"'; }
addr_of() { st "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"])'; }

for n in a b c; do
    IF[$n]=$(lab_ifname "$n")
    start_agent "$n" --join "$token" --name "node-$n"
done
for n in a b c; do
    lab_wait "$n joined with two peers" 20 has_peers "$n" 2
    ADDR[$n]=$(addr_of "$n")
done
echo "mesh addresses: a=${ADDR[a]} b=${ADDR[b]} c=${ADDR[c]}"

ping_all() {
    local x y
    for x in a b c; do
        for y in a b c; do
            [ "$x" = "$y" ] && continue
            lab_wait "$x pinging $y (${ADDR[$y]}) over the mesh" 30 lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"
        done
    done
}
ping_all

# wg show on each node lists exactly the other two nodes, each with its mesh /32.
for x in a b c; do
    # The WG-STUN server (100.64.0.4/32) is a peer too: it tells the agent its public mapping.
    got=$(lab_exec "$x" wg show "${IF[$x]}" allowed-ips | awk '$2 != "100.64.0.4/32" {print $2}' | sort | tr '\n' ' ')
    want=$(for y in a b c; do if [ "$x" != "$y" ]; then echo "${ADDR[$y]}/32"; fi; done | sort | tr '\n' ' ')
    [ "$got" = "$want" ] || lab_fail "$x: wg show allowed-ips '$got', peer map says '$want'"
done
# The two LAN nodes go direct by their LAN addresses (the real `wg show`
# endpoint, not warren's word; a relayed peer's is a loopback socket), and
# c (public) is reached directly too.
pubkey_of() { st "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])'; }
wg_ep() { lab_exec "$1" wg show "${IF[$1]}" endpoints | awk -v k="$(pubkey_of "$2")" '$1 == k { print $2 }'; }
ep_is() { [[ "$(wg_ep "$1" "$2")" == $3 ]]; }
lab_wait "a direct to b on the LAN" 30 ep_is a b "10.1.0.3:*"
lab_wait "b direct to a on the LAN" 30 ep_is b a "10.1.0.2:*"
lab_wait "a direct to c" 30 ep_is a c "203.0.113.20:*"
lab_wait "c direct to a through the NAT" 30 ep_is c a "198.51.100.10:*"
lab_exec a "$WARREN" status --socket "$(sock a)"

# A second agent on the same state directory refuses to start.
if out=$(lab_exec a "$WARREN" agent --state-dir "$LAB_DIR/a" --interface "${IF[a]}" --socket "$LAB_DIR/x.sock" 2>&1); then
    lab_fail "a second agent on a's state directory started"
fi
echo "second agent: $out"
grep -q "another warren agent is already running" <<<"$out" || lab_fail "unclear error: $out"
if out=$(lab_exec a "$WARREN" agent --state-dir "$LAB_DIR/a2" --interface "${IF[a]}" --socket "$LAB_DIR/x.sock" --join "$token" 2>&1); then
    lab_fail "a second agent on a's interface started"
fi
echo "second agent: $out"
grep -q "already manages interface ${IF[a]}" <<<"$out" || lab_fail "unclear error: $out"
connected a || lab_fail "a's agent suffered from the second agent"

# Garbage to the coordinator port closes only that connection.
lab_exec c bash -c 'exec 3<>/dev/tcp/203.0.113.5/7777; printf "GET / HTTP/1.1\r\n\r\n" >&3; timeout 5 cat <&3 >/dev/null' || true
lab_exec c bash -c 'exec 3<>/dev/tcp/203.0.113.5/7777; printf "\xff\xff\xff\xff\x01\x02" >&3; timeout 5 cat <&3 >/dev/null' || true
for n in a b c; do connected "$n" || lab_fail "$n lost the coordinator after garbage on its port"; done

# A new local address (netlink event) is a candidate c keeps from the coordinator: candidates
# travel sealed between agents, so the server neither stores nor shows nor publishes it.
lab_exec c ip addr add 203.0.113.21/24 dev eth0
sleep 2
lab_exec srv "$WARREN" server nodes --json --state-dir "$SRV_DIR" | grep -q '203\.0\.113\.21' &&
    lab_fail "the coordinator knows c's new address"

# Rename propagates to the other nodes.
lab_exec srv "$WARREN" server rename node-b backup --state-dir "$SRV_DIR" >/dev/null
a_sees_backup() { st a | grep -q '"name": "backup"'; }
lab_wait "a sees node-b renamed to backup" 5 a_sees_backup

# Key rotation: b keeps its name and address; a switches to b's new key and still reaches it.
key_of() { st "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])'; }
b_old=$(key_of b)
lab_exec b "$WARREN" rotate-key --socket "$(sock b)"
b_new=$(key_of b)
[ "$b_old" != "$b_new" ] || lab_fail "rotate-key did not change b's key"
[ "$(addr_of b)" = "${ADDR[b]}" ] || lab_fail "b's address changed with its key"
a_has_new_b() { lab_exec a wg show "${IF[a]}" peers | grep -qF "$b_new" && ! lab_exec a wg show "${IF[a]}" peers | grep -qF "$b_old"; }
lab_wait "a's WireGuard switches to b's new key" 5 a_has_new_b
lab_wait "a -> b with b's new key" 20 lab_exec a ping -c1 -W1 "${ADDR[b]}"
# The rotated key is a new WireGuard peer; its path goes direct again by itself.
lab_wait "a direct to b again under b's new key" 30 ep_is a b "10.1.0.3:*"
lab_wait "b direct to a again under its new key" 30 ep_is b a "10.1.0.2:*"

# Coordinator down: traffic continues; back up: nodes reconnect, same names and addresses.
nodes_before=$(lab_exec srv "$WARREN" server nodes --json --state-dir "$SRV_DIR" | python3 -c 'import json,sys; print(sorted((n["name"], n["mesh_addr"]) for n in json.load(sys.stdin)))')
kill "$SRV_PID"
not_connected() { ! connected "$1"; }
lab_wait "a notices the coordinator is gone" 60 not_connected a
lab_exec a ping -c1 -W2 "${ADDR[b]}" >/dev/null || lab_fail "a -> b broke while the coordinator is down"
lab_exec a ping -c1 -W2 "${ADDR[c]}" >/dev/null || lab_fail "a -> c broke while the coordinator is down"

# Agent restart with the coordinator still down: the mesh comes back from the cache.
kill "${PID[a]}"
lab_wait "agent a exited" 10 bash -c "! kill -0 ${PID[a]} 2>/dev/null"
start_agent a
lab_wait "restarted agent a answers" 10 st a
lab_wait "a -> b after an agent restart without coordinator" 20 lab_exec a ping -c1 -W1 "${ADDR[b]}"

start_server
for n in a b c; do lab_wait "$n reconnects to the restarted coordinator" 90 connected "$n"; done
nodes_after=$(lab_exec srv "$WARREN" server nodes --json --state-dir "$SRV_DIR" | python3 -c 'import json,sys; print(sorted((n["name"], n["mesh_addr"]) for n in json.load(sys.stdin)))')
[ "$nodes_before" = "$nodes_after" ] || lab_fail "nodes changed across a restart: $nodes_before -> $nodes_after"

# Removal: c disappears from the others' WireGuard within 2 s, and its agent stops.
c_key=$(st c | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])')
lab_exec srv "$WARREN" server remove node-c --state-dir "$SRV_DIR" >/dev/null
c_gone() { ! lab_exec "$1" wg show "${IF[$1]}" peers | grep -qF "$c_key"; }
lab_wait "c removed from a's WireGuard" 2 c_gone a
lab_wait "c removed from b's WireGuard" 2 c_gone b
lab_wait "c's agent stops" 10 bash -c "! kill -0 ${PID[c]} 2>/dev/null"
grep -q "removed from the mesh" "$LAB_DIR/agent-c.log" || lab_fail "c's agent did not say why it stopped"
if lab_exec a ping -c1 -W1 "${ADDR[c]}" >/dev/null 2>&1; then lab_fail "a still reaches removed c"; fi

# warren down: the interface goes, the coordinator marks the node offline.
lab_exec b "$WARREN" down --socket "$(sock b)" >/dev/null
lab_wait "b's agent exits after down" 10 bash -c "! kill -0 ${PID[b]} 2>/dev/null"
if lab_exec b ip link show "${IF[b]}" >/dev/null 2>&1; then lab_fail "b's interface survived warren down"; fi
b_offline() { st a | python3 -c 'import json,sys; sys.exit(0 if [p for p in json.load(sys.stdin)["peers"] if p["name"]=="backup" and not p["online"]] else 1)'; }
lab_wait "a sees b offline" 5 b_offline
echo "mesh_basic: ok"
