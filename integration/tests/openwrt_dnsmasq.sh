#!/usr/bin/env bash
# tiers: lab
# The OpenWrt init script's dnsmasq entries with a real dnsmasq: the entries
# come from the script's own dnsmasq_entries (busybox sh, the shipped UCI
# config, integration/openwrt/functions.sh); a dnsmasq run with OpenWrt's
# defaults (domain-needed, bogus-priv, stop-dns-rebind) and those entries as
# server= lines (and rebind_domain as rebind-domain-ok, as OpenWrt's dnsmasq
# init writes them) forwards to a real agent on 127.0.0.1:5354. Checked: a
# client of dnsmasq gets the A record of another node's name and the PTR of
# its mesh address; the same dnsmasq with only the forward entry refuses the
# PTR (bogus-priv), so the reverse entry is what answers it. Not exercised:
# the uci add_list/del_list calls and dnsmasq's reload (no uci here).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd busybox dnsmasq dig wg python3
lab_init

FILES=$LAB_ROOT/packaging/openwrt/warren/files
SHIM=$LAB_ROOT/integration/openwrt
mkdir -p "$LAB_DIR/uci"
cp "$FILES/warren.config" "$LAB_DIR/uci/warren"
# shellcheck disable=SC2016 # expanded by busybox sh
entries=$(UCI_CONFIG_DIR=$LAB_DIR/uci busybox sh -c '. "$1/functions.sh"; . "$2/warren.init"; config_load warren; dnsmasq_entries' _ "$SHIM" "$FILES")
echo "--- dnsmasq entries"
echo "$entries"
[ "$(echo "$entries" | wc -l)" = 2 ] || lab_fail "want two dnsmasq entries (domain, reverse zones), got: $entries"
forward=$(echo "$entries" | sed -n 1p)
[ "$forward" = "/warren/127.0.0.1#5354" ] || lab_fail "the forward entry is $forward"
# The reverse entry: every octet zone of 100.64.0.0/10, to the same server
# (the PTR below only proves the zone of one address).
want=$(for b in $(seq 64 127); do printf '/%s.100.in-addr.arpa' "$b"; done)/127.0.0.1#5354
[ "$(echo "$entries" | sed -n 2p)" = "$want" ] || lab_fail "the reverse entry is not the 64 zones of 100.64.0.0/10: $(echo "$entries" | sed -n 2p)"

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host rtr 203.0.113.30
lab_public_host b 203.0.113.40
. "$(dirname "$0")/../mesh.sh"
declare -A IF=([rtr]=$(lab_ifname r) [b]=$(lab_ifname b)) PID=()
start_server
token=$(reusable_token)
start_agent rtr --dns-listen 127.0.0.1:5354
start_agent b
for n in rtr b; do lab_wait "$n joined with one peer" 30 has_peers "$n" 1; done
b_addr=$(addr_of b)

# dnsmasq PORT ENTRY...: a dnsmasq in rtr with OpenWrt's defaults and ENTRYs as servers.
dnsmasq_with() {
    local port=$1 e
    shift
    local args=(-k -u root --conf-file=/dev/null --pid-file= -p "$port" --listen-address=127.0.0.1
        --bind-interfaces --no-resolv --no-hosts --domain-needed --bogus-priv --stop-dns-rebind
        --rebind-localhost-ok --rebind-domain-ok=/warren/)
    for e in "$@"; do args+=("--server=$e"); done
    lab_bg rtr "dnsmasq-$port.log" dnsmasq "${args[@]}"
}
# shellcheck disable=SC2086 # one entry a line, no spaces in them
dnsmasq_with 5300 $entries
dnsmasq_with 5301 "$forward"
ask() { lab_exec rtr dig +time=1 +tries=1 @127.0.0.1 -p "$@"; }
a_is() { [ "$(ask "$1" +short node-b.warren A)" = "$b_addr" ]; }
ptr_is() { [ "$(ask "$1" +short -x "$b_addr")" = "node-b.warren." ]; }
lab_wait "dnsmasq answers node-b.warren with $b_addr" 20 a_is 5300
lab_wait "dnsmasq answers the PTR of $b_addr with node-b.warren" 20 ptr_is 5300
echo "dnsmasq with both entries: node-b.warren -> $b_addr, $b_addr -> $(ask 5300 +short -x "$b_addr")"
# Without the reverse entry bogus-priv refuses the PTR (the A still works).
lab_wait "dnsmasq with the forward entry only answers the A" 20 a_is 5301
status=$(ask 5301 -x "$b_addr" | sed -n 's/.*status: \([A-Z]*\),.*/\1/p')
echo "dnsmasq with the forward entry only: PTR of $b_addr -> $status"
[ "$status" = REFUSED ] || [ "$status" = NXDOMAIN ] || lab_fail "without the reverse entry the PTR got $status"
echo "openwrt_dnsmasq: ok"
