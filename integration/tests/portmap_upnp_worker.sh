#!/usr/bin/env bash
# tiers: lab
# The UPnP worker (src/portmap/upnp.rs) against Debian's miniupnpd: the
# ignored lib test lab_miniupnpd_round_trip runs inside a LAN host's namespace
# and drives the real worker: Discover, Map, Check, Unmap, a port another LAN
# host holds, finish, then a gateway that refuses and one that goes silent
# (each call bounded, the gateway dropped). It calls this script back
# (--hook) for what only the lab can see or do: the router's nftables
# forward, a datagram from the internet through it, blocking the router's
# control port, and an exit node's policy routing in the worker's namespace
# (the search must still find the gateway).
# The test binary is the one `cargo test` builds (WARREN_LIB_TESTS overrides);
# cargo is asked for its path and builds it only if `cargo test` has not.
set -euo pipefail

if [ "${1:-}" = --hook ]; then
    # hook VERB PORT, with HOOK_ROUTER_NS, HOOK_SENDER_NS, HOOK_WAN from the test.
    # refuse / silence / unblock: the router resets, drops or again accepts
    # TCP to PORT (its UPnP control port), as a gateway that went away.
    forwards() {
        local chain
        chain=$(ip netns exec "$HOOK_ROUTER_NS" nft list chain inet miniupnpd prerouting_upnp) ||
            { echo "cannot list the router's forwards" && exit 1; }
        grep -Eq "dport $1( |$)" <<<"$chain"
    }
    case "$2" in
    nft-has) forwards "$3" || { echo "the router has no forward for $3"; exit 1; } ;;
    nft-lacks) if forwards "$3"; then echo "the router still forwards $3"; exit 1; fi ;;
    send) ip netns exec "$HOOK_SENDER_NS" python3 -c 'import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"warren-lab " + sys.argv[2].encode(), (sys.argv[1], int(sys.argv[2])))' \
        "$HOOK_WAN" "$3" ;;
    refuse | silence)
        verdict=drop
        [ "$2" = refuse ] && verdict="reject with tcp reset"
        ip netns exec "$HOOK_ROUTER_NS" nft -f - <<EOF
table ip lab_block {
    chain input {
        type filter hook input priority filter - 1; policy accept;
        tcp dport $3 $verdict
    }
}
EOF
        ;;
    unblock) ip netns exec "$HOOK_ROUTER_NS" nft delete table ip lab_block ;;
    # exit-on / exit-off, in the worker's own namespace: an exit node's
    # routing as the agent sets it (src/route/exit.rs), into a tun that
    # carries nothing; a search that follows it finds no gateway.
    exit-on)
        ip tuntap add wexit0 mode tun
        ip addr add 100.64.0.99/10 dev wexit0
        ip link set wexit0 up
        ip route add 0.0.0.0/0 dev wexit0 table 22369
        ip rule add priority 5270 lookup main suppress_prefixlength 0
        ip rule add priority 5271 not fwmark 0x5761 lookup 22369
        route=$(ip route get 239.255.255.250)
        [[ "$route" == *" dev wexit0 "* ]] || { echo "unmarked multicast does not take the exit route: $route"; exit 1; }
        ;;
    exit-off)
        ip rule del priority 5271
        ip rule del priority 5270
        ip link del wexit0
        ;;
    *) echo "unknown hook $2" && exit 2 ;;
    esac
    exit 0
fi

. "$(dirname "$0")/../lab.sh"
lab_require_cmd turnserver miniupnpd upnpc python3
lab_init
tests=${WARREN_LIB_TESTS:-}
if [ -z "$tests" ]; then
    lab_require_cmd cargo
    tests=$(cd "$LAB_ROOT" && cargo test --locked --lib --no-run --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])') || lab_fail "cargo could not build the lib tests"
fi
[ -x "$tests" ] || lab_fail "no lib test binary ($tests)"

lab_upnp_site
lab_lan_host a rupnp 10.1.0.2
lab_lan_host b rupnp 10.1.0.3

# Another LAN host holds 40000 already.
out=$(lab_exec b upnpc -i -e other -a 10.1.0.3 40000 40000 UDP 2>&1) || lab_fail "upnpc -a on b failed: $out"
grep -q 'external 198.51.100.20:40000 UDP is redirected to internal 10.1.0.3:40000' <<<"$out" ||
    lab_fail "upnpc did not map 40000 for b: $out"

lab_bg a worker.log env \
    WARREN_LAB_GATEWAY=10.1.0.1 WARREN_LAB_EXTERNAL=198.51.100.20 WARREN_LAB_LOCAL=10.1.0.2 \
    WARREN_LAB_SENDER=203.0.113.5 WARREN_LAB_TAKEN=40000 \
    WARREN_LAB_HOOK="bash $LAB_ROOT/integration/tests/portmap_upnp_worker.sh --hook" \
    HOOK_ROUTER_NS="$(lab_ns rupnp)" HOOK_SENDER_NS="$(lab_ns stun)" HOOK_WAN=198.51.100.20 \
    "$tests" --ignored --exact portmap::upnp::tests::lab_miniupnpd_round_trip --nocapture
rc=0
wait "$LAB_LAST_PID" || rc=$?
cat "$LAB_DIR/worker.log"
echo "---- what miniupnpd did"
grep -Ei 'portmapping|redirect' "$LAB_DIR/miniupnpd-rupnp.log" || true
[ "$rc" -eq 0 ] || lab_fail "lab_miniupnpd_round_trip failed (exit $rc)"
grep -q '^test result: ok. 1 passed' "$LAB_DIR/worker.log" || lab_fail "the lab test did not run"
echo "UPnP worker discovers, maps, checks and unmaps against miniupnpd"
