#!/usr/bin/env bash
# tiers: lab
# A stranger's flood cannot keep a new node off its relay (issue 12, item 2):
# ten source addresses each hold 128 connections that never handshake
# (reopening those the relay closes) and open and drop connections as fast as
# they can. While that runs, two new nodes (`warren relay-load echo` and
# `ping`, real Noise clients) each register with the real `warren relay`
# within 5 s and every datagram between them goes through; the flood was
# refused and pushed out of the pending pool, never into client slots.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_init

REGISTER_BOUND_MS=5000
lab_new_ns r
KEY=$("$WARREN" relay --state-dir "$LAB_DIR/relay" --show-key)
lab_bg r relay.log "$WARREN" relay --listen 127.0.0.1:7778 --state-dir "$LAB_DIR/relay"
RELAY=$LAB_LAST_PID
listening() { lab_exec r ss -Hltn | grep -q "127.0.0.1:7778 "; }
lab_wait "relay listening" 20 listening

sources=()
for i in $(seq 1 10); do sources+=(--source "127.0.1.$i"); done
lab_bg r flood.out "$WARREN" relay-load flood --relay 127.0.0.1:7778 "${sources[@]}" --hold 128 --seconds 60
FLOOD=$LAB_LAST_PID
# At full strength: every source has opened its 128 (more than the relay's
# 700 slots in all), and the relay has refused or closed thousands.
holding() { grep -q '^holding=' "$LAB_DIR/flood.out"; }
lab_wait "the flood holds its connections" 30 holding
flooded() {
    grep -Eq 'refused ([0-9]{4,}) connections|closed ([0-9]{4,}) before registering' "$LAB_DIR/relay.log"
}
lab_wait "the relay refusing the flood" 30 flooded

lab_bg r echo.out "$WARREN" relay-load echo --relay 127.0.0.1:7778 --key "$KEY" --seconds 40
echo_up() { grep -q '^key=' "$LAB_DIR/echo.out"; }
lab_poll 20 echo_up || lab_fail "the echo node did not register during the flood: $(cat "$LAB_DIR/echo.out")"
ECHO_KEY=$(sed -n 's/^key=\([^ ]*\).*/\1/p' "$LAB_DIR/echo.out")
echo_ms=$(sed -n 's/.* registered_ms=\([0-9]*\).*/\1/p' "$LAB_DIR/echo.out")
ping_out=$(lab_exec r "$WARREN" relay-load ping --relay 127.0.0.1:7778 --key "$KEY" --to "$ECHO_KEY" --count 10 2>&1) ||
    lab_fail "the ping node could not register during the flood: $ping_out"
lab_log "echo registered in ${echo_ms} ms; ping: $ping_out"
kill -0 "$FLOOD" 2>/dev/null || lab_fail "the flood ended before the new nodes were done: $(cat "$LAB_DIR/flood.out")"
ping_ms=$(sed -n 's/.*registered_ms=\([0-9]*\).*/\1/p' <<<"$ping_out")
[ "$echo_ms" -le "$REGISTER_BOUND_MS" ] || lab_fail "echo node took ${echo_ms} ms to register"
[ "$ping_ms" -le "$REGISTER_BOUND_MS" ] || lab_fail "ping node took ${ping_ms} ms to register"
grep -q 'sent=10 received=10 ' <<<"$ping_out" || lab_fail "datagrams lost through the relay: $ping_out"

kill "$FLOOD"
wait "$FLOOD" 2>/dev/null || true
kill -0 "$RELAY" 2>/dev/null || lab_fail "the relay died"
summary=$(grep 'pushed out of the pending pool' "$LAB_DIR/relay.log" | tail -n1)
lab_log "relay: $summary"
# The strangers never registered: the relay logs a line per registered client only.
registered=$(grep -c ' connected from ' "$LAB_DIR/relay.log" || true)
[ "$registered" -eq 2 ] || lab_fail "expected 2 registrations (echo, ping), the relay logged $registered"
lines=$(wc -l <"$LAB_DIR/relay.log")
[ "$lines" -le 30 ] || lab_fail "the flood made the relay log $lines lines"
echo "relay_flood: ok (registered in ${echo_ms} and ${ping_ms} ms during the flood)"
