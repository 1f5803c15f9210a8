#!/usr/bin/env bash
# tiers: lab kernel
# Direct paths follow a node that moves. Two nodes on one cone router's LAN go
# direct by the local candidate (each `wg show` endpoint is the other's LAN
# address, no hairpin through the router). During a continuous ping, b's LAN
# address changes (new one added, old one deleted inside b's namespace): a's
# endpoint for b follows to the new address, pings are answered again. Then b
# is re-plugged into another cone router's LAN: a and b go direct again
# across the internet (each endpoint the other router's WAN address) and
# pings are answered. Outcomes are polled with deadlines; the gaps are printed.
# Another process holds b's usual check port (51821): b's agent takes another
# one and a must still reach it (the port comes with b's candidates).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3
lab_init

SRV_IP=203.0.113.5
lab_internet
lab_public_host srv "$SRV_IP"
lab_router r1 cone 198.51.100.61 10.61.0.1/24
lab_lan_host a r1 10.61.0.2
lab_lan_host b r1 10.61.0.3
lab_router r2 cone 198.51.100.62 10.62.0.1/24
# Deleting b's primary address must keep the new one (and the routes through it).
lab_exec b sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen "$SRV_IP:7777" --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

# A stranger on b's usual check port, for the whole test.
lab_bg b squatter.log python3 -c 'import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 51821))
time.sleep(600)'
squatting() { lab_exec b ss -Hlun | grep -q ':51821 '; }
lab_wait "a stranger holding UDP 51821 on b" 10 squatting

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
grep -q "check socket: UDP port 51821 is in use" "$LAB_DIR/agent-b.log" ||
    lab_fail "b's agent did not say it moved its check socket off the taken port"
for n in a b; do
    read -r "ADDR[$n]" "KEY[$n]" < <(st "$n" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["mesh_addr"], s["public_key"])')
done
ep_a() { lab_wg_endpoint a "${IF[a]}" "${KEY[b]}"; }
ep_b() { lab_wg_endpoint b "${IF[b]}" "${KEY[a]}"; }
# endpoints_are A_IP B_IP: a dials b at A_IP, b dials a at B_IP (any port).
endpoints_are() { [[ "$(ep_a)" == "$1":* ]] && [[ "$(ep_b)" == "$2":* ]]; }
# wait_endpoints DESC A_IP B_IP: polls, then fails saying where they really point.
wait_endpoints() {
    lab_poll 60 endpoints_are "$2" "$3" ||
        lab_fail "$1 within 60 s: a -> $(ep_a) (want $2:*), b -> $(ep_b) (want $3:*)"
}
now() { date +%s.%N; }
since() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$2"; }

lab_wait "a pings b over the mesh" 30 lab_exec a ping -c1 -W1 "${ADDR[b]}"
wait_endpoints "a and b did not go direct by their LAN addresses" 10.61.0.3 10.61.0.2
echo "direct on the LAN: a -> $(ep_a), b -> $(ep_b)"

# A continuous ping a -> b; -D stamps each reply with its arrival time.
PINGS=$LAB_DIR/pings.txt
lab_bg a "$PINGS" ping -D -i 0.2 -W 1 -w 150 "${ADDR[b]}"
PING_PID=$LAB_LAST_PID
replies_after() { awk -v t="$1" '/bytes from/ { ts = substr($1, 2, length($1) - 2); if (ts + 0 > t + 0) n++ } END { print n + 0 }' "$PINGS"; }
answered_after() { [ "$(replies_after "$1")" -gt 0 ]; }
lab_wait "the ping series is answered" 10 answered_after 0
# Longest silence between replies after time T0 (up to now).
silence_after() {
    python3 - "$PINGS" "$1" <<'PY'
import sys
ts = [float(l[1:l.index("]")]) for l in open(sys.argv[1]) if l.startswith("[") and "bytes from" in l]
t0 = float(sys.argv[2])
win = [t for t in ts if t <= t0][-1:] + [t for t in ts if t > t0]
print("%.2f" % max((b - a for a, b in zip(win, win[1:])), default=0))
PY
}

# 1. b's LAN address changes under the running ping.
moved_at=$(now)
lab_exec b ip addr add 10.61.0.33/24 dev eth0
lab_exec b ip addr del 10.61.0.3/24 dev eth0
# Deleting the old address may take the default route with it: put it back.
lab_exec b ip route replace default via 10.61.0.1
wait_endpoints "a's endpoint did not follow b to 10.61.0.33" 10.61.0.33 10.61.0.2
followed_at=$(now)
lab_wait "pings answered after b's new address" 30 answered_after "$followed_at"
echo "new LAN address: a -> $(ep_a) after $(since "$moved_at" "$followed_at") s; longest ping silence $(silence_after "$moved_at") s"

# 2. b is re-plugged from r1's LAN into r2's: a new network, a new NAT.
replug_at=$(now)
lab_exec b ip link del eth0
lab_plug b r2
lab_exec b ip addr add 10.62.0.2/24 dev eth0
lab_exec b ip route add default via 10.62.0.1
# Across the internet now: a dials r2's WAN, b dials r1's WAN (cone <-> cone).
wait_endpoints "a and b did not go direct again after the re-plug" 198.51.100.62 198.51.100.61
direct_at=$(now)
lab_wait "pings answered after the re-plug" 30 answered_after "$direct_at"
echo "re-plugged into r2's LAN: direct again after $(since "$replug_at" "$direct_at") s (a -> $(ep_a), b -> $(ep_b)); longest ping silence $(silence_after "$replug_at") s"
kill "$PING_PID" 2>/dev/null || true
echo "nat_roaming: ok"
