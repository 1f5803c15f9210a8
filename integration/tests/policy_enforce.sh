#!/usr/bin/env bash
# tiers: lab kernel
# Permissions with real traffic: a coordinator and three agents (nas, laptop,
# pi; laptop-2 joins later). With no policy every node reaches every port and no agent has a
# warren_filter table. With "tag:nas accepts tcp/22 from tag:laptop" (and
# "tag:laptop accepts tcp/9000 from tag:nas"): laptop -> nas:22 connects,
# laptop -> nas:8080 and pi -> nas:22 are refused (a reset: no connection,
# though a listener is there), nas -> laptop:9000 connects (its replies pass
# nas's firewall by conntrack). Each change takes effect within 2 s of `set`
# returning; a connection opened before the changes carries data after them.
# A bad file is refused with its line and the old policy keeps working.
# `policy clear` removes the table on every agent; a clean stop removes it too.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.10
lab_public_host b 203.0.113.20
lab_public_host c 203.0.113.30

# nft's first use loads nf_tables' modules (conntrack, reject, sets): seconds
# in the kernel tier's emulated VM, where it ran into the agent's 5 s bound
# for one nft run. Load them once here, with the expressions the agent uses.
lab_new_ns warm
warm_start=$(date +%s.%N)
lab_exec warm nft -f - <<'NFT'
table inet warm {
  set s { type ipv4_addr; elements = { 100.64.0.8 } }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "lo" jump c
  }
  chain c {
    ct state established,related accept
    ct state invalid drop
    ip saddr @s tcp dport 22 accept
    ip daddr { 10.0.0.0/8 } meta l4proto icmp accept
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }
}
NFT
echo "nft's first run took $(awk -v a="$warm_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s"

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --expires 1h --state-dir "$SRV_DIR")
policy() { lab_exec srv "$WARREN" server policy "$@" --state-dir "$SRV_DIR"; }

declare -A IFN=() PID=() ADDR=() NAME=([a]=nas [b]=laptop [c]=pi)
sock() { echo "$LAB_DIR/$1/warren.sock"; }
for n in a b c; do
    IFN[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IFN[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "${NAME[$n]}"
    PID[$n]=$LAB_LAST_PID
done
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
field() { st "$1" | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"; }
has_peers() { [ "$(field "$1" 'len(s["peers"])')" = "$2" ]; }
for n in a b c; do
    lab_wait "$n joined with two peers" 30 has_peers "$n" 2
    ADDR[$n]=$(field "$n" 's["mesh_addr"]')
done
echo "mesh addresses: nas=${ADDR[a]} laptop=${ADDR[b]} pi=${ADDR[c]}"
lab_wait "laptop reaches nas over the mesh" 30 lab_exec b ping -c1 -W1 "${ADDR[a]}"
lab_wait "pi reaches nas over the mesh" 30 lab_exec c ping -c1 -W1 "${ADDR[a]}"

# Echo servers: nas on 22 and 8080, laptop on 9000, pi on 22.
cat >"$LAB_DIR/echo.py" <<'PY'
import socket, sys, threading
def echo(c):
    with c:
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(d)
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
threading.Event().wait()
PY
# One connection attempt: exit 0 connected and echoed, 1 refused (reset), 2 no answer, 3 other.
cat >"$LAB_DIR/probe.py" <<'PY'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5)
    s.sendall(b"hello\n")
    sys.exit(0 if s.recv(16) == b"hello\n" else 3)
except ConnectionRefusedError:
    sys.exit(1)
except (socket.timeout, TimeoutError):
    sys.exit(2)
except OSError as e:
    print(e)
    sys.exit(3)
PY
# A connection kept open: a round trip every 0.1 s, the count of them in FILE
# (or "broken: why" once one fails).
cat >"$LAB_DIR/longlived.py" <<'PY'
import socket, sys, time
out = sys.argv[3]
def say(t):
    with open(out + ".tmp", "w") as f:
        f.write(t)
    import os
    os.replace(out + ".tmp", out)
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    n = 0
    while True:
        s.sendall(b"x\n")
        if s.recv(16) != b"x\n":
            raise OSError("wrong echo")
        n += 1
        say(str(n))
        time.sleep(0.1)
except Exception as e:
    say("broken: %s" % e)
PY
lab_bg a echo-a.log python3 "$LAB_DIR/echo.py" 22 8080
lab_bg b echo-b.log python3 "$LAB_DIR/echo.py" 9000
lab_bg c echo-c.log python3 "$LAB_DIR/echo.py" 22
probe() { lab_exec "$1" python3 "$LAB_DIR/probe.py" "${ADDR[$2]}" "$3"; }
outcome() {
    local rc=0
    probe "$@" >/dev/null 2>&1 || rc=$?
    case $rc in 0) echo connects ;; 1) echo refused ;; 2) echo "no answer" ;; *) echo "failed ($rc)" ;; esac
}
expect() {
    local want=$1 got
    shift
    got=$(outcome "$@")
    [ "$got" = "$want" ] || lab_fail "${NAME[$1]} -> ${NAME[$2]}:$3 $got, expected: $want ($4)"
}
is() {
    local want=$1
    shift
    [ "$(outcome "$@")" = "$want" ]
}
tables() { lab_exec "$1" nft list tables; }
# Whole outputs compared, not piped into grep -q: an early exit of grep would
# fail the pipeline (pipefail) when nft is still writing.
has_table() { [[ "$(tables "$1")" == *"inet warren_filter_${IFN[$1]}"* ]]; }

