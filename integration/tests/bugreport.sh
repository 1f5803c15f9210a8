#!/usr/bin/env bash
# tiers: lab
# `warren bugreport` against a real agent whose state directory holds its
# private key (agent.json) and the join token file it joined with, and whose
# log holds a line that leaked both (as a bug elsewhere might): the report
# file is mode 0600 (also when it existed with another mode), has every
# section (version, system, backend, status as JSON, netcheck, the
# interface's real WireGuard state with the peer's handshake and transfer,
# addresses and routes, the log), and contains neither the private key
# (base64 or hex), nor the token (nor another token no file holds), nor any
# full 44-character key. With the
# agent gone the report is still written, each agent section saying why.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd python3
lab_init

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host a 203.0.113.21
lab_public_host b 203.0.113.22

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --expires 1h --state-dir "$SRV_DIR")

declare -A IFN=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
for n in a b; do
    IFN[$n]=$(lab_ifname "$n")
    install -d -m 0700 "$LAB_DIR/$n"
    (umask 077 && echo "$token" >"$LAB_DIR/$n/join-token")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IFN[$n]}" \
        --socket "$(sock "$n")" --join-file "$LAB_DIR/$n/join-token" --name "node-$n"
done
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
field() { st "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"; }
one_peer() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == 1 and s["mesh_addr"] else 1)'; }
for n in a b; do lab_wait "$n joined with one peer" 30 one_peer "$n"; done
addr_b=$(field b mesh_addr)
lab_wait "a pings b over the mesh" 30 lab_exec a ping -c1 -W1 "$addr_b"

addr_a=$(field a mesh_addr)
key_b=$(field b public_key)
private_a=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["private_key"])' "$LAB_DIR/a/agent.json")
private_a_hex=$(python3 -c 'import base64,sys; print(base64.b64decode(sys.argv[1]).hex())' "$private_a")
[ "${#private_a}" = 44 ] || lab_fail "no private key in a's agent.json"
# Log lines that leaked the secrets, and a token the report cannot know of
# (no file holds it): the report must not carry them on.
other_token=$(lab_exec srv "$WARREN" server invite --state-dir "$SRV_DIR")
echo "agent: debug: joined with $token, key $private_a ($private_a_hex), peer $key_b" >>"$LAB_DIR/agent-a.log"
echo "agent: debug: someone pasted $other_token" >>"$LAB_DIR/agent-a.log"

report=$LAB_DIR/report.txt
(umask 022 && echo old >"$report")
lab_exec a "$WARREN" bugreport --output "$report" --socket "$(sock a)" --state-dir "$LAB_DIR/a" \
    --log-file "$LAB_DIR/agent-a.log" --join-file "$LAB_DIR/a/join-token"
cat "$report"
mode=$(stat -c %a "$report")
[ "$mode" = 600 ] || lab_fail "report mode $mode, want 600"

# Not even the 8 characters a public key keeps: the private key is known (agent.json), so it goes whole.
for secret in "$private_a" "${private_a:0:8}" "$private_a_hex" "$token" "${token#warren1-}" "${other_token#warren1-}" "$key_b"; do
    if grep -qF -- "$secret" "$report"; then lab_fail "the report contains a secret or a full key: $secret"; fi
done
if grep -nE '[A-Za-z0-9+/]{43}=' "$report"; then lab_fail "the report contains a full 44-character key"; fi

python3 - "$report" "${IFN[a]}" "$addr_a" "${key_b:0:8}" "$LAB_DIR/agent-a.log" <<'PY' || lab_fail "the report lacks a section or its content"
import json, re, sys
path, ifname, addr_a, short_b, log_file = sys.argv[1:]
text = open(path).read()
sections = dict(re.findall(r"^=== (.+?) ===\n(.*?)(?=^=== |\Z)", text, re.S | re.M))
want = ["version", "system", "backend", "status", "netcheck", f"wireguard {ifname}",
        f"addresses and routes {ifname}", f"log ({log_file})"]
missing = [w for w in want if w not in sections]
assert not missing, f"missing sections {missing}; have {list(sections)}"
assert sections["version"].startswith("warren "), sections["version"]
assert "kernel: Linux" in sections["system"], sections["system"]
status = json.loads(sections["status"])
assert status["name"] == "node-a" and len(status["peers"]) == 1, status
json.loads(sections["netcheck"])
wg = sections[f"wireguard {ifname}"]
peer = [l for l in wg.splitlines() if l.startswith(f"peer {short_b}")]
assert peer, wg
assert "handshake never" not in peer[0] and re.search(r"rx [1-9]\d* B tx [1-9]\d* B", peer[0]), peer[0]
assert f"{addr_a}/" in sections[f"addresses and routes {ifname}"], sections[f"addresses and routes {ifname}"]
log = sections[f"log ({log_file})"]
assert "joined the mesh as node-a" in log and "[token redacted]" in log and "[secret redacted]" in log, log
PY

# Without --log-file: the journal (systemd), else logread (OpenWrt), else
# STATE_DIR/agent.log. Stand-ins on PATH: a journal without warren's lines,
# then a logread with one (holding a token), then neither.
stubs=$LAB_DIR/stubs
mkdir -p "$stubs"
printf '#!/bin/sh\nexit 0\n' >"$stubs/journalctl"
printf '#!/bin/sh\necho "daemon.err warren[42]: agent: token %s"\n' "$other_token" >"$stubs/logread"
chmod +x "$stubs/journalctl" "$stubs/logread"
log_source() {
    PATH="$stubs:$PATH" lab_exec a "$WARREN" bugreport --output - --socket "$(sock a)" --state-dir "$1" --join-file /dev/null |
        tee "$LAB_DIR/report-log.txt" | grep '^=== log'
}
[ "$(log_source "$LAB_DIR/a")" = "=== log (logread -e warren) ===" ] || lab_fail "logread not used: $(log_source "$LAB_DIR/a")"
grep -q "warren\[42\]: agent: token \[token redacted\]" "$LAB_DIR/report-log.txt" || lab_fail "logread's lines missing or not redacted"
rm "$stubs/logread"
cp "$LAB_DIR/agent-a.log" "$LAB_DIR/a/agent.log"
[ "$(log_source "$LAB_DIR/a")" = "=== log ($LAB_DIR/a/agent.log) ===" ] || lab_fail "agent.log not used: $(log_source "$LAB_DIR/a")"
[ "$(log_source "$LAB_DIR/nowhere")" = "=== log (none) ===" ] || lab_fail "no log not said"
grep -q "no log found" "$LAB_DIR/report-log.txt" || lab_fail "no log: no reason given"

# The agent gone: the report is still written, and says why its sections are empty.
lab_exec a "$WARREN" bugreport --output "$LAB_DIR/report2.txt" --socket "$LAB_DIR/no-agent.sock" \
    --state-dir "$LAB_DIR/a" --interface "${IFN[a]}" --log-file "$LAB_DIR/agent-a.log"
grep -A1 '^=== status ===' "$LAB_DIR/report2.txt" | grep -q 'not available: connecting to the agent' ||
    lab_fail "no reason for the missing status: $(cat "$LAB_DIR/report2.txt")"
if grep -qF -- "$private_a" "$LAB_DIR/report2.txt"; then lab_fail "report2 contains the private key"; fi
echo "bugreport: ok"
