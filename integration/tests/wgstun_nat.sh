#!/usr/bin/env bash
# tiers: lab kernel
# WG-STUN, run by `warren server` as a home user deploys it, against vanilla
# WireGuard clients (wireguard-go configured only with
# `wg` and `ip`) behind an open, a cone and a symmetric router: coturn's
# turnutils_stunclient sent to 100.64.0.4 inside the tunnel prints the NAT
# mapping of the client's WireGuard listen port, exactly as the router's
# conntrack has it. Two clients behind one cone get their own mappings; ping
# answers; other ports get nothing; plain STUN works; roaming (a new listen
# port, a flushed conntrack entry) shows up in the next answer.
# Kernel tier (WARREN_WG_BACKEND=kernel, inside the VM): the clients are the
# kernel's own WireGuard instead of wireguard-go.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg turnutils_stunclient conntrack python3
KERNEL_WG=0
if [ "${WARREN_WG_BACKEND:-}" = kernel ]; then
    KERNEL_WG=1
else
    lab_require_cmd wireguard-go
fi
lab_init

SRV_IP=203.0.113.5
WG_PORT=51820

lab_internet
lab_public_host srv "$SRV_IP"
lab_router ropen open 198.51.100.10 203.0.113.65/27
lab_lan_host hopen ropen 203.0.113.66
lab_router rcone cone 198.51.100.11 10.1.0.1/24
lab_lan_host hcone1 rcone 10.1.0.2
lab_lan_host hcone2 rcone 10.1.0.3
lab_router rsym symmetric 198.51.100.12 10.2.0.1/24
lab_lan_host hsym rsym 10.2.0.2

mkdir -p "$LAB_DIR/srv"
# The home-user deployment: one `warren server` runs the coordinator, WG-STUN and plain STUN.
lab_bg srv server.log "$WARREN" server --listen "$SRV_IP:7777" --wgstun-listen "$SRV_IP:3479" --stun-listen "$SRV_IP:3478" \
    --state-dir "$LAB_DIR/srv"
SRV_PID=$LAB_LAST_PID
srv_listening() { lab_exec srv ss -Hlun | grep -q "$SRV_IP:3479" && lab_exec srv ss -Hlun | grep -q "$SRV_IP:3478"; }
lab_wait "warren wgstun listening" 20 srv_listening
[ "$(stat -c %a "$LAB_DIR/srv/wgstun.key")" = 600 ] || lab_fail "server key is not mode 600"

# The stanza `--print-peer` prints is what the clients use, verbatim.
"$WARREN" wgstun --print-peer --listen "$SRV_IP:3479" --state-dir "$LAB_DIR/srv" >"$LAB_DIR/peer.conf"
grep -qx "Endpoint = $SRV_IP:3479" "$LAB_DIR/peer.conf" || lab_fail "stanza endpoint: $(cat "$LAB_DIR/peer.conf")"
grep -qx "AllowedIPs = 100.64.0.4/32" "$LAB_DIR/peer.conf" || lab_fail "stanza AllowedIPs"

declare -A IFN=()
# wg_client NODE INNER_IP: a WireGuard interface (wireguard-go, or the kernel's in the
# kernel tier) with the WG-STUN peer, its address and a route, nothing else.
wg_client() {
    local node=$1 inner=$2 ifn
    ifn=$(lab_ifname "$node")
    IFN[$node]=$ifn
    lab_genkey "$LAB_DIR/$node.key"
    {
        printf '[Interface]\nPrivateKey = %s\nListenPort = %s\n\n' "$(cat "$LAB_DIR/$node.key")" "$WG_PORT"
        cat "$LAB_DIR/peer.conf"
    } >"$LAB_DIR/$node.conf"
    if [ "$KERNEL_WG" = 1 ]; then
        lab_exec "$node" ip link add "$ifn" type wireguard || lab_fail "$node: no kernel WireGuard"
    else
        lab_bg "$node" "wg-$node.log" wireguard-go -f "$ifn"
        lab_wait "wireguard-go $ifn" 10 test -S "/var/run/wireguard/$ifn.sock"
    fi
    lab_exec "$node" wg setconf "$ifn" "$LAB_DIR/$node.conf"
    lab_exec "$node" ip addr add "$inner/32" dev "$ifn"
    lab_exec "$node" ip link set "$ifn" up
    lab_exec "$node" ip route add 100.64.0.4/32 dev "$ifn"
}

# The address turnutils_stunclient reports for DEST from NODE (empty if no answer).
stun_from() {
    lab_exec "$1" timeout 5 turnutils_stunclient "$2" 2>/dev/null | awk '/UDP reflexive addr/ {print $NF; exit}'
}

# Asks WG-STUN until an answer comes (the first waits for the WireGuard handshake).
wgstun_mapped() {
    local node=$1 i out
    for ((i = 0; i < 6; i++)); do
        out=$(stun_from "$node" 100.64.0.4)
        [ -n "$out" ] && {
            echo "$out"
            return 0
        }
    done
    lab_fail "$node: no STUN answer through the tunnel"
}

wg_mapping() { lab_conntrack_mapping "$1" "$2" "$3" "$SRV_IP" 3479; }

expect_mapping() {
    local what=$1 got=$2 want=$3
    [ -n "$want" ] || lab_fail "$what: router has no conntrack entry for the WireGuard port"
    [ "$got" = "$want" ] || lab_fail "$what: WG-STUN said '$got', the router maps the WireGuard port to '$want'"
    lab_log "$what: $got (matches the router)"
}

for n in hopen hcone1 hcone2 hsym; do
    lab_wait "$n reaching the server" 10 lab_exec "$n" ping -c1 -W1 "$SRV_IP"
