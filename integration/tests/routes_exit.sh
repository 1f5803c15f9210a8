#!/usr/bin/env bash
# tiers: lab kernel
# Exit node: b (behind a cone NAT, public address 198.51.100.10) runs with
# --exit-node node-a; host "far" on the fake internet answers each TCP
# connection with the source address it sees. Before approval b fails open
# (far sees b's own public address, no rules added); once `server routes
# approve node-a 0.0.0.0/0` far sees a's address (203.0.113.20), b's path to a
# stays direct (WireGuard's packets are marked and keep the normal route) and
# b's coordinator and relay connections, made again after a coordinator
# restart, still come from b's own address (the agent's sockets are marked);
# a going offline falls back to the normal route with a log line; stopping
# b's agent while the exit is in use leaves `ip rule` and `ip route show table all` as they were.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3 ss
lab_init
. "$(dirname "$0")/../mesh.sh"
declare -A IF=() PID=() ADDR=()
for n in a b; do IF[$n]=$(lab_ifname "$n"); done

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.20
lab_public_host far 198.51.100.80
lab_router r1 cone 198.51.100.10 10.1.0.1/24
lab_lan_host b r1 10.1.0.2

seen_server far 198.51.100.80 8080
seen_from_b() { lab_exec b timeout 5 bash -c 'exec 3<>/dev/tcp/198.51.100.80/8080; cat <&3'; }
far_sees() { [ "$(seen_from_b)" = "seen $1" ]; }
lab_wait "far answers" 10 far_sees 198.51.100.10

start_server
token=$(reusable_token)

b_state() {
    lab_exec b ip rule
    # IPv6 link-local addresses appear by themselves once DAD is done; the
    # kernel's own routes for the mesh address stay with the interface, which
    # the kernel backend keeps after a stop (only warren's routes must go).
    lab_exec b ip route show table all | grep -v 'fe80::' | grep -v "dev ${IF[b]} .*proto kernel"
}
b_state >"$LAB_DIR/b-before"


start_agent a --advertise-exit
start_agent b --exit-node node-a
for n in a b; do
    lab_wait "$n has its peer" 30 has_peers "$n" 1
    ADDR[$n]=$(addr_of "$n")
done
lab_wait "b pings a over the mesh" 30 lab_exec b ping -c1 -W1 "${ADDR[a]}"

# Not approved: fail open, with a line saying so, and no rules.
lab_wait "b logs the unusable exit" 10 grep -q "exit node node-a is not an approved exit node: traffic takes the normal default route" "$LAB_DIR/agent-b.log"
far_sees 198.51.100.10 || lab_fail "far does not see b's own address before approval: $(seen_from_b)"
lab_exec b ip rule | grep -q 'lookup 22369' && lab_fail "b has exit rules before approval"

server routes approve node-a 0.0.0.0/0
lab_wait "far sees a's address from b" 20 far_sees 203.0.113.20
lab_exec b ip rule
lab_exec b ip route show table 22369
exit_state() { st b | python3 -c 'import json,sys; print(json.load(sys.stdin)["routing"]["exit_state"])'; }
[ "$(exit_state)" = "in use" ] || lab_fail "b's status says the exit is '$(exit_state)'"
allowed=$(lab_exec b wg show "${IF[b]}" allowed-ips)
grep "${ADDR[a]}/32" <<<"$allowed" | grep -q "0.0.0.0/0" || lab_fail "a's allowed IPs on b lack 0.0.0.0/0: $allowed"
wg_ep() { lab_exec b wg show "${IF[b]}" endpoints | awk -v k="$(pubkey_of a)" '$1 == k { print $2 }'; }
ep_is() { [[ "$(wg_ep)" == $1 ]]; }
lab_wait "b's path to a is direct" 30 ep_is "203.0.113.20:*"
# wireguard-go sends from the interface it last received on (sticky sockets),
# which keeps it off the exit table even unmarked; the kernel module does
# not, so the kernel tier proves the mark by traffic and this names it.
mark=$(lab_exec b wg show "${IF[b]}" fwmark)
[ "$mark" = 0x5761 ] || lab_fail "b's WireGuard fwmark is '$mark', not WG_FWMARK 0x5761"
lab_exec b ping -c1 -W2 "${ADDR[a]}" >/dev/null || lab_fail "b lost a's mesh address"

# The coordinator restarts: b's new control and relay connections come from b's own address.
lab_stop "$SRV_PID"
start_server
lab_wait "b reconnects to the coordinator" 30 connected b
from_b() { lab_exec srv ss -Htn state established "( sport = :$1 )" | grep -q " 198.51.100.10:"; }
lab_wait "b's coordinator connection comes from b's address" 20 from_b 7777
lab_wait "b's relay connection comes from b's address" 20 from_b 7778
lab_exec srv ss -Htn state established "( sport = :7777 or sport = :7778 )"
has_peers b 1 || lab_fail "b lost its peer"
far_sees 203.0.113.20 || lab_fail "the exit stopped working after the coordinator restart"
ep_is "203.0.113.20:*" || lab_fail "b's path to a is no longer direct: $(wg_ep)"

# a goes offline: b falls back to its own route, and says so.
lab_stop "${PID[a]}"
lab_wait "b logs the offline exit" 20 grep -q "exit node node-a is offline: traffic takes the normal default route" "$LAB_DIR/agent-b.log"
lab_wait "far sees b's own address again" 10 far_sees 198.51.100.10

# a is back: so is the exit. Then b's agent stops while the exit is in use:
# rules and routes exactly as before it started.
start_agent a --advertise-exit
lab_wait "far sees a's address from b again" 30 far_sees 203.0.113.20
lab_stop "${PID[b]}"
b_state >"$LAB_DIR/b-after"
diff -u "$LAB_DIR/b-before" "$LAB_DIR/b-after" || lab_fail "b's rules or routes changed after its agent stopped"
echo "routes_exit: ok"
