#!/usr/bin/env bash
# tiers: lab
# WG-STUN under issue 12's flood: one source that answers every cookie reply
# and creates sessions as fast as the server lets it (one flood process plain,
# one that also asks a STUN question in every session, as a client would),
# while a vanilla WireGuard client (wireguard-go configured with `wg`) that
# was already using the server asks 100.64.0.4 every 2 s. Every question is
# answered within 1 s (one request each, no retransmission), a client that
# first appears during the flood is served after one cookie round, the flood only
# ever replaces its own sessions, so the table holds at most the per-source
# cap for it, and the server stays alive.
#
# The table is 1,024 sessions here (default 4,096) so that an eviction policy
# that let one source push others out would be caught well within the flood:
# before the fix this flood filled 4,096 sessions in seconds.
#
# Env: WGSTUN_FLOOD_SECONDS (default 40).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wireguard-go wg python3
lab_init

SRV_IP=203.0.113.5
CLI_IP=203.0.113.20
LATE_IP=203.0.113.21
WG_PORT=51820
MAX_SESSIONS=1024
PER_SOURCE=64 # the default --max-sessions-per-source
FLOOD_SECONDS=${WGSTUN_FLOOD_SECONDS:-40}
PROBE=$LAB_ROOT/integration/wgstun-probe

lab_internet
lab_public_host srv "$SRV_IP"
lab_public_host atk 198.51.100.50
lab_public_host cli "$CLI_IP"
lab_public_host late "$LATE_IP"

lab_bg srv wgstun.log "$WARREN" wgstun --listen "$SRV_IP:3479" --no-stun --state-dir "$LAB_DIR/srv" \
    --max-sessions "$MAX_SESSIONS"
SRV=$LAB_LAST_PID
listening() { lab_exec srv ss -Hlun | grep -q "$SRV_IP:3479"; }
lab_wait "warren wgstun listening" 20 listening
KEY=$("$WARREN" wgstun --print-peer --listen "$SRV_IP:3479" --state-dir "$LAB_DIR/srv" | awk '/^PublicKey/ {print $3}')

# stats: sends SIGUSR1, waits for the new stats line and prints it (one snapshot of every counter).
stats() {
    local log=$LAB_DIR/wgstun.log before
    before=$(grep -c 'warren wgstun: sessions=' "$log" || true)
    kill -USR1 "$SRV"
    newline() { [ "$(grep -c 'warren wgstun: sessions=' "$log")" -gt "$before" ]; }
    lab_wait "stats line" 5 newline
    grep 'warren wgstun: sessions=' "$log" | tail -n1
}
# counter NAME LINE: counter NAME from a stats line.
counter() { sed -n "s/.*[ :]$1=\([0-9]*\).*/\1/p" <<<"$2" | head -n1; }

# wg_client NODE INNER_IP: wireguard-go with the WG-STUN peer, as `--print-peer` describes it.
wg_client() {
    local node=$1 ifn
    ifn=$(lab_ifname "$node")
    lab_genkey "$LAB_DIR/$node.key"
    lab_bg "$node" "wg-$node.log" wireguard-go -f "$ifn"
    lab_wait "wireguard-go $ifn" 10 test -S "/var/run/wireguard/$ifn.sock"
    lab_exec "$node" wg set "$ifn" private-key "$LAB_DIR/$node.key" listen-port "$WG_PORT" \
        peer "$KEY" endpoint "$SRV_IP:3479" allowed-ips 100.64.0.4/32
    lab_exec "$node" ip addr add "$2/32" dev "$ifn"
    lab_exec "$node" ip link set "$ifn" up
    lab_exec "$node" ip route add 100.64.0.4/32 dev "$ifn"
}
wg_client cli 100.64.0.20
served() { lab_exec cli "$PROBE" --seconds 0.1 --deadline 2 --expect "$CLI_IP:$WG_PORT" | grep -q '^queries=1 answered=1 .* wrong=0'; }
lab_wait "the client served before the flood" 30 served

