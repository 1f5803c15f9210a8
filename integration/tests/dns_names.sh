#!/usr/bin/env bash
# tiers: lab
# Names: a coordinator and three agents on public hosts. Asked with dig over
# the mesh, an agent answers A for every node (itself included) and PTR for
# mesh addresses, NXDOMAIN for unknown names in the domain, REFUSED for
# anything else, NOERROR/empty for AAAA; nothing on its WAN address. A
# rename and a removal are answered within 2 s. A flood from one node gets
# at most the per-source budget answered. Each agent's hosts-file block
# lists every node, leaves other lines alone, and goes on a clean stop and
# on `warren down`.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg dig python3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.10
lab_public_host b 203.0.113.20
lab_public_host c 203.0.113.30

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --expires 1h --state-dir "$SRV_DIR")

HOSTS_OTHER=$'127.0.0.1\tlocalhost\n# kept by someone else\n10.9.9.9 printer.lan printer\n'
declare -A IFN=() PID=() ADDR=() NAME=([a]=nas [b]=laptop [c]=pi)
sock() { echo "$LAB_DIR/$1/warren.sock"; }
hosts() { echo "$LAB_DIR/hosts-$1"; }
for n in a b c; do
    IFN[$n]=$(lab_ifname "$n")
    printf '%s' "$HOSTS_OTHER" >"$(hosts "$n")"
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IFN[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "${NAME[$n]}" --hosts-file "$(hosts "$n")"
    PID[$n]=$LAB_LAST_PID
done
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
has_peers() { [ "$(st "$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))')" = "$2" ]; }
for n in a b c; do
    lab_wait "$n joined with two peers" 30 has_peers "$n" 2
    ADDR[$n]=$(st "$n" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"])')
done
echo "mesh addresses: nas=${ADDR[a]} laptop=${ADDR[b]} pi=${ADDR[c]}"
lab_wait "b reaches a over the mesh" 30 lab_exec b ping -c1 -W1 "${ADDR[a]}"

# dig FROM SERVER ARGS...: one try, one second, the full answer.
q() {
    local from=$1 server=$2
    shift 2
    lab_exec "$from" dig +time=1 +tries=1 +norecurse "@$server" "$@"
}
short() { q "$@" +short; }
status_of() { q "$@" | sed -n 's/.*status: \([A-Z]*\).*/\1/p'; }
answers_are() {
    local want=$1
    shift
    [ "$(short "$@")" = "$want" ]
}
status_is() {
    local want=$1
    shift
    [ "$(status_of "$@")" = "$want" ]
}

# Over the mesh, from b, to a's name server: every node, a itself included.
lab_wait "a's name server answers over the mesh" 20 answers_are "${ADDR[a]}" b "${ADDR[a]}" nas.warren
answers_are "${ADDR[b]}" b "${ADDR[a]}" laptop.warren || lab_fail "laptop.warren: $(short b "${ADDR[a]}" laptop.warren)"
answers_are "${ADDR[c]}" b "${ADDR[a]}" PI.Warren || lab_fail "PI.Warren (any case): $(short b "${ADDR[a]}" PI.Warren)"
answers_are "pi.warren." b "${ADDR[a]}" -x "${ADDR[c]}" || lab_fail "PTR of ${ADDR[c]}: $(short b "${ADDR[a]}" -x "${ADDR[c]}")"
status_is NXDOMAIN b "${ADDR[a]}" printer.warren || lab_fail "unknown name: $(status_of b "${ADDR[a]}" printer.warren)"
status_is REFUSED b "${ADDR[a]}" example.com || lab_fail "example.com: $(status_of b "${ADDR[a]}" example.com)"
status_is REFUSED b "${ADDR[a]}" -x 203.0.113.5 || lab_fail "a foreign PTR: $(status_of b "${ADDR[a]}" -x 203.0.113.5)"
status_is NOERROR b "${ADDR[a]}" nas.warren AAAA || lab_fail "AAAA: $(status_of b "${ADDR[a]}" nas.warren AAAA)"
[ -z "$(short b "${ADDR[a]}" nas.warren AAAA)" ] || lab_fail "AAAA answered with a record"
# Each node answers for itself too, and every agent answers the same.
answers_are "${ADDR[a]}" c "${ADDR[c]}" nas.warren || lab_fail "c's own name server: $(short c "${ADDR[c]}" nas.warren)"
# Never on a WAN address.
if out=$(q b 203.0.113.10 nas.warren 2>&1) && grep -q "status:" <<<"$out"; then
    lab_fail "a answers DNS on its WAN address: $out"
fi

# The hosts-file block: every node, the other lines untouched.
block_has() { grep -q "^$2	$3.warren$" "$(hosts "$1")"; }
for n in a b c; do
    for m in a b c; do lab_wait "$n's hosts file lists ${NAME[$m]}" 5 block_has "$n" "${ADDR[$m]}" "${NAME[$m]}"; done
    head -c "${#HOSTS_OTHER}" "$(hosts "$n")" | cmp -s - <(printf '%s' "$HOSTS_OTHER") ||
        lab_fail "$n's hosts file lost its other lines: $(cat "$(hosts "$n")")"
done
cat "$(hosts a)"

# A rename is answered within 2 s, the old name is gone.
lab_exec srv "$WARREN" server rename pi camera --state-dir "$SRV_DIR" >/dev/null
lab_wait "camera.warren answered after the rename" 2 answers_are "${ADDR[c]}" b "${ADDR[a]}" camera.warren
status_is NXDOMAIN b "${ADDR[a]}" pi.warren || lab_fail "old name after the rename: $(status_of b "${ADDR[a]}" pi.warren)"
answers_are "camera.warren." b "${ADDR[a]}" -x "${ADDR[c]}" || lab_fail "PTR after the rename"
lab_wait "a's hosts file has the new name" 2 block_has a "${ADDR[c]}" camera
grep -q "pi.warren" "$(hosts a)" && lab_fail "a's hosts file keeps the old name"

# A flood from one node: at most the per-source budget (burst 200 + 100/s) is answered.
flood=$(lab_exec b python3 - "${ADDR[a]}" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
q = bytes(12) + b"\x03nas\x06warren\x00\x00\x01\x00\x01"
start = time.monotonic()
sent = 0
for i in range(3000):
    try:
        s.sendto(i.to_bytes(2, "big") + b"\x01\x00\x00\x01" + q[6:], (sys.argv[1], 53))
        sent += 1
    except BlockingIOError:
        pass
s.settimeout(1.0)
got = 0
try:
    while True:
        s.recv(512)
        got += 1
except socket.timeout:
    pass
print(sent, got, f"{time.monotonic() - start - 1.0:.2f}")
PY
)
read -r sent got secs <<<"$flood"
echo "flood: sent $sent, answered $got in ${secs}s"
limit=$(awk -v s="$secs" 'BEGIN { printf "%d", 200 + 100 * (s + 1) + 10 }')
[ "$got" -ge 1 ] || lab_fail "the flood got no answer at all"
[ "$got" -le "$limit" ] || lab_fail "the flood got $got answers, more than the budget ($limit)"
lab_wait "the agent reports the dropped queries" 15 grep -q "over the per-source limit" "$LAB_DIR/agent-a.log"
# Another node is unaffected.
answers_are "${ADDR[a]}" c "${ADDR[a]}" nas.warren || lab_fail "c is refused after b's flood"

# Removal: NXDOMAIN within 2 s, and out of the hosts block.
lab_exec srv "$WARREN" server remove camera --state-dir "$SRV_DIR" >/dev/null
lab_wait "camera.warren is NXDOMAIN after the removal" 2 status_is NXDOMAIN b "${ADDR[a]}" camera.warren
not_in_hosts() { ! grep -q "camera.warren" "$(hosts a)"; }
lab_wait "camera is out of a's hosts file" 2 not_in_hosts

# A clean stop and `warren down` take the block away, leaving the rest.
no_block() { ! grep -q "BEGIN warren" "$(hosts "$1")"; }
kill -TERM "${PID[a]}"
lab_wait "agent a exited" 10 bash -c "! kill -0 ${PID[a]} 2>/dev/null"
no_block a || lab_fail "a's hosts block survived a clean stop: $(cat "$(hosts a)")"
cmp -s "$(hosts a)" <(printf '%s' "$HOSTS_OTHER") || lab_fail "a's hosts file changed outside the block"
lab_exec b "$WARREN" down --socket "$(sock b)" >/dev/null
lab_wait "b's agent exits after down" 10 bash -c "! kill -0 ${PID[b]} 2>/dev/null"
no_block b || lab_fail "b's hosts block survived warren down: $(cat "$(hosts b)")"
cmp -s "$(hosts b)" <(printf '%s' "$HOSTS_OTHER") || lab_fail "b's hosts file changed outside the block"
echo "dns_names: ok"
