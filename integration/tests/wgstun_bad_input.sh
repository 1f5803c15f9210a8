#!/usr/bin/env bash
# tiers: lab
# WG-STUN under bad input: random UDP, truncated and forged handshakes, data
# for unknown sessions, malformed STUN, a plain STUN flood from many ports,
# and floods of genuine handshake initiations from thousands of fresh keys
# over many source ports. Everything is dropped and counted, cookie replies
# engage, the session table stays at its bound (past it, initiators that do
# not prove their address evict nobody), memory stays flat once the table is
# full, and a real wireguard-go client is served in the middle of a handshake
# flood (it answers the cookie reply, as WireGuard does).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wireguard-go wg turnutils_stunclient python3
lab_init

SRV_IP=203.0.113.5
BOUNDED_MAX=500

lab_internet
lab_public_host srv "$SRV_IP"
lab_public_host atk 198.51.100.50
lab_public_host cli 203.0.113.20

# A: defaults but a low handshake rate, so cookies engage quickly.
# B: cookies off (huge rates, per-source limits lifted: the one attacker address
# stands for many), a small table, so only the table's own rules bound it.
lab_bg srv wgstun-a.log "$WARREN" wgstun --listen "$SRV_IP:3479" --stun-listen "$SRV_IP:3478" \
    --state-dir "$LAB_DIR/a" --handshake-rate 50 --stun-rate 20
PID_A=$LAB_LAST_PID
lab_bg srv wgstun-b.log "$WARREN" wgstun --listen "$SRV_IP:4479" --no-stun --state-dir "$LAB_DIR/b" \
    --handshake-rate 100000000 --source-handshake-rate 100000000 --max-sessions "$BOUNDED_MAX" \
    --max-sessions-per-source "$BOUNDED_MAX"
PID_B=$LAB_LAST_PID
listening() { lab_exec srv ss -Hlun | grep -q "$SRV_IP:$1"; }
lab_wait "server A listening" 20 listening 3479
lab_wait "server A STUN listening" 20 listening 3478
lab_wait "server B listening" 20 listening 4479
KEY_A=$("$WARREN" wgstun --print-peer --listen "$SRV_IP:3479" --state-dir "$LAB_DIR/a" | awk '/^PublicKey/ {print $3}')
KEY_B=$("$WARREN" wgstun --print-peer --listen "$SRV_IP:4479" --state-dir "$LAB_DIR/b" | awk '/^PublicKey/ {print $3}')

