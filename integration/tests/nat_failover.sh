#!/usr/bin/env bash
# tiers: lab kernel
# A direct path fails over to the relay and comes back by itself. Two cone
# nodes, each behind its own cone router, go direct; an iperf3 transfer and a
# 100 ms ping series run over the mesh; UDP between the two routers' WAN
# addresses is dropped in the internet (TCP to the relay still passes): the
# transfer keeps going over the relay (`wg show` endpoints loopback on both
# sides, pings answered again, iperf3 sends bytes while on the relay and
# completes). The cut is lifted: both go direct again without anyone touching
# the agents. Prints the measured cut -> relay and restore -> direct times;
# asserts outcomes with deadlines only (the times are budgets for
# integration/bench-direct, not assertions).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg iperf3 python3
lab_init

SRV_IP=203.0.113.5
WAN_A=198.51.100.31 WAN_B=198.51.100.32
lab_internet
lab_public_host srv "$SRV_IP"
lab_router ra cone "$WAN_A" 10.31.0.1/24
lab_lan_host a ra 10.31.0.2
lab_router rb cone "$WAN_B" 10.32.0.1/24
lab_lan_host b rb 10.32.0.2
declare -A WAN=([a]=$WAN_A [b]=$WAN_B)

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen "$SRV_IP:7777" --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A IF=() ADDR=() KEY=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
for n in a b; do
    IF[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n"
done
joined() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == 1 and s["mesh_addr"] else 1)'; }
for n in a b; do lab_wait "$n joined with one peer" 30 joined "$n"; done
for n in a b; do
    read -r "ADDR[$n]" "KEY[$n]" < <(st "$n" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["mesh_addr"], s["public_key"])')
done
other() { if [ "$1" = a ]; then echo b; else echo a; fi; }
# NODE's WireGuard endpoint for the other node.
ep() { lab_wg_endpoint "$1" "${IF[$1]}" "${KEY[$(other "$1")]}"; }
# Direct: the endpoint is the other router's WAN address (the cone's mapping of its WireGuard port).
is_direct() { [[ "$(ep "$1")" == "${WAN[$(other "$1")]}":* ]]; }
is_relay() { [[ "$(ep "$1")" == 127.0.0.1:* ]]; }
both() {
    local f=$1
    "$f" a && "$f" b
}
now() { date +%s.%N; }
since() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$2"; }

lab_wait "a pings b over the mesh" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
lab_poll 60 both is_direct ||
    lab_fail "a and b did not go direct within 60 s: a -> $(ep a) (want $WAN_B:*), b -> $(ep b) (want $WAN_A:*)"
echo "direct: a -> $(ep a), b -> $(ep b)"

lab_bg b iperf-server.log iperf3 -s --forceflush -B "${ADDR[b]}"
iperf_listening() { lab_exec b ss -Hltn | grep -q "${ADDR[b]}:5201"; }
lab_wait "iperf3 server on b" 10 iperf_listening

# 100 ms ping series a -> b: -D stamps each reply with the time it arrived.
PINGS=$LAB_DIR/pings.txt
lab_bg a "$PINGS" ping -D -i 0.1 -W 1 -w 120 "${ADDR[b]}"
PING_PID=$LAB_LAST_PID
IPERF_JSON=$LAB_DIR/iperf.json
lab_bg a "$IPERF_JSON" iperf3 -c "${ADDR[b]}" -t 40 -i 1 -J
IPERF_PID=$LAB_LAST_PID
sending() { lab_exec a ss -Htn state established "( dport = :5201 )" | grep -q .; }
lab_wait "the transfer is under way" 10 sending
iperf_t0=$(now)
# Let the transfer run on the direct path for a few seconds before the cut.
sleep 4
both is_direct || lab_fail "a or b left the direct path before the cut: a -> $(ep a), b -> $(ep b)"

