#!/usr/bin/env bash
# tiers: lab
# The lab's UPnP router (lab_upnp: a cone NAT running Debian's miniupnpd)
# really forwards: a LAN host maps a UDP port with miniupnpc's `upnpc`, a host
# on the internet reaches it through the router's WAN address, and after the
# mapping is deleted the forward is gone. Without the mapping, the same packet
# is dropped (the router still filters unsolicited inbound).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd turnserver miniupnpd upnpc python3
lab_init

lab_upnp_site
lab_lan_host a rupnp 10.1.0.2

# A UDP listener on the LAN host that logs every datagram it gets.
cat >"$LAB_DIR/recv.py" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.1.0.2", 40000))
while True:
    data, addr = s.recvfrom(2048)
    print(data.decode(), addr[0], flush=True)
EOF
lab_bg a recv.log python3 "$LAB_DIR/recv.py"
send() { lab_exec stun python3 -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'$1', ('198.51.100.20', 40000))"; }
received() {
    send "$1"
    grep -q "^$1 203.0.113.5" "$LAB_DIR/recv.log"
}

# Before any mapping: filtered.
for i in 1 2 3; do send "early$i"; done
lab_wait "the listener to be up" 5 bash -c "ip netns exec $(lab_ns a) ss -Hlun | grep -q 10.1.0.2:40000"
send early4
lab_exec a ping -c1 -W1 10.1.0.1 >/dev/null # a round trip, so anything in flight has landed
if grep -q early "$LAB_DIR/recv.log"; then lab_fail "unsolicited UDP reached the LAN host without a mapping"; fi

out=$(lab_exec a upnpc -i -e warren-lab -a 10.1.0.2 40000 40000 UDP 2>&1) || lab_fail "upnpc -a failed: $out"
grep -q 'external 198.51.100.20:40000 UDP is redirected to internal 10.1.0.2:40000' <<<"$out" ||
    lab_fail "upnpc did not report the mapping: $out"
lab_exec a upnpc -i -l 2>&1 | grep -q '40000->10.1.0.2:40000' || lab_fail "upnpc -l does not list the mapping"
lab_wait "a datagram from the internet through the UPnP mapping" 5 received mapped

out=$(lab_exec a upnpc -i -d 40000 UDP 2>&1) || lab_fail "upnpc -d failed: $out"
if lab_exec rupnp nft list chain inet miniupnpd prerouting_upnp | grep -q 'dport 40000'; then
    lab_fail "the forward is still in the router after deleting the mapping"
fi
echo "miniupnpd router maps, forwards and unmaps"
