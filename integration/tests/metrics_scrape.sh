#!/usr/bin/env bash
# tiers: lab
# Prometheus metrics of every role, scraped with curl and checked with
# `promtool check metrics`: a coordinator (`warren server`, with WG-STUN), a
# separate `warren relay` and `warren wgstun`, and two agents behind cone routers, each with
# --metrics-listen. The values match the real state: both agents go direct
# and their metrics say so (per peer and by path, an upgrade counted); a's rx
# bytes for b lie between two `wg show` readings and grow after a ping; the
# coordinator counts two connected nodes, the relay two clients, a separate
# `warren wgstun` the plain STUN question a client asks it. UDP between
# the routers is cut: the peers fall back to the relay, the metrics show the
# relay path and a downgrade, and a ping over the relay grows the relay's
# forwarded count and the agent's relay bytes. A stranger holding three times
# as many connections to a's metrics port as it serves, and opening more,
# does not stall a's loop: relayed pings (carried by the agent) keep being
# answered, `warren status` answers, and a scrape is still served.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg curl promtool python3 turnutils_stunclient
lab_init

SRV_IP=203.0.113.5
WAN_A=198.51.100.31 WAN_B=198.51.100.32
lab_internet
lab_public_host srv "$SRV_IP"
lab_router ra cone "$WAN_A" 10.31.0.1/24
lab_lan_host a ra 10.31.0.2
lab_router rb cone "$WAN_B" 10.32.0.1/24
lab_lan_host b rb 10.32.0.2

# Every namespace has its own loopback: the same port serves each node.
SRV_METRICS=127.0.0.1:9100 RELAY_METRICS=127.0.0.1:9101 AGENT_METRICS=127.0.0.1:9102 WGSTUN_METRICS=127.0.0.1:9103
SRV_DIR=$LAB_DIR/srv RELAY_DIR=$LAB_DIR/relay
relay_key=$(lab_exec srv "$WARREN" relay --state-dir "$RELAY_DIR" --show-key)
lab_bg srv relay.log "$WARREN" relay --listen "$SRV_IP:7778" --state-dir "$RELAY_DIR" \
    --metrics-listen "$RELAY_METRICS"
lab_bg srv server.log "$WARREN" server --listen "$SRV_IP:7777" --state-dir "$SRV_DIR" \
    --no-relay --relay "$relay_key@$SRV_IP:7778" --metrics-listen "$SRV_METRICS"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A IF=() ADDR=() KEY=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
for n in a b; do
    IF[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n" \
        --metrics-listen "$AGENT_METRICS"
done
joined() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == 1 and s["mesh_addr"] else 1)'; }
for n in a b; do lab_wait "$n joined with one peer" 30 joined "$n"; done
for n in a b; do
    read -r "ADDR[$n]" "KEY[$n]" < <(st "$n" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["mesh_addr"], s["public_key"])')
done

# fetch NODE ADDR NAME: the metrics into $LAB_DIR/NAME.prom, checked by
# promtool; fails (returns 1) if either fails, for lab_wait to poll.
fetch() {
    local out=$LAB_DIR/$3.prom
    lab_exec "$1" curl -sSf --max-time 10 "http://$2/metrics" >"$out" || return 1
    promtool check metrics <"$out" >"$LAB_DIR/promtool.txt" 2>&1 || {
        echo "promtool rejects the metrics of $3: $(head -n 5 "$LAB_DIR/promtool.txt")" >&2
        return 1
    }
}
# scrape NODE ADDR NAME: fetch, or fail the test.
scrape() { fetch "$@" || lab_fail "scraping $3 at $2 failed: $(head -n 5 "$LAB_DIR/promtool.txt" 2>/dev/null)"; }
# value NAME 'metric' label=value...: the one sample of metric with those labels in NAME.prom.
value() {
    python3 - "$LAB_DIR/$1.prom" "${@:2}" <<'PY'
import re, sys
path, metric, want = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
found = []
for line in open(path):
    m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line.strip())
    if not m or m.group(1) != metric:
        continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    if all(labels.get(k) == v for k, v in want.items()):
        found.append(m.group(3))
if len(found) != 1:
    sys.exit(f"{metric} {want}: {len(found)} samples in {path}")
