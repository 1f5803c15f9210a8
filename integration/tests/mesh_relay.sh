#!/usr/bin/env bash
# tiers: lab kernel
# Two nodes behind routers that drop all UDP (only TCP leaves) reach each
# other through the relay inside `warren server`: ping both ways, `warren
# status` shows the relay path and which relay, `warren ping` (sealed
# messages agent to agent) answers, iperf3 runs across. The
# server (coordinator and relay) restarts in the middle of an iperf3 transfer:
# the agents reconnect on their own and the transfer finishes.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd iperf3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_router ra udpblock 198.51.100.31 10.31.0.1/24
lab_lan_host a ra 10.31.0.2
lab_router rb udpblock 198.51.100.32 10.32.0.1/24
lab_lan_host b rb 10.32.0.2

SRV_DIR=$LAB_DIR/srv
start_server() {
    lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR" --no-wgstun
    SRV_PID=$LAB_LAST_PID
    lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
}
start_server
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A IF=() ADDR=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
for n in a b; do
    IF[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n"
done
joined() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == 1 and s["mesh_addr"] else 1)'; }
for n in a b; do lab_wait "$n joined with one peer" 20 joined "$n"; done
for n in a b; do ADDR[$n]=$(st "$n" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"])'); done

lab_wait "a pings b over the relay" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
lab_wait "b pings a over the relay" 30 lab_exec b ping -c1 -W1 "${ADDR[a]}"

# Both show the relay as the path and name the relay it goes through.
on_relay() {
    st "$1" | python3 -c '
import json, sys
s = json.load(sys.stdin)
p = s["peers"][0]
home = [r for r in s["relays"] if r["home"]]
ok = p["path"] == "relay" and p["relay"] == "203.0.113.5:7778" and home and home[0]["state"] == "connected"
sys.exit(0 if ok else 1)'
}
for n in a b; do lab_wait "$n shows the relay path through 203.0.113.5:7778" 20 on_relay "$n"; done
lab_exec a "$WARREN" status --socket "$(sock a)"

# warren ping: a sealed round trip between the two agents through the relay.
out=$(lab_exec a "$WARREN" ping node-b --count 2 --socket "$(sock a)") || lab_fail "warren ping node-b failed: $out"
echo "$out"
[ "$(grep -c "^pong from node-b (${ADDR[b]}) through relay 203.0.113.5:7778" <<<"$out")" = 2 ] || lab_fail "unexpected ping output: $out"
if out=$(lab_exec a "$WARREN" ping nosuch --socket "$(sock a)" 2>&1); then lab_fail "pinging an unknown peer succeeded"; fi
[ "$out" = 'warren: no peer named "nosuch" in the mesh' ] || lab_fail "unclear error for an unknown peer: $out"

# Nothing ever went direct: the routers drop UDP, so every WireGuard packet took the relay.
lab_exec a wg show "${IF[a]}" endpoints | grep -q "127.0.0.1:" || lab_fail "a's WireGuard endpoint for b is not the relay socket"

# iperf3 across the relayed path.
lab_bg b iperf-server.log iperf3 -s -B "${ADDR[b]}"
iperf_listening() { lab_exec b ss -Hltn | grep -q "${ADDR[b]}:5201"; }
lab_wait "iperf3 server on b" 10 iperf_listening
lab_exec a iperf3 -c "${ADDR[b]}" -t 3 -J >"$LAB_DIR/iperf1.json" || lab_fail "iperf3 over the relay failed"
mbps() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e6, 1))' "$1"; }
echo "iperf3 a -> b over the relay: $(mbps "$LAB_DIR/iperf1.json") Mbit/s"

# The server (and its relay) restarts during a transfer; the agents reconnect
# by themselves and the transfer completes.
lab_bg a iperf2.log iperf3 -c "${ADDR[b]}" -t 25 -J
IPERF_PID=$LAB_LAST_PID
sent_some() { lab_exec a ss -Htn state established "( dport = :5201 )" | grep -q .; }
lab_wait "the second transfer is under way" 10 sent_some
kill "$SRV_PID"
lab_wait "server stopped" 10 bash -c "! kill -0 $SRV_PID 2>/dev/null"
relay_down() { st a | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if all(r["state"] != "connected" for r in s["relays"]) else 1)'; }
lab_wait "a notices the relay is gone" 30 relay_down
start_server
for n in a b; do lab_wait "$n back on the relay after its restart" 60 on_relay "$n"; done
wait "$IPERF_PID" || lab_fail "iperf3 across a relay restart failed: $(tail -n 5 "$LAB_DIR/iperf2.log")"
echo "iperf3 a -> b across a relay restart: $(mbps "$LAB_DIR/iperf2.log") Mbit/s on average"
lab_wait "a pings b after the relay restart" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
echo "mesh_relay: ok"