# The cut: UDP between the two routers' WANs dies in the internet; TCP (the relay) lives.
cut_at=$(now); echo "cut at $cut_at"
lab_cut_udp inet "$WAN_A" "$WAN_B"
lab_wait "a and b fall back to the relay (wg endpoints loopback)" 30 both is_relay
relay_at=$(now)
echo "cut -> both wg endpoints on the relay: $(since "$cut_at" "$relay_at") s"
# Replies (ping -D stamps) that arrived after the given time.
replies_after() { awk -v t="$1" '/bytes from/ { ts = substr($1, 2, length($1) - 2); if (ts + 0 > t + 0) n++ } END { print n + 0 }' "$PINGS"; }
answered_after() { [ "$(replies_after "$1")" -gt 0 ]; }
lab_wait "pings answered over the relay" 20 answered_after "$relay_at"
# Stay cut until the transfer provably moves bytes over the relay: TCP backs
# off its retransmissions during the outage, so its first bytes on the relay
# can take a few seconds after the pings get through. The iperf3 server
# prints one line per second; a non-zero one after the fallback is the proof.
relay_line=$(wc -l <"$LAB_DIR/iperf-server.log")
moved_on_relay() {
    tail -n +"$((relay_line + 1))" "$LAB_DIR/iperf-server.log" |
        awk '/sec/ && $5 + 0 > 0 && $6 ~ /Bytes/ { found = 1 } END { exit !found }'
}
lab_wait "the transfer to move bytes over the relay" 30 moved_on_relay
for n in a b; do is_relay "$n" || lab_fail "$n left the relay while the direct path is cut: $(ep "$n")"; done
restore_at=$(now)
lab_uncut_udp inet
lab_wait "a and b go direct again by themselves" 60 both is_direct
direct_at=$(now)
echo "restore -> both wg endpoints direct again: $(since "$restore_at" "$direct_at") s (a -> $(ep a), b -> $(ep b))"
lab_wait "pings answered on the direct path again" 20 answered_after "$direct_at"

wait "$IPERF_PID" || lab_fail "iperf3 across the failover failed: $(tail -n 5 "$IPERF_JSON")"
kill "$PING_PID" 2>/dev/null || true
# The transfer moved bytes while only the relay carried it, and completed.
# (The bytes on the relay were proven above from the receiver's per-second log;
# the sender's intervals below are on its own clock and only reported.)
python3 - "$IPERF_JSON" "$(since "$iperf_t0" "$relay_at")" "$(since "$iperf_t0" "$restore_at")" <<'PY' || lab_fail "iperf3 moved nothing"
import json, sys
j = json.load(open(sys.argv[1]))
relay_from, relay_to = float(sys.argv[2]), float(sys.argv[3])
on_relay = sum(i["sum"]["bytes"] for i in j["intervals"]
               if i["sum"]["start"] >= relay_from and i["sum"]["end"] <= relay_to)
total = j["end"]["sum_received"]["bytes"]
print("iperf3: %.1f MB received in all, %.1f MB sent while on the relay (%.1f-%.1f s into the run)"
      % (total / 1e6, on_relay / 1e6, relay_from, relay_to))
sys.exit(0 if total > 0 else 1)
PY

# From the ping series: the longest silence (between replies) around the cut
# and the restore, i.e. how long traffic really stopped.
python3 - "$PINGS" "$cut_at" "$restore_at" <<'PY'
import sys
ts = []
for line in open(sys.argv[1]):
    if "bytes from" in line and line.startswith("["):
        ts.append(float(line[1:line.index("]")]))
cut, restore = float(sys.argv[2]), float(sys.argv[3])
def gap(t0, t1):
    before = [t for t in ts if t <= t0]
    after = [t for t in ts if t > t0]
    if not after:
        return "no reply after it"
    # First reply after the event, counted from the event.
    first = after[0] - t0
    # Longest silence between consecutive replies in the window.
    win = ([before[-1]] if before else []) + [t for t in after if t <= t1]
    longest = max((b - a for a, b in zip(win, win[1:])), default=0)
    return "first reply %.2f s after it, longest silence %.2f s" % (first, longest)
print("ping series: cut:", gap(cut, restore))
print("ping series: restore:", gap(restore, restore + 30))
print("ping series: %d replies in all" % len(ts))
PY
echo "nat_failover: ok"
