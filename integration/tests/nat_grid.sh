#!/usr/bin/env bash
# tiers: lab
# Direct paths across every pair of NAT kinds, in one mesh: a `warren server`
# (coordinator, relay, WG-STUN) on the fake internet and fourteen nodes, two
# of each kind: open (o1 a public host, o2 behind an `open` router), cone,
# symmetric, double (cone behind cone), lan (two nodes on one cone router's
# LAN), portmap (symmetric routers running miniupnpd, `lab_upnp ... all`: the
# agent maps its ports) and udpblock. One node pair per unordered pair of
# kinds is held to the table EXPECT below, both directions:
#   D  direct: `wg show` has the peer's real address (its LAN address on the
#      same LAN, else the address the internet sees: its router's WAN, or its
#      own public address), never 127.0.0.1; a mesh ping goes out and comes
#      back as UDP between exactly those two WireGuard endpoints on the wire
#      (the flow counter's packet counts grow across the ping; for a portmap
#      node, the endpoints may also be read from its router's conntrack,
#      lab_wire_flows, as its router may rewrite the peer's port on the LAN
#      side); the agent says "direct".
#   R  relay: `wg show` has the agent's loopback relay socket, the agent says
#      why ("checks failing" or "banned until"), and the mesh ping works.
# Also: every node's WireGuard has the mesh's peers (compared without the
# WG-STUN peer) and, as one more peer, the WG-STUN server (100.64.0.4/32).
# Every outcome is polled with a deadline, never timed. The grid is printed as
# kinds x kinds at the end; the test fails listing every wrong cell.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3 turnserver miniupnpd
lab_init

# How long the whole grid gets to settle after every node joined.
SETTLE=${WARREN_GRID_SETTLE:-60}
SRV_IP=203.0.113.5

lab_internet
lab_public_host srv "$SRV_IP"
# An RFC 5780 STUN server for miniupnpd's check of its WAN address (lab_upnp).
STUN_IP=203.0.113.7 STUN_ALT=203.0.113.8
lab_stun_server "$STUN_IP" "$STUN_ALT"

# node -> kind, its own address, the address the internet sees, its router.
declare -A KIND=() OWN=() PUB=() ROUTER=()
node() {
    KIND[$1]=$2
    OWN[$1]=$3
    PUB[$1]=$4
    ROUTER[$1]=$5
}
lab_public_host o1 203.0.113.21
node o1 open 203.0.113.21 203.0.113.21 -
lab_router ropen open 198.51.100.20 203.0.113.65/27
lab_lan_host o2 ropen 203.0.113.66
node o2 open 203.0.113.66 203.0.113.66 ropen
for i in 1 2; do
    lab_router "rc$i" cone "198.51.100.3$i" "10.3$i.0.1/24"
    lab_lan_host "c$i" "rc$i" "10.3$i.0.2"
    node "c$i" cone "10.3$i.0.2" "198.51.100.3$i" "rc$i"
    lab_router "rs$i" symmetric "198.51.100.4$i" "10.4$i.0.1/24"
    lab_lan_host "s$i" "rs$i" "10.4$i.0.2"
    node "s$i" symmetric "10.4$i.0.2" "198.51.100.4$i" "rs$i"
    lab_router "rdo$i" cone "198.51.100.5$i" "10.5$i.0.1/24"
    lab_router "rdi$i" cone "10.5$i.0.2" "10.15$i.0.1/24" "rdo$i"
    lab_lan_host "d$i" "rdi$i" "10.15$i.0.2"
    node "d$i" double "10.15$i.0.2" "198.51.100.5$i" "rdi$i"
    lab_router "ru$i" udpblock "198.51.100.7$i" "10.7$i.0.1/24"
    lab_lan_host "u$i" "ru$i" "10.7$i.0.2"
    node "u$i" udpblock "10.7$i.0.2" "198.51.100.7$i" "ru$i"
    lab_router "rp$i" symmetric "198.51.100.8$i" "10.8$i.0.1/24"
    lab_lan_host "p$i" "rp$i" "10.8$i.0.2"
    node "p$i" portmap "10.8$i.0.2" "198.51.100.8$i" "rp$i"