# No policy: everything reachable, no table anywhere.
lab_wait "laptop -> nas:22 before any policy" 10 is connects b a 22
expect connects b a 8080 "no policy"
expect connects c a 22 "no policy"
expect connects a b 9000 "no policy"
expect connects a c 22 "no policy"
for n in a b c; do ! has_table "$n" || lab_fail "${NAME[$n]} has a filter table with no policy: $(tables "$n")"; done
[ "$(policy show)" = "no policy set: every node may reach every other" ] || lab_fail "policy show: $(policy show)"

# A connection opened now must survive every change below.
LONG=$LAB_DIR/longlived.count
lab_bg b longlived.log python3 "$LAB_DIR/longlived.py" "${ADDR[a]}" 22 "$LONG"
count() { cat "$LONG" 2>/dev/null || echo 0; }
long_alive() {
    local c
    c=$(count)
    case $c in broken*) lab_fail "the long-lived laptop -> nas:22 connection broke: $c" ;; esac
    echo "$c"
}
grew_past() { [ "$(long_alive)" -gt "$1" ]; }
lab_wait "long-lived connection carries data" 10 grew_past 3

# Within 2 s of `set` returning, plus the time one probe takes (a probe that
# starts just before the deadline must be allowed to finish): measured here,
# the slowest of three, since a Python start-up in the kernel tier's emulated
# VM costs far more than on the host.
probe_s=0
for _ in 1 2 3; do
    t0=$(date +%s.%N)
    probe b a 22 >/dev/null
    probe_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$probe_s" 'BEGIN { d = b - a; printf "%.2f", (d > m ? d : m) }')
done
CHANGE_DEADLINE=$(awk -v p="$probe_s" 'BEGIN { printf "%.2f", 2 + p }')
echo "one probe takes up to ${probe_s} s: a change must show within ${CHANGE_DEADLINE} s of set"

cat >"$LAB_DIR/p1.toml" <<'EOF'
[tags]
nas = ["nas"]
laptop = ["laptop", "laptop-2"]

[[accept]]
from = ["tag:laptop"]
to = ["tag:nas"]
ports = ["tcp/22"]

[[accept]]
from = ["tag:nas"]
to = ["tag:laptop"]
ports = ["tcp/9000"]
EOF
set_out=$(policy set "$LAB_DIR/p1.toml" 2>"$LAB_DIR/set1.err")
digest1=$(awk '{print $2}' <<<"$set_out")
grep -q "laptop-2" "$LAB_DIR/set1.err" || lab_fail "no warning for laptop-2, which no node has: $(cat "$LAB_DIR/set1.err")"
before=$(long_alive)
lab_wait "pi -> nas:22 refused within 2 s of set" "$CHANGE_DEADLINE" is refused c a 22
lab_wait "laptop -> nas:8080 refused within 2 s of set" "$CHANGE_DEADLINE" is refused b a 8080
expect connects b a 22 "tag:laptop -> tag:nas tcp/22"
expect refused b a 8080 "only tcp/22 is accepted"
expect refused c a 22 "pi is not tag:laptop"
expect connects a b 9000 "tag:nas -> tag:laptop tcp/9000; replies pass nas's firewall"
expect refused a c 22 "pi accepts nothing"
lab_exec b ping -c1 -W1 "${ADDR[a]}" >/dev/null 2>&1 && lab_fail "ping laptop -> nas passes, icmp is not accepted"
for n in a b c; do has_table "$n" || lab_fail "${NAME[$n]} has no filter table: $(tables "$n")"; done
[ "$(field a 's["policy"]["digest"]')" = "$digest1" ] || lab_fail "nas status: $(st a)"
[ "$(field a 's["policy"]["applied"]')" = "True" ] || lab_fail "nas status: $(st a)"
[[ "$(lab_exec a "$WARREN" status --socket "$(sock a)")" == *$'\n'"policy: $digest1 in force"* ]] ||
    lab_fail "status text: $(lab_exec a "$WARREN" status --socket "$(sock a)")"
lab_wait "long-lived connection carries data after the policy" 5 grew_past "$((before + 5))"
# The nftables source set holds the laptop's address.
[[ "$(lab_exec a nft list table inet "warren_filter_${IFN[a]}")" == *"${ADDR[b]}"* ]] ||
    lab_fail "nas's table lacks the laptop: $(lab_exec a nft list table inet "warren_filter_${IFN[a]}")"

