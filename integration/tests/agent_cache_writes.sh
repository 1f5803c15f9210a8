#!/usr/bin/env bash
# tiers: lab
# Flash-friendly state (routers keep /etc on flash): node a keeps its key in
# a state directory and its peer map in a separate cache directory
# (--cache-dir, as OpenWrt's /tmp/warren). Peer b is renamed 50 times through
# the coordinator's admin command; a sees every name in turn, yet its cache
# file is replaced at most once per 30 s meanwhile and its identity file not at all
# (each write is an atomic rename, counted with inotifywait). A clean stop
# (SIGTERM) writes the latest map: the cache then holds b's last name, and a
# restart with the coordinator gone restores b under that name from it.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3 inotifywait
lab_init

RENAMES=50
# At most one write per 30 s (src/agent/cache.rs, MAP_WRITE_INTERVAL): the
# bound is taken from how long the renames took (on a loaded machine, and with
# the coordinator pacing deltas, longer than one interval), plus the one write
# a first change after a quiet spell makes at once and one more at the edge
# of an interval. Without coalescing, 50.
MAP_WRITE_INTERVAL_S=30

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.21
lab_public_host b 203.0.113.22
SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
SRV_PID=$LAB_LAST_PID
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")
(umask 077 && printf '%s\n' "$token" >"$LAB_DIR/token")

STATE_A=$LAB_DIR/a-state
CACHE_A=$LAB_DIR/a-tmp/warren
sock() { echo "$LAB_DIR/$1.sock"; }
start_a() {
    lab_bg a agent-a.log "$WARREN" agent --state-dir "$STATE_A" --cache-dir "$CACHE_A" \
        --interface "$(lab_ifname a)" --socket "$(sock a)" --port 51820 --join-file "$LAB_DIR/token" --name node-a
    PID_A=$LAB_LAST_PID
}
start_a
lab_bg b agent-b.log "$WARREN" agent --state-dir "$LAB_DIR/b-state" --interface "$(lab_ifname b)" \
    --socket "$(sock b)" --port 51820 --join-file "$LAB_DIR/token" --name b0
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
peer_name() { st a | python3 -c 'import json,sys; p=json.load(sys.stdin)["peers"]; print(p[0]["name"] if len(p) == 1 else "")'; }
named() { [ "$(peer_name)" = "$1" ]; }
lab_wait "a sees b as b0" 30 named b0
[ -f "$STATE_A/agent.json" ] || lab_fail "no identity file in the state directory"
[ -f "$CACHE_A/peers.json" ] || lab_fail "no peer map in the cache directory"
[ ! -e "$STATE_A/peers.json" ] || lab_fail "the peer map went to the state directory"
id_inode=$(stat -c %i "$STATE_A/agent.json")

# Every replacement of either file is a rename onto its name.
inotifywait -m -e moved_to,close_write --format '%w%f %e' "$STATE_A" "$CACHE_A" \
    >"$LAB_DIR/writes" 2>"$LAB_DIR/inotify.err" &
INOTIFY_PID=$!
LAB_PIDS+=("$INOTIFY_PID")
lab_wait "inotifywait watching" 10 grep -q "Watches established" "$LAB_DIR/inotify.err"

prev=b0
renames_start=$(date +%s)
for i in $(seq 1 "$RENAMES"); do
    lab_exec srv "$WARREN" server rename "$prev" "b$i" --state-dir "$SRV_DIR" >/dev/null
    lab_wait "a sees rename $i (b$i)" 30 named "b$i"
    prev=b$i
done
renames_s=$(( $(date +%s) - renames_start ))
MAX_MAP_WRITES=$(( 2 + renames_s / MAP_WRITE_INTERVAL_S ))
map_writes=$(grep -c "/peers.json MOVED_TO" "$LAB_DIR/writes" || true)
id_writes=$(grep -c "/agent.json MOVED_TO" "$LAB_DIR/writes" || true)
echo "during $RENAMES renames ($renames_s s): peers.json replaced $map_writes times (bound $MAX_MAP_WRITES), agent.json $id_writes times"
[ "$id_writes" -eq 0 ] || lab_fail "the identity file was rewritten $id_writes times by peers' renames"
[ "$map_writes" -le "$MAX_MAP_WRITES" ] ||
    lab_fail "$RENAMES renames replaced the peer map $map_writes times (at most $MAX_MAP_WRITES)"

# A clean stop writes the latest map.
lab_stop "$PID_A"
grep -q "agent: stopping on SIGTERM" "$LAB_DIR/agent-a.log" || lab_fail "a did not stop cleanly: $(tail -5 "$LAB_DIR/agent-a.log")"
cached=$(python3 -c 'import json,sys; print(",".join(p["name"] for p in json.load(open(sys.argv[1]))["peers"]))' "$CACHE_A/peers.json")
echo "peer map after the stop: $cached"
[ "$cached" = "b$RENAMES" ] || lab_fail "after a clean stop the cache holds '$cached', not b$RENAMES"
[ "$(stat -c %i "$STATE_A/agent.json")" = "$id_inode" ] || lab_fail "the identity file was rewritten by the stop"

# Restarted with the coordinator gone, a has b from the cache under its last name.
lab_stop "$SRV_PID"
start_a
lab_wait "a restored b$RENAMES from the cache" 30 named "b$RENAMES"
echo "restarted without the coordinator: a has b$RENAMES from the cache"