print(found[0])
PY
}
# expect NAME WANT metric label=value...
expect() {
    local name=$1 want=$2 got
    shift 2
    got=$(value "$name" "$@") || lab_fail "$name: no sample $*"
    [ "$got" = "$want" ] || lab_fail "$name: $* is $got, want $want"
}
short() { echo "${1:0:8}"; }
peer_path_is() { # NODE OTHER PATH: NODE's metrics show PATH for OTHER
    fetch "$1" "$AGENT_METRICS" "agent-$1" &&
        [ "$(value "agent-$1" warren_agent_peer_path peer="node-$2" key="$(short "${KEY[$2]}")" path="$3")" = 1 ]
}

lab_wait "a pings b over the mesh" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
lab_wait "a's metrics show b direct" 60 peer_path_is a b direct
lab_wait "b's metrics show a direct" 30 peer_path_is b a direct
for n in a b; do
    scrape "$n" "$AGENT_METRICS" "agent-$n"
    expect "agent-$n" 1 warren_agent_peers path=direct
    expect "agent-$n" 0 warren_agent_peers path=relay
    expect "agent-$n" 1 warren_agent_coordinator_state state=connected
    expect "agent-$n" 1 warren_agent_relay_connected relay="$(short "$relay_key")" home=true
    [ "$(value "agent-$n" warren_agent_path_upgrades_total)" -ge 1 ] || lab_fail "$n counted no upgrade"
    [ "$(value "agent-$n" warren_agent_check_pings_sent_total)" -ge 1 ] || lab_fail "$n counted no check sent"
done
total=$(( $(value agent-a warren_agent_check_pongs_total) + $(value agent-b warren_agent_check_pongs_total) ))
[ "$total" -ge 1 ] || lab_fail "no answered check counted on either side"
echo "---- a's metrics, both direct:"; grep -v '^#' "$LAB_DIR/agent-a.prom"
expect agent-a 1 warren_agent_info name=node-a key="$(short "${KEY[a]}")" mesh_addr="${ADDR[a]}"
# The status agrees: the metrics are read from it.
[ "$(st a | python3 -c 'import json,sys; print(json.load(sys.stdin)["peers"][0]["path"])')" = direct ] ||
    lab_fail "warren status disagrees with the metrics about b's path"

scrape srv "$SRV_METRICS" server
expect server 2 warren_coordinator_nodes_connected
grep -q '^warren_wgstun_answers_total{kind="wgstun"} ' "$LAB_DIR/server.prom" ||
    lab_fail "the server's metrics lack the WG-STUN it runs"
[ "$(value server warren_wgstun_answers_total kind=wgstun)" -ge 1 ] || lab_fail "WG-STUN answered nobody"
scrape srv "$RELAY_METRICS" relay
expect relay 2 warren_relay_clients_registered

# A separate `warren wgstun` counts the plain STUN question a client asks it.
lab_bg srv wgstun.log "$WARREN" wgstun --listen "$SRV_IP:4479" --stun-listen "$SRV_IP:4478" \
    --state-dir "$LAB_DIR/wgstun" --metrics-listen "$WGSTUN_METRICS"
lab_wait "the separate WG-STUN's metrics" 10 fetch srv "$WGSTUN_METRICS" wgstun
expect wgstun 0 warren_wgstun_answers_total kind=stun
lab_exec a timeout 5 turnutils_stunclient -p 4478 "$SRV_IP" | grep -q "reflexive addr: $WAN_A:" ||
    lab_fail "plain STUN from a to the separate WG-STUN was not answered"
scrape srv "$WGSTUN_METRICS" wgstun
expect wgstun 1 warren_wgstun_answers_total kind=stun

# rx bytes: between two readings of WireGuard's own counter, and growing with traffic.
wg_rx() { lab_exec a wg show "${IF[a]}" transfer | awk -v k="${KEY[b]}" '$1 == k { print $2 }'; }
rx_metric() {
    scrape a "$AGENT_METRICS" agent-a
    value agent-a warren_agent_peer_rx_bytes_total peer=node-b key="$(short "${KEY[b]}")"
}
before=$(wg_rx) rx1=$(rx_metric) after=$(wg_rx)
[ "$before" -le "$rx1" ] && [ "$rx1" -le "$after" ] ||
    lab_fail "a's rx bytes for b ($rx1) are not between wg show's $before and $after"