lab_bg atk flood.log "$WARREN" wgstun-load proving-flood --server "$SRV_IP:3479" --key "$KEY" --seconds "$FLOOD_SECONDS"
FLOOD=$LAB_LAST_PID
lab_bg atk flood-ask.log "$WARREN" wgstun-load proving-flood --server "$SRV_IP:3479" --key "$KEY" --ask \
    --seconds "$FLOOD_SECONDS"
FLOOD_ASK=$LAB_LAST_PID
# Underway: the flood has created twice its share of sessions.
churning() { [ "$(counter created "$(stats)")" -gt $((2 * PER_SOURCE)) ]; }
lab_wait "the flood creating sessions" 30 churning

# A second client that first appears during the flood: everyone must prove
# their address now, so its first handshake gets a cookie reply and
# wireguard-go's retry (5 s later) carries the proof.
wg_client late 100.64.0.21
lab_bg late probe-late.log "$PROBE" --seconds "$((FLOOD_SECONDS - 15))" --interval 1 --deadline 1 \
    --expect "$LATE_IP:$WG_PORT"
PROBE_LATE=$LAB_LAST_PID
probe_out=$(lab_exec cli "$PROBE" --seconds "$((FLOOD_SECONDS - 10))" --interval 2 --deadline 1 \
    --expect "$CLI_IP:$WG_PORT")
lab_log "probe during the flood:"$'\n'"$probe_out"
kill -0 "$FLOOD" 2>/dev/null && kill -0 "$FLOOD_ASK" 2>/dev/null ||
    lab_fail "the flood ended before the probe did: $(cat "$LAB_DIR/flood.log" "$LAB_DIR/flood-ask.log")"
kill -0 "$SRV" || lab_fail "warren wgstun died"

summary=$(tail -n1 <<<"$probe_out")
field() { sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" <<<"$summary"; }
queries=$(field queries) answered=$(field answered) wrong=$(field wrong)
[ "$queries" -ge 10 ] || lab_fail "only $queries queries during the flood"
[ "$answered" = "$queries" ] || lab_fail "$((queries - answered)) of $queries questions got no answer within 1 s during the flood"
[ "$wrong" = 0 ] || lab_fail "$wrong answers carried a wrong address"

wait "$PROBE_LATE" || true
late=$(tail -n1 "$LAB_DIR/probe-late.log")
lab_log "late client: $late"
[ "$(sed -n 's/.*answered=\([0-9]*\).*/\1/p' <<<"$late")" -ge 10 ] ||
    lab_fail "a client starting during the flood was not served: $(cat "$LAB_DIR/probe-late.log")"
[ "$(sed -n 's/.*wrong=\([0-9]*\).*/\1/p' <<<"$late")" = 0 ] || lab_fail "the late client got a wrong address: $late"

line=$(stats)
sessions=$(counter sessions "$line") created=$(counter created "$line")
evicted=$(counter evicted "$line") evicted_own=$(counter evicted_at_source_cap "$line")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$SRV/status")
lab_log "server: sessions=$sessions created=$created evicted=$evicted evicted_at_source_cap=$evicted_own peak RSS ${hwm} kB"
# The flood really made sessions, several times its share over...
[ "$created" -gt $((3 * PER_SOURCE)) ] || lab_fail "the flood created only $created sessions: it did not test much"
# ...yet held at most its cap, and every eviction was one of its own.
[ "$sessions" -le $((PER_SOURCE + 2)) ] || lab_fail "$sessions sessions: one source holds more than its cap of $PER_SOURCE"
[ "$evicted" = "$evicted_own" ] || lab_fail "$((evicted - evicted_own)) evictions of another source's sessions"
echo "a real client got all $queries answers within 1 s (worst $(field worst_ms) ms) while one source created $created sessions; it held at most $PER_SOURCE, peak RSS $((hwm / 1024)) MB"
