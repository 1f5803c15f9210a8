#!/usr/bin/env bash
# tiers: lab
# The lab's routers behave as their names say, measured with coturn's RFC 5780
# NAT behaviour discovery against a turnserver on the fake internet:
# open = no NAT, cone = endpoint-independent mapping, symmetric = address and
# port dependent mapping, udpblock = no UDP at all; a double NAT of two cones is
# still endpoint-independent; two hosts on one LAN talk directly; the helper
# lab_conntrack_mapping reads the same mapping the STUN server saw; and nothing
# appears in the root namespace.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd turnserver turnutils_natdiscovery conntrack
lab_init

root_links_before=$(ip -o link show | awk -F': ' '{print $2}' | sort)

lab_internet
lab_stun_server

lab_router ropen open 198.51.100.10 203.0.113.65/27
lab_lan_host hopen ropen 203.0.113.66
lab_router rcone cone 198.51.100.11 10.1.0.1/24
lab_lan_host hcone rcone 10.1.0.2
lab_lan_host hcone2 rcone 10.1.0.3
lab_router rsym symmetric 198.51.100.12 10.2.0.1/24
lab_lan_host hsym rsym 10.2.0.2
lab_router rudp udpblock 198.51.100.13 10.3.0.1/24
lab_lan_host hudp rudp 10.3.0.2
lab_router router cone 198.51.100.14 10.4.0.1/24
lab_router rinner cone 10.4.0.2 10.5.0.1/24 router
lab_lan_host hdouble rinner 10.5.0.2

[ "$(ip -o link show | awk -F': ' '{print $2}' | sort)" = "$root_links_before" ] ||
    lab_fail "the lab created links in the root namespace"

for h in hopen hcone hsym hudp hdouble; do
    lab_wait "$h reaching the internet" 10 lab_exec "$h" ping -c1 -W1 203.0.113.5
done

# All discoveries at once: each waits for STUN timeouts, so in sequence they'd be slow.
declare -A pid=()
for h in hopen hcone hsym hudp hdouble; do
    ip=$(lab_exec "$h" ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
    lab_bg "$h" "nat-$h.log" timeout 60 turnutils_natdiscovery -m -f -L "$ip" -l 40000 203.0.113.5
    pid[$h]=$LAB_LAST_PID
done
for h in "${!pid[@]}"; do wait "${pid[$h]}" || true; done

# Only the mapping phase: the filtering phase uses a fresh local port.
reflexive() { awk '/Filtering Behavior/ {exit} /UDP reflexive addr/ {print $NF}' "$LAB_DIR/nat-$1.log" | sort -u; }
expect_line() {
    grep -q "$2" "$LAB_DIR/nat-$1.log" || {
        cat "$LAB_DIR/nat-$1.log" >&2
        lab_fail "$1: natdiscovery did not report '$2'"
    }
}

# open: the host's own address and port, reachable from anyone.
[ "$(reflexive hopen | sort -u)" = "203.0.113.66:40000" ] || lab_fail "open: reflexive $(reflexive hopen)"
expect_line hopen "Endpoint Independent Mapping"
expect_line hopen "Endpoint Independent Filtering"

# cone: one mapping for every destination; unsolicited inbound filtered.
expect_line hcone "NAT with Endpoint Independent Mapping"
expect_line hcone "Address and Port Dependent Filtering"
mapped=$(reflexive hcone)
[ "$(wc -l <<<"$mapped")" -eq 1 ] || lab_fail "cone: several mappings: $mapped"
[ "${mapped%:*}" = 198.51.100.11 ] || lab_fail "cone: mapped to $mapped, not the router's WAN address"
ct=$(lab_conntrack_mapping rcone 10.1.0.2 40000)
[ "$ct" = "$mapped" ] || lab_fail "cone: conntrack says '$ct', STUN said '$mapped'"

# symmetric: a fresh mapping per destination.
expect_line hsym "Address and Port Dependent Mapping"
[ "$(reflexive hsym | wc -l)" -ge 2 ] || lab_fail "symmetric: only one mapping: $(reflexive hsym)"
[ "$(lab_conntrack_mapping rsym 10.2.0.2 40000 | wc -l)" -ge 2 ] || lab_fail "symmetric: conntrack shows one mapping"

# udpblock: no STUN answer at all, yet ICMP still passes.
[ -z "$(reflexive hudp)" ] || lab_fail "udpblock: STUN got through: $(reflexive hudp)"
lab_exec hudp ping -c1 -W2 203.0.113.5 >/dev/null || lab_fail "udpblock: ping blocked too"

# double NAT: cone behind cone is still endpoint-independent, mapped to the outer WAN.
expect_line hdouble "NAT with Endpoint Independent Mapping"
[ "$(reflexive hdouble | cut -d: -f1)" = 198.51.100.14 ] || lab_fail "double NAT: mapped to $(reflexive hdouble)"

# Unsolicited inbound to a NAT router's WAN is dropped (home-router behaviour).
if lab_exec stun ping -c1 -W1 198.51.100.11 >/dev/null 2>&1; then
    lab_fail "cone router answers unsolicited inbound traffic"
fi

# Private addresses are not routed across the internet.
if lab_exec stun ping -c1 -W1 10.1.0.2 >/dev/null 2>&1; then lab_fail "10.1.0.2 reachable from the internet"; fi

# Same LAN: hosts reach each other directly over the bridge (TTL untouched, no NAT).
out=$(lab_exec hcone2 ping -c1 -W2 10.1.0.2) || lab_fail "same LAN: no ping between hcone2 and hcone"
grep -q 'ttl=64' <<<"$out" || lab_fail "same LAN: traffic was routed: $out"

echo "open, cone, symmetric, udpblock, double NAT and same LAN behave as named"