# A change: pi may reach ssh too, and icmp for everyone.
sed -e 's/^from = \["tag:laptop"\]/from = ["tag:laptop", "pi"]/' -e 's/^ports = \["tcp\/22"\]/ports = ["tcp\/22", "icmp"]/' \
    "$LAB_DIR/p1.toml" >"$LAB_DIR/p2.toml"
policy set "$LAB_DIR/p2.toml" >"$LAB_DIR/set2.out" 2>/dev/null
digest2=$(awk '{print $2}' "$LAB_DIR/set2.out")
before=$(long_alive)
lab_wait "pi -> nas:22 connects within 2 s of set" "$CHANGE_DEADLINE" is connects c a 22
lab_exec c ping -c1 -W1 "${ADDR[a]}" >/dev/null || lab_fail "ping pi -> nas refused with icmp accepted"
expect refused b a 8080 "still only tcp/22"
lab_wait "long-lived connection carries data after the change" 5 grew_past "$((before + 5))"

# A node joining under a name the policy lists is let in by the same map
# change that brings it: laptop-2 reaches nas:22 at once, 8080 stays refused.
lab_public_host d 203.0.113.40
IFN[d]=$(lab_ifname d)
NAME[d]=laptop-2
lab_bg d agent-d.log "$WARREN" agent --state-dir "$LAB_DIR/d" --interface "${IFN[d]}" \
    --socket "$(sock d)" --port 51820 --join "$token" --name laptop-2
PID[d]=$LAB_LAST_PID
lab_wait "laptop-2 joined with three peers" 30 has_peers d 3
ADDR[d]=$(field d 's["mesh_addr"]')
lab_wait "laptop-2 -> nas:22 connects" 30 is connects d a 22
expect refused d a 8080 "laptop-2 is in tag:laptop: tcp/22 only"
expect refused d c 22 "pi accepts nothing from laptop-2"

# A bad file is refused with its line and reason; the old policy stays.
printf '[[accept]]\nfrom = ["*"]\nto = ["tag:nas"]\nports = ["tcp/22", "sctp/9"]\n' >"$LAB_DIR/bad.toml"
if policy set "$LAB_DIR/bad.toml" >"$LAB_DIR/bad.out" 2>&1; then lab_fail "a bad policy was accepted"; fi
grep -q 'line 3: to: tag "nas" is used but not defined' "$LAB_DIR/bad.out" || lab_fail "bad file: $(cat "$LAB_DIR/bad.out")"
printf '[tags]\nnas = ["nas"]\n[[accept]]\nfrom = ["*"]\nto = ["tag:nas"]\nports = ["tcp/22", "sctp/9"]\n' >"$LAB_DIR/bad.toml"
if policy set "$LAB_DIR/bad.toml" >"$LAB_DIR/bad.out" 2>&1; then lab_fail "a bad policy was accepted"; fi
grep -q 'line 6: "sctp/9": unknown protocol "sctp"' "$LAB_DIR/bad.out" || lab_fail "bad file: $(cat "$LAB_DIR/bad.out")"
[[ "$(policy show)" == "# policy $digest2"$'\n'* ]] || lab_fail "policy show after a refused set: $(policy show)"
[ "$(policy show --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')" = "$digest2" ] ||
    lab_fail "policy show --json: $(policy show --json)"
expect connects c a 22 "the old policy stays after a refused file"
expect refused b a 8080 "the old policy stays after a refused file"

# Clear: the table goes on every agent, everything is reachable again.
policy clear >/dev/null
for n in a b c d; do lab_wait "${NAME[$n]}'s filter table removed" "$CHANGE_DEADLINE" eval "! has_table $n"; done
expect connects b a 8080 "no policy after clear"
expect connects a c 22 "no policy after clear"
[ "$(field a 's["policy"]["digest"]')" = "None" ] || lab_fail "nas status after clear: $(st a)"
long_alive >/dev/null

# A clean stop (SIGTERM) and `warren down` take the table with them.
policy set "$LAB_DIR/p1.toml" >/dev/null 2>&1
for n in a b; do lab_wait "${NAME[$n]} enforces the policy again" "$CHANGE_DEADLINE" has_table "$n"; done
kill -TERM "${PID[a]}"
rc=0
wait "${PID[a]}" || rc=$?
[ "$rc" -eq 0 ] || lab_fail "nas's agent exited with $rc on SIGTERM"
! has_table a || lab_fail "nas's table stayed after a clean stop: $(tables a)"
lab_exec b "$WARREN" down --socket "$(sock b)" >/dev/null
wait "${PID[b]}" || true
! has_table b || lab_fail "laptop's table stayed after warren down: $(tables b)"
echo "policy_enforce: ok"