lab_exec a ping -c 5 -i 0.2 -W 2 "${ADDR[b]}" >/dev/null || lab_fail "a cannot ping b directly"
rx2=$(rx_metric)
[ "$rx2" -ge $((rx1 + 5 * 84)) ] || lab_fail "a's rx bytes for b grew from $rx1 to only $rx2 after 5 pings"
echo "rx bytes for b: $rx1 -> $rx2 after 5 pings (wg show said $before..$after before)"

# Cut the direct path: both fall back to the relay, and the metrics follow.
lab_cut_udp inet "$WAN_A" "$WAN_B"
lab_wait "a's metrics show b on the relay" 30 peer_path_is a b relay
lab_wait "b's metrics show a on the relay" 30 peer_path_is b a relay
scrape a "$AGENT_METRICS" agent-a
expect agent-a 1 warren_agent_peers path=relay
[ "$(value agent-a warren_agent_path_downgrades_total)" -ge 1 ] || lab_fail "a counted no downgrade"
forwarded() { scrape srv "$RELAY_METRICS" relay && value relay warren_relay_forwarded_total; }
relay_sent() { scrape a "$AGENT_METRICS" agent-a && value agent-a warren_agent_relay_bytes_total direction=sent; }
fwd1=$(forwarded) sent1=$(relay_sent)
lab_wait "a pings b over the relay" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
lab_exec a ping -c 5 -i 0.2 -W 2 "${ADDR[b]}" >/dev/null || lab_fail "pings over the relay were lost"
fwd2=$(forwarded) sent2=$(relay_sent)
[ "$fwd2" -ge $((fwd1 + 10)) ] || lab_fail "the relay forwarded only $((fwd2 - fwd1)) frames for 6 pings and their replies"
[ "$sent2" -gt "$sent1" ] || lab_fail "a's relay bytes sent did not grow ($sent1 -> $sent2)"
echo "relay forwarded $fwd1 -> $fwd2, a's relay bytes sent $sent1 -> $sent2"

# A stranger holds 24 connections to a's metrics port (8 are served at
# once), each with half a request, and opens new ones as old ones close,
# for 20 s. a's loop carries the relayed pings meanwhile.
cat >"$LAB_DIR/stranger.py" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
held, opened, end = [], 0, time.time() + 20
while time.time() < end:
    held = [s for s in held if s.fileno() >= 0]
    while len(held) < 24:
        s = socket.create_connection((host, int(port)), timeout=2)
        s.sendall(b"GET /metr")
        held.append(s)
        opened += 1
    # Notice the ones the agent closed: they read EOF.
    for s in list(held):
        s.setblocking(False)
        try:
            if s.recv(64) == b"":
                s.close()
                held.remove(s)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            held.remove(s)
    time.sleep(0.05)
print(f"opened {opened} connections", flush=True)
PY
lab_bg a stranger.log python3 "$LAB_DIR/stranger.py" "$AGENT_METRICS"
STRANGER_PID=$LAB_LAST_PID
# Every slot the agent serves is the stranger's.
stranger_connected() { [ "$(lab_exec a ss -Htn state established "( dport = :${AGENT_METRICS##*:} )" | wc -l)" -ge 8 ]; }
lab_wait "the stranger holds connections to a's metrics port" 10 stranger_connected
ping_out=$(lab_exec a ping -c 20 -i 0.2 -W 2 "${ADDR[b]}" || true)
received=$(sed -n 's/.* \([0-9]*\) received.*/\1/p' <<<"$ping_out")
[ "${received:-0}" -ge 15 ] || lab_fail "only ${received:-0} of 20 relayed pings answered while a stranger held the metrics port: $ping_out"
joined a || lab_fail "warren status did not answer while a stranger held the metrics port"
kill -0 "$STRANGER_PID" 2>/dev/null || lab_fail "the stranger stopped early: $(cat "$LAB_DIR/stranger.log")"
# A scrape competes with the stranger's churn for the slots, as Prometheus
# would, retrying on its interval.
lab_wait "a scrape of a while the stranger holds its port" 10 fetch a "$AGENT_METRICS" agent-a
expect agent-a 1 warren_agent_peers path=relay
echo "with a stranger on the metrics port: $received of 20 relayed pings answered, status and a scrape served"
wait "$STRANGER_PID" || true
cat "$LAB_DIR/stranger.log"
echo "metrics_scrape: ok"