# stat LOG NAME: send SIGUSR1, wait for a new stats line, print counter NAME from it.
stat() {
    local pid=$1 log=$LAB_DIR/$2 name=$3 before line
    before=$(grep -c 'warren wgstun: sessions=' "$log" || true)
    kill -USR1 "$pid"
    newline() { [ "$(grep -c 'warren wgstun: sessions=' "$log")" -gt "$before" ]; }
    lab_wait "stats line in $log" 5 newline
    line=$(grep 'warren wgstun: sessions=' "$log" | tail -n1)
    sed -n "s/.*[ :]$name=\([0-9]*\).*/\1/p" <<<"$line" | head -n1
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# 1. Junk at the WireGuard port and at the STUN port, from many source ports.
lab_exec atk python3 - "$SRV_IP" <<'PY'
import os, random, socket, struct, sys
srv = sys.argv[1]
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
def send(port, data, i):
    socks[i % len(socks)].sendto(data, (srv, port))
for i in range(3000):
    send(3479, os.urandom(random.randint(0, 300)), i)                       # random UDP
    send(3479, b"\x01\x00\x00\x00" + os.urandom(random.randint(0, 143)), i)  # truncated initiation
    send(3479, b"\x01\x00\x00\x00" + os.urandom(144), i)                    # forged initiation (bad mac1)
    send(3479, b"\x04\x00\x00\x00" + os.urandom(60), i)                     # data for no session
    send(3479, b"\x02\x00\x00\x00" + os.urandom(88), i)                     # unsolicited response
tid = os.urandom(12)
hdr = lambda t, l: struct.pack("!HHI", t, l, 0x2112A442) + tid
for i in range(500):
    send(3478, os.urandom(random.randint(0, 100)), i)                       # not STUN
    send(3478, hdr(1, 8) + b"\x80\x22\x00\x04abcd" + b"xx", i)              # length mismatch
    send(3478, hdr(1, 8) + b"\x80\x22\x7f\xffabcd", i)                      # attribute overrun
    send(3478, hdr(1, 8) + b"\x80\x28\x00\x04\xde\xad\xbe\xef", i)          # wrong FINGERPRINT
    send(3478, hdr(0x101, 0), i)                                            # a response, not a request
for i in range(2000):
    send(3478, hdr(1, 0), i)                                                # valid, but a flood
PY

# 2. Genuine initiations from 3000 fresh keys over 200 ports: cookies engage on A.
flood_a=$(lab_exec atk "$WARREN" wgstun-load flood --server "$SRV_IP:3479" --key "$KEY_A" --count 3000 --ports 200)
lab_log "flood A: $flood_a"
cookies_seen=$(sed -n 's/.*cookie_replies=\([0-9]*\).*/\1/p' <<<"$flood_a")
[ "$cookies_seen" -gt 0 ] || lab_fail "no cookie reply reached the flooder: $flood_a"

# 3. The same against B twice: the table fills to its bound. Past it, a new
#    session would cost someone theirs, so every initiator must prove its
#    address first: the second flood (it never answers cookies) gets cookie
#    replies, evicts nobody, and memory stays flat.
lab_log "flood B: $(lab_exec atk "$WARREN" wgstun-load flood --server "$SRV_IP:4479" --key "$KEY_B" --count 3000 --ports 200)"
full() { [ "$(stat "$PID_B" wgstun-b.log sessions)" -eq "$BOUNDED_MAX" ]; }
lab_wait "server B's table full at $BOUNDED_MAX sessions" 30 full
rss1=$(rss_kb "$PID_B")
c1=$(stat "$PID_B" wgstun-b.log cookie_replies)
lab_log "flood B: $(lab_exec atk "$WARREN" wgstun-load flood --server "$SRV_IP:4479" --key "$KEY_B" --count 3000 --ports 200)"
# UDP drops much of a flood at a busy socket (rcvbuf); 800 answered initiations are plenty.
handled() { [ "$(stat "$PID_B" wgstun-b.log cookie_replies)" -ge $((c1 + 800)) ]; }
lab_wait "server B handling the second flood" 60 handled
rss2=$(rss_kb "$PID_B")
sessions_b=$(stat "$PID_B" wgstun-b.log sessions)
evicted_b=$(stat "$PID_B" wgstun-b.log evicted)
lab_log "server B: sessions=$sessions_b evicted=$evicted_b rss ${rss1} kB -> ${rss2} kB"
[ "$sessions_b" -eq "$BOUNDED_MAX" ] || lab_fail "server B holds $sessions_b sessions, bound is $BOUNDED_MAX"
[ "$evicted_b" -eq 0 ] || lab_fail "server B evicted $evicted_b sessions for initiators that never proved their address"
# Flat: 3000 more initiations may not grow it by more than 10 % + 1 MB.
[ "$rss2" -le $((rss1 + rss1 / 10 + 1024)) ] || lab_fail "server B grew from ${rss1} kB to ${rss2} kB with a full table"

# 4. Every kind of junk was counted on A, and A is alive.
kill -0 "$PID_A" || lab_fail "server A died"
kill -0 "$PID_B" || lab_fail "server B died"
for c in not_wireguard bad_mac unknown_session cookie_replies malformed bad_fingerprint ignored rate_limited; do
    v=$(stat "$PID_A" wgstun-a.log "$c")
    lab_log "server A $c=$v"
    [ "${v:-0}" -gt 0 ] || lab_fail "server A did not count $c"
done
[ "$(stat "$PID_A" wgstun-a.log sessions)" -le 4096 ] || lab_fail "server A exceeded its default session bound"

# 5. A real client is served by A while a handshake flood goes on: A demands cookies
#    from everyone, and wireguard-go answers its cookie reply and gets through.
cookies_before=$(stat "$PID_A" wgstun-a.log cookie_replies)
lab_bg atk flood-bg.log "$WARREN" wgstun-load flood --server "$SRV_IP:3479" --key "$KEY_A" --count 100000000 --ports 100
FLOOD_PID=$LAB_LAST_PID
flooding() { [ "$(stat "$PID_A" wgstun-a.log cookie_replies)" -gt $((cookies_before + 200)) ]; }
lab_wait "cookie replies to the background flood" 30 flooding
lab_genkey "$LAB_DIR/cli.key"
IFN=$(lab_ifname cli)
lab_bg cli wg-cli.log wireguard-go -f "$IFN"
lab_wait "wireguard-go $IFN" 10 test -S "/var/run/wireguard/$IFN.sock"
lab_exec cli wg set "$IFN" private-key "$LAB_DIR/cli.key" listen-port 51820 \
    peer "$KEY_A" endpoint "$SRV_IP:3479" allowed-ips 100.64.0.4/32
lab_exec cli ip addr add 100.64.0.20/32 dev "$IFN"
lab_exec cli ip link set "$IFN" up
lab_exec cli ip route add 100.64.0.4/32 dev "$IFN"
served() { lab_exec cli timeout 5 turnutils_stunclient 100.64.0.4 2>/dev/null | grep -q "reflexive addr: 203.0.113.20:51820"; }
lab_wait "a real client served during the flood" 60 served
kill -0 "$FLOOD_PID" || lab_fail "the background flood ended early: $(cat "$LAB_DIR/flood-bg.log")"
kill "$FLOOD_PID"
kill -0 "$PID_A" || lab_fail "server A died"
echo "junk counted, cookies engaged and a real client got through them, table bounded at $BOUNDED_MAX with flat memory (${rss1} -> ${rss2} kB), clients still served"
