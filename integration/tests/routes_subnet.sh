#!/usr/bin/env bash
# tiers: lab kernel
# Subnet routes: node gw advertises the LAN behind it (192.168.50.0/24, where
# host lanh runs no warren and has no route back to the mesh); before an
# administrator approves it, node b cannot reach lanh; after `server routes
# approve` b pings lanh and opens TCP to it by its LAN address (lanh sees gw's
# LAN address: masquerade), with the prefix in b's allowed IPs for gw and a
# route through the mesh; node c, which is on 192.168.50.0/24 itself, does not
# install the route. Revoking removes route and allowed IP; stopping gw's agent
# leaves its rules, routes, nft tables and ip_forward as they were.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3
lab_init
. "$(dirname "$0")/../mesh.sh"
declare -A IF=() PID=() ADDR=()
for n in gw b c; do IF[$n]=$(lab_ifname "$n"); done

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host gw 203.0.113.20
lab_public_host b 203.0.113.30
lab_public_host c 203.0.113.40
# gw's LAN: one host, reachable only through gw, with no default route.
lab_new_ns lanh
ip link add lan0 netns "$(lab_ns gw)" type veth peer name eth0 netns "$(lab_ns lanh)"
ip -n "$(lab_ns gw)" addr add 192.168.50.1/24 dev lan0
ip -n "$(lab_ns gw)" link set lan0 up
ip -n "$(lab_ns lanh)" addr add 192.168.50.2/24 dev eth0
ip -n "$(lab_ns lanh)" link set eth0 up
# c sits on a network with the same prefix (a veth pair inside it stands for it).
ip -n "$(lab_ns c)" link add lan0 type veth peer name lan1
ip -n "$(lab_ns c)" link set lan1 up
ip -n "$(lab_ns c)" addr add 192.168.50.77/24 dev lan0
ip -n "$(lab_ns c)" link set lan0 up

# lanh answers each TCP connection with the source address it sees.
seen_server lanh 192.168.50.2 8080

start_server
token=$(reusable_token)

# What gw's agent must leave as it found it.
gw_state() {
    lab_exec gw ip rule
    # IPv6 link-local addresses appear by themselves once DAD is done; the
    # kernel's own routes for the mesh address stay with the interface, which
    # the kernel backend keeps after a stop (only warren's routes must go).
    lab_exec gw ip route show table all | grep -v 'fe80::' | grep -v "dev ${IF[gw]} .*proto kernel"
    lab_exec gw nft list ruleset
    lab_exec gw cat /proc/sys/net/ipv4/ip_forward
}
gw_state >"$LAB_DIR/gw-before"


start_agent gw --advertise-routes 192.168.50.0/24
start_agent b
start_agent c
for n in gw b c; do
    lab_wait "$n has two peers" 30 has_peers "$n" 2
    ADDR[$n]=$(addr_of "$n")
done
lab_wait "b pings gw over the mesh" 30 lab_exec b ping -c1 -W1 "${ADDR[gw]}"

server routes list
server routes list --json | python3 -c '
import json, sys
r = {v["name"]: v for v in json.load(sys.stdin)}
assert r["node-gw"]["advertised"] == ["192.168.50.0/24"], r
assert r["node-gw"]["approved"] == [] and r["node-gw"]["published"] == [], r
' || lab_fail "routes list does not show gw's advertised, unapproved prefix"
[ "$(lab_exec gw cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || lab_fail "gw did not turn on IPv4 forwarding"
lab_exec gw nft list table ip "warren_nat_${IF[gw]}" >/dev/null || lab_fail "gw has no nat table"

# Not approved: nothing routes 192.168.50.0/24 to gw.
allowed_on() { lab_exec "$1" wg show "${IF[$1]}" allowed-ips; }
has_route() { lab_exec "$1" ip route show 192.168.50.0/24 dev "${IF[$1]}" | grep -q .; }
if lab_exec b ping -c2 -W1 192.168.50.2 >/dev/null 2>&1; then lab_fail "b reached lanh before approval"; fi
allowed_on b | grep -q 192.168.50.0/24 && lab_fail "b has gw's prefix in its allowed IPs before approval"

# An approval needs an advertisement.
if out=$(server routes approve node-gw 10.99.0.0/16 2>&1); then lab_fail "approved a prefix gw does not advertise"; fi
echo "approve unadvertised: $out"
[ "$(wc -l <<<"$out")" = 1 ] && grep -q "node-gw does not advertise 10.99.0.0/16" <<<"$out" ||
    lab_fail "unclear refusal: $out"

server routes approve node-gw 192.168.50.0/24
lab_wait "b routes 192.168.50.0/24 through the mesh" 10 has_route b
allowed_for_gw() { allowed_on b | grep "${ADDR[gw]}/32" | grep -q 192.168.50.0/24; }
lab_exec b "$WARREN" status --socket "$(sock b)" | grep -q "^route 192.168.50.0/24 via node-gw$" ||
    lab_fail "b's status does not show the route: $(lab_exec b "$WARREN" status --socket "$(sock b)")"
allowed_for_gw || lab_fail "b's allowed IPs for gw lack 192.168.50.0/24: $(allowed_on b)"
lab_wait "b pings lanh by its LAN address" 20 lab_exec b ping -c1 -W1 192.168.50.2
seen=$(lab_exec b bash -c 'exec 3<>/dev/tcp/192.168.50.2/8080; timeout 5 cat <&3')
echo "lanh says: $seen"
[ "$seen" = "seen 192.168.50.1" ] || lab_fail "TCP to lanh: '$seen' (want masquerade to gw's LAN address)"
# c is on that network itself: the route would cut it off it.
lab_wait "c logs the skipped route" 10 grep -q "route 192.168.50.0/24 of node-gw: not used, it covers this node's own network" "$LAB_DIR/agent-c.log"
has_route c && lab_fail "c routes its own network through the mesh"
lab_exec c ip route get 192.168.50.2 | grep -q "dev lan0" || lab_fail "c lost its own network"

# An administrator's own route through b's mesh interface is not warren's
# to remove: it outlives the revocation below.
lab_exec b ip route add 10.77.0.0/16 dev "${IF[b]}" proto static

# Revoked: route and allowed IP go, lanh is out of reach again.
server routes revoke node-gw 192.168.50.0/24
no_route() { ! has_route b; }
lab_wait "b drops the route" 10 no_route
lab_exec b ip route show 10.77.0.0/16 dev "${IF[b]}" | grep -q . ||
    lab_fail "b's agent removed the administrator's route 10.77.0.0/16 through ${IF[b]}"
lab_exec b ip route del 10.77.0.0/16 dev "${IF[b]}"
no_allowed() { ! allowed_on b | grep -q 192.168.50.0/24; }
lab_wait "b drops the allowed IP" 10 no_allowed
if lab_exec b ping -c2 -W1 192.168.50.2 >/dev/null 2>&1; then lab_fail "b still reaches lanh after revoke"; fi

# Approved again, then gw's agent stops: its host is as it was before.
server routes approve node-gw 192.168.50.0/24 >/dev/null
lab_wait "b pings lanh again" 20 lab_exec b ping -c1 -W1 192.168.50.2
lab_stop "${PID[gw]}"
gw_state >"$LAB_DIR/gw-after"
diff -u "$LAB_DIR/gw-before" "$LAB_DIR/gw-after" || lab_fail "gw's routing or nft state changed after its agent stopped"
grep -q "IPv4 forwarding off again" "$LAB_DIR/agent-gw.log" || lab_fail "gw did not log restoring ip_forward"
echo "routes_subnet: ok"
