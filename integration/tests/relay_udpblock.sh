#!/usr/bin/env bash
# tiers: lab
# `warren relay` on the fake internet carries datagrams between two hosts
# behind routers that drop all UDP (only TCP leaves): one host echoes, the
# other pings through the relay and every ping comes back, labelled with the
# echoing host's proven key. A garbage connection from one host is closed and
# the pair keeps working. The hosts run `warren relay-load`, the protocol's
# in-process client, to test the relay alone; mesh_relay does it with agents.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_init

lab_internet
lab_public_host relay 203.0.113.7
lab_router ra udpblock 198.51.100.21 10.21.0.1/24
lab_lan_host a ra 10.21.0.2
lab_router rb udpblock 198.51.100.22 10.22.0.1/24
lab_lan_host b rb 10.22.0.2

RELAY=203.0.113.7:7778
KEY=$("$WARREN" relay --state-dir "$LAB_DIR/relay" --show-key)
lab_bg relay relay.log "$WARREN" relay --listen "$RELAY" --state-dir "$LAB_DIR/relay"
listening() { lab_exec relay ss -Hltn | grep -q "$RELAY "; }
lab_wait "relay listening" 20 listening

lab_bg b echo.out "$WARREN" relay-load echo --relay "$RELAY" --key "$KEY" --seconds 120
echo_ready() { grep -q '^key=' "$LAB_DIR/echo.out"; }
lab_wait "echoing host registered at the relay" 20 echo_ready
# The line is `key=KEY registered_ms=N`.
BKEY=$(sed -n 's/^key=\([^ ]*\).*/\1/p' "$LAB_DIR/echo.out")

ping_all() {
    local out
    out=$(lab_exec a "$WARREN" relay-load ping --relay "$RELAY" --key "$KEY" --to "$BKEY" --count "$1")
    lab_log "ping through the relay: $out"
    [[ "$out" == *"sent=$1 received=$1 "* ]] || lab_fail "not every ping came back: $out"
}
ping_all 20

# Garbage from host a on its own TCP connection: the relay closes it, the pair is unaffected.
garbage_closed() {
    lab_exec a bash -c "exec 3<>/dev/tcp/${RELAY%:*}/${RELAY#*:}; printf 'GET / HTTP/1.1\r\n\r\n' >&3; timeout 10 cat <&3 >/dev/null"
}
garbage_closed || lab_fail "relay did not close a garbage connection"
# Strangers' connections are counted in a summary line (at most one per 10 s), not logged one by one.
counted() { grep -Eq 'closed [1-9][0-9]* before registering' "$LAB_DIR/relay.log"; }
lab_wait "the relay's summary to count the closed garbage connection" 30 counted
ping_all 5
echo "relay_udpblock: ok"
