#!/usr/bin/env bash
# tiers: lab
# The router build (`--no-default-features --features agent`, built into
# target/agent-only/ unless WARREN_AGENT_ONLY names it) has no server roles in
# its --help and refuses their subcommands, yet is a full node: two
# agent-only nodes join a coordinator run by the full binary, one behind a
# router that drops UDP (its traffic must take the relay: relay client) and
# one behind a cone NAT that goes direct to a public full-binary node (its
# public mapping comes from WG-STUN: STUN client). Everyone pings everyone.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg
lab_init

if [ -z "${WARREN_AGENT_ONLY:-}" ]; then
    # Its own target directory: the default features' artefacts stay valid and
    # the next run only rebuilds what changed.
    cargo build --locked --quiet --no-default-features --features agent \
        --manifest-path "$LAB_ROOT/Cargo.toml" --target-dir "$LAB_ROOT/target/agent-only" ||
        lab_fail "building the agent-only binary"
    WARREN_AGENT_ONLY=$LAB_ROOT/target/agent-only/debug/warren
fi
SLIM=$WARREN_AGENT_ONLY
[ -x "$SLIM" ] || lab_fail "no agent-only binary at $SLIM"

# Left-out roles are absent from --help and their subcommands are refused.
help=$("$SLIM" --help)
for cmd in agent up status ping netcheck wg; do
    grep -Eq "^  $cmd " <<<"$help" || lab_fail "agent-only --help lacks $cmd: $help"
done
for cmd in server coord relay wgstun relay-load wgstun-load; do
    grep -Eq "^  $cmd " <<<"$help" && lab_fail "agent-only --help lists $cmd: $help"
    if out=$("$SLIM" "$cmd" --help 2>&1); then lab_fail "agent-only binary ran '$cmd --help': $out"; fi
    grep -q "unrecognized subcommand" <<<"$out" || lab_fail "unclear refusal of $cmd: $out"
done
# The full binary under test has them, so the checks above can tell the two apart.
"$WARREN" --help | grep -Eq "^  server " || lab_fail "the full binary $WARREN has no server subcommand"

lab_internet
lab_public_host srv 203.0.113.5
lab_public_host c 203.0.113.20
lab_router ra udpblock 198.51.100.31 10.31.0.1/24
lab_lan_host a ra 10.31.0.2
lab_router rb cone 198.51.100.32 10.32.0.1/24
lab_lan_host b rb 10.32.0.2

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen 203.0.113.5:7777 --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 30 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --expires 1h --state-dir "$SRV_DIR")

declare -A IFACE=() BIN=([a]=$SLIM [b]=$SLIM [c]=$WARREN) ADDR=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "${BIN[$1]}" status --json --socket "$(sock "$1")"; }
peer_count() { st "$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))'; }
has_peers() { [ "$(peer_count "$1")" = "$2" ]; }
field() { st "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"; }
for n in a b c; do
    IFACE[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "${BIN[$n]}" agent --state-dir "$LAB_DIR/$n" --interface "${IFACE[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "node-$n"
done
for n in a b c; do
    lab_wait "$n joined with two peers" 30 has_peers "$n" 2
    ADDR[$n]=$(field "$n" mesh_addr)
done
echo "mesh addresses: a=${ADDR[a]} b=${ADDR[b]} c=${ADDR[c]}"

for x in a b c; do
    for y in a b c; do
        [ "$x" = "$y" ] && continue
        lab_wait "$x pinging $y (${ADDR[$y]}) over the mesh" 30 lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"
    done
done

# a's router drops UDP: its peers are reached through the coordinator's relay.
on_relay() {
    st a | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = s["peers"] and all(p["path"] == "relay" for p in s["peers"]) and any(r["state"] == "connected" for r in s["relays"])
sys.exit(0 if ok else 1)'
}
lab_wait "agent-only a reaches its peers over the relay" 30 on_relay
lab_exec a wg show "${IFACE[a]}" endpoints | grep -q "127.0.0.1:" || lab_fail "a's WireGuard endpoints are not relay sockets"
# b goes direct to the public c through its cone NAT, and c sees b's public mapping.
wg_ep() { lab_exec "$1" wg show "${IFACE[$1]}" endpoints | awk -v k="$(field "$2" public_key)" '$1 == k { print $2 }'; }
# $3 is a glob (address:*).
# shellcheck disable=SC2053
ep_is() { [[ "$(wg_ep "$1" "$2")" == $3 ]]; }
lab_wait "agent-only b direct to c" 30 ep_is b c "203.0.113.20:*"
lab_wait "c direct to agent-only b through its NAT" 30 ep_is c b "198.51.100.32:*"
lab_exec b ping -c1 -W1 "${ADDR[c]}" >/dev/null || lab_fail "b -> c broke on the direct path"
# b's public mappings come from its own STUN clients: WG-STUN through the tunnel, plain STUN on the check socket.
mapped() {
    lab_exec b "$SLIM" netcheck --json --socket "$(sock b)" | python3 -c '
import json, sys
n = json.load(sys.stdin)
sys.exit(0 if all((n[k] or "").startswith("198.51.100.32:") for k in ("wg_mapping", "check_mapping")) else 1)'
}
lab_wait "agent-only b learns its public mappings from WG-STUN and STUN" 30 mapped
lab_exec b "$SLIM" status --socket "$(sock b)"
lab_exec b "$SLIM" netcheck --socket "$(sock b)"
echo "agent_only: ok"