done
for i in 1 2; do
    lab_wait "rp$i reaching the STUN server" 10 lab_exec "rp$i" ping -c1 -W1 "$STUN_IP"
    lab_upnp "rp$i" "$STUN_IP" "$STUN_ALT" all
done
lab_router rl cone 198.51.100.61 10.61.0.1/24
lab_lan_host l1 rl 10.61.0.2
lab_lan_host l2 rl 10.61.0.3
node l1 lan 10.61.0.2 198.51.100.61 rl
node l2 lan 10.61.0.3 198.51.100.61 rl
NODES=(o1 o2 c1 c2 s1 s2 d1 d2 l1 l2 p1 p2 u1 u2)
KINDS=(open cone symmetric double lan portmap udpblock)

# Expected path per unordered pair of kinds (DESIGN.md "Path lifecycle"; the
# lead's spec for direct paths). The lab's cone filters by address and port,
# so nothing gets through to a symmetric NAT's fresh per-destination ports
# except from an open host, and a UDP block allows no direct path at all. A
# portmap node is behind a symmetric NAT too, but its router forwards the
# mapped ports to it, so every kind with UDP reaches it (issue 11).
declare -A EXPECT=(
    [open,open]=D [open,cone]=D [open,symmetric]=D [open,double]=D [open,lan]=D [open,portmap]=D [open,udpblock]=R
    [cone,cone]=D [cone,symmetric]=R [cone,double]=D [cone,lan]=D [cone,portmap]=D [cone,udpblock]=R
    [symmetric,symmetric]=R [symmetric,double]=R [symmetric,lan]=R [symmetric,portmap]=D [symmetric,udpblock]=R
    [double,double]=D [double,lan]=D [double,portmap]=D [double,udpblock]=R
    [lan,lan]=D [lan,portmap]=D [lan,udpblock]=R
    [portmap,portmap]=D [portmap,udpblock]=R
    [udpblock,udpblock]=R
)
# The node pair that stands for each pair of kinds: the first node of each
# kind, or both nodes of one kind (each behind its own router; lan's share one).
declare -A PAIR=()
# The Nth node (1 or 2) of KIND.
first() {
    local n
    for n in "${NODES[@]}"; do if [ "${KIND[$n]}" = "$1" ]; then echo "$n"; fi; done | sed -n "${2}p"
}
for ((i = 0; i < ${#KINDS[@]}; i++)); do
    for ((j = i; j < ${#KINDS[@]}; j++)); do
        x=${KINDS[i]} y=${KINDS[j]}
        [ -n "${EXPECT[$x,$y]:-}" ] || lab_fail "no expectation for $x-$y"
        if [ "$x" = "$y" ]; then PAIR[$x,$y]="$(first "$x" 1) $(first "$x" 2)"; else PAIR[$x,$y]="$(first "$x" 1) $(first "$y" 1)"; fi
    done
done

# Where a pair's direct UDP is seen: their shared LAN, or the internet.
segment() { if [ "${ROUTER[$1]}" = "${ROUTER[$2]}" ] && [ "${ROUTER[$1]}" != - ]; then echo "${ROUTER[$1]}"; else echo inet; fi; }
# The address X must dial to reach Y directly.
real_ip() { if [ "$(segment "$1" "$2")" = inet ]; then echo "${PUB[$2]}"; else echo "${OWN[$2]}"; fi; }

# Proof on the wire: a packet counter per UDP flow on the shared segment
# (lab_flow_counter: the internet's bridge, and the LAN bridge of the one
# router with two nodes). Chosen over the routers' conntrack because
# conntrack cannot see all cells (open hosts have no NAT router, and same-LAN
# traffic is bridged past the router) and because an entry proves only that
# something was sent once (a NAT creates it for the first outbound packet,
# answered or not, and keeps it ~2 minutes); a counter per direction for
# the exact endpoint pair, read before and after a ping, proves this ping's
# packets crossed between those endpoints both ways.
lab_flow_counter inet
lab_flow_counter rl
for n in "${NODES[@]}"; do lab_wait "$n reaching the server" 10 lab_exec "$n" ping -c1 -W1 "$SRV_IP"; done

SRV_DIR=$LAB_DIR/srv
# The home-user deployment: coordinator, relay and WG-STUN (3479, plain STUN 3478) in one process.
lab_bg srv server.log "$WARREN" server --listen "$SRV_IP:7777" --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A IF=() ADDR=() KEY=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
for n in "${NODES[@]}"; do
    IF[$n]=$(lab_ifname "$n")
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port 51820 --join "$token" --name "$n"
done
peers=$((${#NODES[@]} - 1))
joined() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == int(sys.argv[1]) and s["mesh_addr"] else 1)' "$peers"; }
for n in "${NODES[@]}"; do lab_wait "$n joined with $peers peers" 60 joined "$n"; done
for n in "${NODES[@]}"; do
    read -r "ADDR[$n]" "KEY[$n]" < <(st "$n" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["mesh_addr"], s["public_key"])')
done

# WireGuard has exactly the mesh (plus the WG-STUN peer 100.64.0.4/32, left out here).
wg_matches_mesh() {
    local x=$1 got want
    got=$(lab_exec "$x" wg show "${IF[$x]}" allowed-ips | awk '$2 != "100.64.0.4/32" {print $1, $2}' | sort)
    want=$(for y in "${NODES[@]}"; do if [ "$y" != "$x" ]; then echo "${KEY[$y]} ${ADDR[$y]}/32"; fi; done | sort)
    [ "$got" = "$want" ]
}
for n in "${NODES[@]}"; do lab_wait "$n's WireGuard peers match the mesh" 20 wg_matches_mesh "$n"; done
echo "all ${#NODES[@]} nodes joined; WireGuard matches the mesh on each"

# The directions to check, one line each: X Y EXPECTED(D|R) ADDRESS_X_MUST_DIAL_FOR_Y.
dirs=$LAB_DIR/directions
: >"$dirs"
for cell in "${!PAIR[@]}"; do
    read -r p q <<<"${PAIR[$cell]}"
    echo "$p $q ${EXPECT[$cell]} $(real_ip "$p" "$q")" >>"$dirs"
    echo "$q $p ${EXPECT[$cell]} $(real_ip "$q" "$p")" >>"$dirs"
done
keys=$LAB_DIR/keys
for n in "${NODES[@]}"; do echo "$n ${KEY[$n]}"; done >"$keys"

# One snapshot of every node's `wg show` and `warren status`, then one
# evaluation: a line "X Y ok|wait ENDPOINT PATH REASON" per direction.
snap=$LAB_DIR/snap
mkdir -p "$snap"
snapshot() {
    local n
    for n in "${NODES[@]}"; do
        lab_exec "$n" wg show "${IF[$n]}" endpoints >"$snap/$n.wg" 2>/dev/null || : >"$snap/$n.wg"
        st "$n" >"$snap/$n.json" 2>/dev/null || : >"$snap/$n.json"
    done
}
evaluate() {
    python3 - "$dirs" "$keys" "$snap" <<'PY'
import json, sys
dirs, keys, snap = sys.argv[1:4]
key = dict(l.split() for l in open(keys))
RELAY_REASONS = ("checks failing", "banned until")
for line in open(dirs):
    x, y, want, real = line.split()
    ep = "none"
    for l in open(f"{snap}/{x}.wg"):
        f = l.split()
        if len(f) == 2 and f[0] == key[y]:
            ep = f[1]
    path, reason = "?", ""
    try:
        for p in json.load(open(f"{snap}/{x}.json"))["peers"]:
            if p["public_key"] == key[y]:
                path, reason = p.get("path", "?"), p.get("reason") or ""
    except (ValueError, KeyError):
        pass
    ip = ep.rsplit(":", 1)[0]
    if want == "D":
        ok = ip == real and path == "direct"
    else:
        ok = ip == "127.0.0.1" and reason.startswith(RELAY_REASONS)
    print(x, y, "ok" if ok else "wait", ep, path, reason.replace(" ", "_") or "-")
PY
}
all_settled() {
    snapshot
    evaluate >"$LAB_DIR/eval"
    ! grep -q ' wait ' "$LAB_DIR/eval"
}
echo "waiting up to ${SETTLE}s for the grid to settle"
settled=yes
lab_poll "$SETTLE" all_settled || settled=no
echo "grid settled: $settled; per direction (X Y state X's-endpoint-for-Y path reason):"
sed 's/^/  /' "$LAB_DIR/eval"

# Per-direction proofs. Each checks every fact it can (so a report shows what
# already works next to what does not) and sets WHY to one line of ✓/✗ facts.
WHY=
# peer_field X Y FIELD: FIELD of Y in X's `warren status --json` (empty if absent).
peer_field() {
    st "$1" 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin)["peers"]:
    if p["public_key"] == sys.argv[1]:
        print(p.get(sys.argv[2]) or "")' "${KEY[$2]}" "$3" || true
}
# The mesh ping X -> Y works (a few tries: a path may be switching).
mesh_ping() { lab_poll 15 lab_exec "$1" ping -c1 -W1 "${ADDR[$2]}"; }
# One try at the wire proof of a direct path X -> Y: both sides' `wg show`
# endpoints are the real addresses, and a mesh ping X -> Y grows both packet
# counts of the UDP flow between exactly those two endpoints on their segment.
# Sets WIRE. Status 2: an endpoint is wrong (final: the settle phase already
# waited for it); 1: the ping or the counters missed (worth another try).
WIRE=
wire_once() {
    local x=$1 y=$2 seg exy eyx pairs used
    seg=$(segment "$x" "$y")
    exy=$(lab_wg_endpoint "$x" "${IF[$x]}" "${KEY[$y]}")
    eyx=$(lab_wg_endpoint "$y" "${IF[$y]}" "${KEY[$x]}")
    if [ "${exy%:*}" != "$(real_ip "$x" "$y")" ]; then
        WIRE="✗ $x's wg endpoint for $y is $exy, not $(real_ip "$x" "$y"):port"
        return 2
    fi
    if [ "${eyx%:*}" != "$(real_ip "$y" "$x")" ]; then
        WIRE="✗ $y's wg endpoint for $x is $eyx, not $(real_ip "$y" "$x"):port"
        return 2
    fi
    # A portmap node's router may rewrite the peer's port on the LAN side
    # (lab_wire_flows): then its conntrack names the flow on the wire.
    pairs="$eyx,$exy"
    if [ "${KIND[$x]}" = portmap ]; then
        pairs+=" $(lab_wire_flows "${ROUTER[$x]}" "${OWN[$x]}" 51820 "${PUB[$y]}" | awk '{ printf "%s,%s ", $1, $2 }')"
    fi
    if [ "${KIND[$y]}" = portmap ]; then
        pairs+=" $(lab_wire_flows "${ROUTER[$y]}" "${OWN[$y]}" 51820 "${PUB[$x]}" | awk '{ printf "%s,%s ", $2, $1 }')"
    fi
    lab_flow_dump "$seg" "$LAB_DIR/flows0.json"
    if ! lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}" >/dev/null 2>&1; then
        WIRE="✗ endpoints $eyx <-> $exy but the mesh ping failed"
        return 1
    fi
    lab_flow_dump "$seg" "$LAB_DIR/flows1.json"
    # shellcheck disable=SC2086 # one argument per endpoint pair
    if ! used=$(lab_flow_grown "$LAB_DIR/flows0.json" "$LAB_DIR/flows1.json" $pairs); then
        WIRE="✗ endpoints $eyx <-> $exy but the ping did not cross $seg between them ($used)"
        return 1
    fi
    if [ "$used" != "$eyx $exy" ]; then
        WIRE="✓ wg endpoints $eyx <-> $exy, the ping crossed $seg as ${used/ / <-> } (the router's view of the wire)"
        return 0
    fi
    WIRE="✓ wg endpoints $eyx <-> $exy, the ping crossed $seg as that UDP flow"
}
prove_direct() {
    local x=$1 y=$2 i rc ok=0 path
    for ((i = 0; i < 10; i++)); do
        rc=0
        wire_once "$x" "$y" || rc=$?
        [ "$rc" = 1 ] || break
        sleep 0.5
    done
    [ "$rc" = 0 ] && ok=1
    WHY=$WIRE
    # Over whatever path, the two must reach each other.
    if mesh_ping "$x" "$y"; then WHY+=", ✓ ping"; else
        WHY+=", ✗ ping"
        ok=0
    fi
    path=$(peer_field "$x" "$y" path)
    if [ "$path" = direct ]; then WHY+=", ✓ status direct"; else
        WHY+=", ✗ status '$path'"
        ok=0
    fi
    [ "$ok" = 1 ]
}
prove_relay() {
    local x=$1 y=$2 ep reason ok=1
    ep=$(lab_wg_endpoint "$x" "${IF[$x]}" "${KEY[$y]}")
    if [[ "$ep" == 127.0.0.1:* ]]; then WHY="✓ wg endpoint $ep"; else
        WHY="✗ wg endpoint $ep, not the loopback relay socket"
        ok=0
    fi
    if mesh_ping "$x" "$y"; then WHY+=", ✓ ping"; else
        WHY+=", ✗ ping"
        ok=0
    fi
    # Relayed peers are re-checked every few seconds (sooner while the pings
    # above make traffic), so "checking" comes and goes: poll for the verdict.
    local n
    for ((n = 0; n < 60; n++)); do
        reason=$(peer_field "$x" "$y" reason)
        case "$reason" in
        "checks failing"* | "banned until"*) break ;;
        esac
        sleep 0.25
    done
    case "$reason" in
    "checks failing"* | "banned until"*) WHY+=", ✓ reason '$reason'" ;;
    *)
        WHY+=", ✗ reason '$reason'"
        ok=0
        ;;
    esac
    [ "$ok" = 1 ]
}

declare -A CELL=()
wrong=()
for ((i = 0; i < ${#KINDS[@]}; i++)); do
    for ((j = i; j < ${#KINDS[@]}; j++)); do
        x=${KINDS[i]} y=${KINDS[j]}
        want=${EXPECT[$x,$y]}
        read -r p q <<<"${PAIR[$x,$y]}"
        ok=1 notes=()
        for d in "$p $q" "$q $p"; do
            read -r a b <<<"$d"
            if [ "$want" = D ]; then prove_direct "$a" "$b" || ok=0; else prove_relay "$a" "$b" || ok=0; fi
            notes+=("$a->$b: $WHY")
        done
        echo "$x-$y ($p, $q) want $want: ${notes[0]}; ${notes[1]}"
        if [ "$ok" = 1 ]; then CELL[$x,$y]="$want ✓"; else
            CELL[$x,$y]="$want ✗"
            wrong+=("$x-$y ($p, $q), want $want: ${notes[0]}; ${notes[1]}")
        fi
        CELL[$y,$x]=${CELL[$x,$y]}
    done
done

# The WG-STUN server is one more WireGuard peer on every node (allowed IP 100.64.0.4/32).
extra=()
for n in "${NODES[@]}"; do
    lab_exec "$n" wg show "${IF[$n]}" allowed-ips | awk '$2 == "100.64.0.4/32"' | grep -q . ||
        extra+=("$n: no WG-STUN peer (100.64.0.4/32) in wg show")
done

echo
echo "D = direct, R = relay (expected); ✓ = proven, ✗ = not"
printf '%-10s' ""
for y in "${KINDS[@]}"; do printf '%-11s' "$y"; done
echo
for x in "${KINDS[@]}"; do
    printf '%-10s' "$x"
    # printf pads bytes: a cell's mark is 3 bytes wide and shows as 1.
    for y in "${KINDS[@]}"; do printf '%-13s' "${CELL[$x,$y]}"; done
    echo
done
echo
if [ "${#wrong[@]}" -gt 0 ] || [ "${#extra[@]}" -gt 0 ]; then
    for w in "${wrong[@]}" "${extra[@]}"; do echo "wrong: $w"; done
    lab_fail "${#wrong[@]} of ${#PAIR[@]} cells wrong, ${#extra[@]} nodes without the WG-STUN peer"
fi
echo "nat_grid: ok"
