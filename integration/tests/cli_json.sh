#!/usr/bin/env bash
# tiers: lab
# Every read command's --json output, read by a JSON parser, against a real
# coordinator and two real agents: status, netcheck, ping, wg show, server
# nodes, server invite (node b joins with the token from its JSON), server
# rename and remove, relay
# --show-key, wgstun --print-peer, pubkey, rotate-key and down. Errors with
# --json (unknown peer, no agent, no coordinator, bad value, missing
# argument) are one {"error": "..."} object on stdout, nothing on stderr,
# with the exit code the same command has without --json, and the same
# message the text form prints on stderr.
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

ERR=$LAB_DIR/stderr
# json_run WANT CMD...: CMD (stdin: file $JSON_STDIN, else nothing) exits WANT and prints one JSON document (echoed) on stdout.
json_run() {
    local want=$1 out rc=0
    shift
    out=$("$@" 2>"$ERR" <"${JSON_STDIN:-/dev/null}") || rc=$?
    [ "$rc" = "$want" ] || lab_fail "'$*' exited $rc, want $want; stdout: $out; stderr: $(cat "$ERR")"
    python3 -m json.tool <<<"$out" >/dev/null || lab_fail "'$*': stdout is not one JSON document: $out"
    printf '%s\n' "$out"
}
# check JSON PYTHON_EXPR: the expression, over the parsed document d, is true.
check() {
    python3 -c 'import json, sys
d = json.loads(sys.argv[1])
sys.exit(0 if eval(sys.argv[2]) else 1)' "$1" "$2" || lab_fail "JSON fails $2: $1"
}
# json_error WANT CMD...: with --json, CMD's error is {"error": "one line"} on
# stdout, stderr stays empty, the exit code is WANT; without --json the exit
# code is the same (and, unless it is a usage error, the message too, on stderr).
json_error() {
    local want=$1 out text rc=0
    shift
    out=$(json_run "$want" "$@")
    check "$out" 'list(d) == ["error"] and isinstance(d["error"], str) and d["error"] and "\n" not in d["error"]'
    [ ! -s "$ERR" ] || lab_fail "'$*' wrote to stderr with --json: $(cat "$ERR")"
    local args=() x
    for x in "$@"; do [ "$x" = --json ] || args+=("$x"); done
    text=$("${args[@]}" 2>"$ERR" <"${JSON_STDIN:-/dev/null}") || rc=$?
    [ "$rc" = "$want" ] || lab_fail "'${args[*]}' exited $rc without --json, $want with it"
    [ -z "$text" ] || lab_fail "'${args[*]}' printed on stdout on error: $text"
    if [ "$want" != 2 ]; then
        got=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["error"])' "$out")
        [ "$(cat "$ERR")" = "warren: $got" ] || lab_fail "text and JSON errors differ: '$(cat "$ERR")' vs '$got'"
    fi
    echo "error ok ($want): $out"
}

# server invite --json: the token in it is what b joins with below.
inv=$(json_run 0 lab_exec srv "$WARREN" server invite --json --expires 1h --name node-b --state-dir "$SRV_DIR")
check "$inv" 'd["token"].startswith("warren1-") and isinstance(d["expires"], int) and d["reusable"] is False and d["name"] == "node-b"'
json_error 1 lab_exec srv "$WARREN" server invite --json --expires soon --state-dir "$SRV_DIR"
json_error 1 lab_exec srv "$WARREN" server nodes --json --state-dir "$LAB_DIR/nothing"
token_a=$(lab_exec srv "$WARREN" server invite --state-dir "$SRV_DIR")
token_b=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["token"])' "$inv")

declare -A IFN=() PID=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
IFN[a]=$(lab_ifname a)
IFN[b]=$(lab_ifname b)
lab_bg a agent-a.log "$WARREN" agent --state-dir "$LAB_DIR/a" --interface "${IFN[a]}" --socket "$(sock a)" --join "$token_a" --name node-a
lab_bg b agent-b.log "$WARREN" agent --state-dir "$LAB_DIR/b" --interface "${IFN[b]}" --socket "$(sock b)" --join "$token_b"
PID[b]=$LAB_LAST_PID
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
one_peer() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == 1 and s["mesh_addr"] else 1)'; }
for n in a b; do lab_wait "$n joined with one peer" 30 one_peer "$n"; done

# status --json
s=$(json_run 0 st a)
check "$s" 'd["name"] == "node-a" and d["coordinator"] == "connected" and d["peers"][0]["name"] == "node-b"'
key_a=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["public_key"])' "$s")

# server nodes --json: both nodes, b under the invite's name.
n=$(json_run 0 lab_exec srv "$WARREN" server nodes --json --state-dir "$SRV_DIR")
check "$n" 'sorted(x["name"] for x in d) == ["node-a", "node-b"] and all(x["online"] for x in d)'