done
wg_client hopen 100.64.0.10
wg_client hcone1 100.64.0.11
wg_client hcone2 100.64.0.12
wg_client hsym 100.64.0.13

# open: no NAT, the host's own address and port.
expect_mapping open "$(wgstun_mapped hopen)" "203.0.113.66:$WG_PORT"

# cone, two clients with the same listen port: two different, correct mappings.
m1=$(wgstun_mapped hcone1)
m2=$(wgstun_mapped hcone2)
expect_mapping "cone client 1" "$m1" "$(wg_mapping rcone 10.1.0.2 $WG_PORT)"
expect_mapping "cone client 2" "$m2" "$(wg_mapping rcone 10.1.0.3 $WG_PORT)"
[ "$m1" != "$m2" ] || lab_fail "two clients behind one cone got the same mapping $m1"
[ "${m1%:*}" = 198.51.100.11 ] || lab_fail "cone mapping $m1 is not on the router's WAN address"

# symmetric: the mapping towards the WG-STUN server specifically.
ms=$(wgstun_mapped hsym)
expect_mapping symmetric "$ms" "$(wg_mapping rsym 10.2.0.2 $WG_PORT)"

# ICMP echo answers; TCP and UDP to any other port get nothing, not even a reset.
lab_exec hcone1 ping -c1 -W3 100.64.0.4 >/dev/null || lab_fail "ping 100.64.0.4 unanswered"
set +e
lab_exec hcone1 timeout 3 bash -c 'echo > /dev/tcp/100.64.0.4/80' 2>/dev/null
tcp_status=$?
set -e
[ "$tcp_status" -eq 124 ] || lab_fail "TCP to 100.64.0.4:80 was not silently dropped (status $tcp_status)"
udp_probe() {
    lab_exec hcone1 python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(sys.argv[2].encode(), ("100.64.0.4", int(sys.argv[1])))
try:
    s.recvfrom(2048)
    print("answered")
except socket.timeout:
    print("nothing")
PY
}
[ "$(udp_probe 53 hello)" = nothing ] || lab_fail "UDP to 100.64.0.4:53 was answered"
[ "$(udp_probe 3478 not-stun-at-all-here)" = nothing ] || lab_fail "non-STUN UDP to :3478 was answered"

# Plain STUN outside the tunnel: the STUN client's own socket mapping.
plain=$(stun_from hcone1 "$SRV_IP")
[ -n "$plain" ] || lab_fail "plain STUN to $SRV_IP unanswered"
[ "${plain%:*}" = 198.51.100.11 ] || lab_fail "plain STUN mapped to $plain"
# The router's mappings towards the plain STUN port (reply tuple's dport).
plain_ports=$(lab_exec rcone conntrack -L -p udp --orig-src 10.1.0.2 --orig-dst "$SRV_IP" --orig-port-dst 3478 2>/dev/null |
    awk '{ m = 0; for (i = 1; i <= NF; i++) if ($i ~ /^dport=/ && ++m == 2) print substr($i, 7) }')
grep -qx "${plain#*:}" <<<"$plain_ports" || lab_fail "plain STUN answer $plain is not a mapping the router made ($plain_ports)"

# Roaming 1: the client moves its WireGuard port; the next answer follows.
lab_exec hcone1 wg set "${IFN[hcone1]}" listen-port 51821
new_ok() {
    local got want
    got=$(stun_from hcone1 100.64.0.4)
    want=$(wg_mapping rcone 10.1.0.2 51821)
    [ -n "$got" ] && [ "$got" = "$want" ]
}
lab_wait "WG-STUN reporting the mapping of the new port 51821" 20 new_ok
lab_log "roaming (new port): $(stun_from hcone1 100.64.0.4)"

# Roaming 2: the symmetric router forgets the mapping; its next one is new and reported.
lab_exec rsym conntrack -D -p udp --orig-src 10.2.0.2 >/dev/null 2>&1 || true
sym_new_ok() {
    local got want
    got=$(stun_from hsym 100.64.0.4)
    want=$(wg_mapping rsym 10.2.0.2 $WG_PORT)
    [ -n "$got" ] && [ "$got" = "$want" ] && [ "$got" != "$ms" ]
}
lab_wait "WG-STUN reporting the symmetric router's new mapping" 20 sym_new_ok
lab_log "roaming (conntrack flushed): $ms -> $(stun_from hsym 100.64.0.4)"

# The counters saw it all, and the server is still up.
kill -0 "$SRV_PID" || lab_fail "warren wgstun died"
before=$(grep -c 'warren wgstun: sessions=' "$LAB_DIR/server.log" || true)
kill -USR1 "$SRV_PID"
stats_line() { [ "$(grep -c 'warren wgstun: sessions=' "$LAB_DIR/server.log")" -gt "$before" ]; }
lab_wait "stats line after SIGUSR1" 5 stats_line
line=$(grep 'warren wgstun: sessions=' "$LAB_DIR/server.log" | tail -n1)
stat() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$line" | head -n1; }
[ "$(stat sessions)" -ge 4 ] || lab_fail "sessions: $line"
[ "$(stat echo_answered)" -ge 1 ] || lab_fail "echo_answered: $line"
[ "$(stat inner_not_served)" -ge 3 ] || lab_fail "TCP/UDP to other ports not counted: $line"
[ "$(sed -n 's/.*stun: answered=\([0-9]*\).*/\1/p' <<<"$line")" -ge 1 ] || lab_fail "plain STUN not counted: $line"
echo "WG-STUN reports the WireGuard port's mapping behind open, cone (x2) and symmetric NAT; roaming followed"