# server rename --json / remove --json: the node as `server nodes --json` shows it.
rn=$(json_run 0 lab_exec srv "$WARREN" server rename --json node-a node-x --state-dir "$SRV_DIR")
check "$rn" "d['name'] == 'node-x' and d['public_key'] == '$key_a'"
lab_exec srv "$WARREN" server rename node-x node-a --state-dir "$SRV_DIR" >/dev/null
json_error 1 lab_exec srv "$WARREN" server rename --json no-such-node y --state-dir "$SRV_DIR"
json_error 1 lab_exec srv "$WARREN" server remove --json no-such-node --state-dir "$SRV_DIR"

# netcheck --json
nc=$(json_run 0 lab_exec a "$WARREN" netcheck --json --socket "$(sock a)")
check "$nc" 'isinstance(d["candidates"], list) and isinstance(d["relays"], list)'

# ping --json: two answers, each with its path and round trip.
pongs() { lab_exec a "$WARREN" ping --json -c 1 node-b --socket "$(sock a)"; }
lab_wait "a's agent reaches b's" 30 pongs
p=$(json_run 0 lab_exec a "$WARREN" ping --json -c 2 node-b --socket "$(sock a)")
check "$p" 'd["peer"] == "node-b" and d["name"] == "node-b" and d["sent"] == 2 and d["received"] == 2 and [x["seq"] for x in d["pings"]] == [1, 2] and all(x["path"] in ("direct", "relay") and x["via"] and x["rtt_us"] > 0 for x in d["pings"])'
json_error 1 lab_exec a "$WARREN" ping --json no-such-node --socket "$(sock a)"
json_error 1 lab_exec a "$WARREN" ping --json node-b --socket "$LAB_DIR/no-agent.sock"
json_error 1 lab_exec a "$WARREN" status --json --socket "$LAB_DIR/no-agent.sock"
json_error 2 lab_exec a "$WARREN" ping --json --socket "$(sock a)"
json_error 2 lab_exec a "$WARREN" ping --json -c many node-b --socket "$(sock a)"

# wg show --json: the real interface, this node's key, the peer.
w=$(json_run 0 lab_exec a "$WARREN" wg show --json "${IFN[a]}")
check "$w" "d['public_key'] == '$key_a' and len(d['peers']) >= 1 and all('private_key' not in p for p in d['peers'])"
json_error 1 lab_exec a "$WARREN" wg show --json "${LAB}nope"

# relay --show-key --json and wgstun --print-peer --json say what the text forms say.
r=$(json_run 0 "$WARREN" relay --show-key --json --state-dir "$SRV_DIR")
check "$r" "d == {'public_key': '$("$WARREN" relay --show-key --state-dir "$SRV_DIR")'}"
wgkey=$("$WARREN" wgstun --print-peer --endpoint 203.0.113.5:3479 --state-dir "$SRV_DIR" | awk '$1 == "PublicKey" {print $3}')
g=$(json_run 0 "$WARREN" wgstun --print-peer --json --endpoint 203.0.113.5:3479 --state-dir "$SRV_DIR")
check "$g" "d == {'public_key': '$wgkey', 'endpoint': '203.0.113.5:3479', 'allowed_ips': ['100.64.0.4/32']}"
# (Usage errors both with and without --json: without, these would run the server.)
json_error 2 "$WARREN" wgstun --json --endpoint 203.0.113.5:3479 --state-dir "$SRV_DIR"
json_error 2 "$WARREN" relay --json --max-clients many --state-dir "$SRV_DIR"

# A config file error (read before the command line is parsed) is JSON too.
json_error 1 "$WARREN" relay --show-key --json --config "$LAB_DIR/missing.toml" --state-dir "$SRV_DIR"

# pubkey --json
priv=$("$WARREN" genkey)
echo "$priv" >"$LAB_DIR/key"
k=$(JSON_STDIN=$LAB_DIR/key json_run 0 "$WARREN" pubkey --json)
check "$k" "d == {'public_key': '$("$WARREN" pubkey <<<"$priv")'}"
echo "not a key" >"$LAB_DIR/garbage"
JSON_STDIN=$LAB_DIR/garbage json_error 1 "$WARREN" pubkey --json

# rotate-key --json, then down --json; after that b's agent is gone.
rk=$(json_run 0 lab_exec b "$WARREN" rotate-key --json --socket "$(sock b)")
check "$rk" 'd["public_key"] != d["old_public_key"] and len(d["public_key"]) == 44'
new_b=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["public_key"])' "$rk")
check "$(st b)" "d['public_key'] == '$new_b'"
dn=$(json_run 0 lab_exec b "$WARREN" down --json --socket "$(sock b)")
rm_b=$(json_run 0 lab_exec srv "$WARREN" server remove --json node-b --state-dir "$SRV_DIR")
check "$rm_b" "d['name'] == 'node-b' and d['public_key'] == '$new_b'"
check "$dn" 'd == {"down": True}'
lab_wait "b's agent exits after down" 10 bash -c "! kill -0 ${PID[b]} 2>/dev/null"
json_error 1 lab_exec b "$WARREN" status --json --socket "$(sock b)"
json_error 1 lab_exec b "$WARREN" netcheck --json --socket "$(sock b)"
echo "cli_json: ok"
