#!/usr/bin/env bash
# tiers: lab
# Port mapping (PCP, NAT-PMP, UPnP IGD) takes nodes behind symmetric NATs
# direct. A `warren server` on the fake internet; symmetric routers running
# miniupnpd (lab_upnp) in three variants with one node behind each: pu behind
# a UPnP-only router, pn behind a NAT-PMP-only router (one that ignores PCP),
# pp behind a PCP (+ NAT-PMP) router; a cone node c; an open node o (a public
# host); a plain symmetric node s (no port mapping); q behind an all-protocols
# symmetric router, its agent started with --no-portmap. Asserted, each polled
# with a deadline:
#  - the routers speak what their variant says (upnpc, natpmpc, lab_pcp
#    probes that map nothing), so what follows is about the agent;
#  - each portmap node holds exactly two mappings in its router's nftables
#    (`inet miniupnpd prerouting_upnp`: UDP, external port -> its WireGuard
#    port 51820 and its check port 51821, nothing else), and its `warren
#    netcheck --json` names the protocol that answered, the gateway, the
#    router's WAN address and the same external ports, with the mapped
#    candidate (kind = protocol) among those announced;
#  - an outside host's datagrams to WAN:external-port arrive at the node's
#    WireGuard and check ports (an nft counter in the node), and the same
#    sent to q's router arrive nowhere;
#  - pu-c, pn-c, pp-c, pu-o, pp-pn, pu-pn and pp-s go direct, proven as
#    nat_grid proves it: both `wg show` endpoints have the other's public
#    address, a mesh ping works and grows both packet counts of one UDP flow
#    on the internet's bridge between the two WireGuard sockets' public
#    endpoints (those of `wg show`, or those in the routers' conntrack: a
#    router may rewrite the peer's port on its LAN side), and that flow goes
#    through the mapping where nothing else could work (the cone and plain
#    symmetric node dial the mapped port; between two portmap nodes, one of
#    the two mapped ports carries it); the agent says "direct", and the
#    node facing a portmap node has that pair's remote_kind = the protocol
#    when its WireGuard endpoint is the mapping (always so for the cone and
#    plain symmetric node), else prflx (the open node, and one side of two
#    portmap nodes: this lab's symmetric routers send even the mapped port's
#    traffic out through a fresh random port, so one flow between two
#    portmap nodes runs through one mapping, and its other end is seen at a
#    random port: learned by roaming);
#  - q maps nothing (its router would have answered) and s-q stays on the
#    relay;
#  - `warren down` on pp removes its mappings from its router;
#  - lab_upnp_restart on pu's router (miniupnpd restarted, mappings and
#    conntrack lost): the mappings come back and pu-c is direct again, with
#    no one touching the agent.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg python3 turnserver miniupnpd upnpc natpmpc conntrack
lab_init

SRV_IP=203.0.113.5 STUN_IP=203.0.113.7 STUN_ALT=203.0.113.8 X_IP=203.0.113.30
# Deadlines: mapping = PCP and NAT-PMP probes given up (about 4 s each) plus
# UPnP discovery; settle = every pair checked and upgraded; recover = a
# router that forgot noticed (the agent confirms held mappings every 60 s).
MAP_DEADLINE=60 SETTLE=${WARREN_PORTMAP_SETTLE:-90} RECOVER_DEADLINE=150
WG_PORT=51820 CHECK_PORT=51821

lab_internet
lab_public_host srv "$SRV_IP"
# An RFC 5780 STUN server for miniupnpd's check of its WAN address (two addresses).
lab_stun_server "$STUN_IP" "$STUN_ALT"
# The outside host that knocks on the mapped ports.
lab_public_host x "$X_IP"

# node -> its own address, the address the internet sees, its router, the
# portmap protocol expected on it ("-": none).
declare -A OWN=() PUB=() ROUTER=() PROTO=()
node() {
    OWN[$1]=$2
    PUB[$1]=$3
    ROUTER[$1]=$4
    PROTO[$1]=$5
}
lab_public_host o 203.0.113.21
node o 203.0.113.21 203.0.113.21 - -
lab_router rpu symmetric 198.51.100.21 10.21.0.1/24
lab_lan_host pu rpu 10.21.0.2
node pu 10.21.0.2 198.51.100.21 rpu upnp
lab_router rpn symmetric 198.51.100.22 10.22.0.1/24
lab_lan_host pn rpn 10.22.0.2
node pn 10.22.0.2 198.51.100.22 rpn natpmp
lab_router rpp symmetric 198.51.100.23 10.23.0.1/24
lab_lan_host pp rpp 10.23.0.2
node pp 10.23.0.2 198.51.100.23 rpp pcp
lab_router rq symmetric 198.51.100.24 10.24.0.1/24
lab_lan_host q rq 10.24.0.2
node q 10.24.0.2 198.51.100.24 rq -
lab_router rc cone 198.51.100.31 10.31.0.1/24
lab_lan_host c rc 10.31.0.2
node c 10.31.0.2 198.51.100.31 rc -
lab_router rs symmetric 198.51.100.41 10.41.0.1/24
lab_lan_host s rs 10.41.0.2
node s 10.41.0.2 198.51.100.41 rs -
NODES=(pu pn pp q c o s)
PORTMAP_NODES=(pu pn pp)
gw() { echo "${LAB_LAN_GW[${ROUTER[$1]}]}"; }

for r in rpu rpn rpp rq; do lab_wait "$r reaching the STUN server" 10 lab_exec "$r" ping -c1 -W1 "$STUN_IP"; done
lab_upnp rpu "$STUN_IP" "$STUN_ALT" upnp
lab_upnp rpn "$STUN_IP" "$STUN_ALT" natpmp
lab_upnp rpp "$STUN_IP" "$STUN_ALT" pcp
lab_upnp rq "$STUN_IP" "$STUN_ALT" all

# The routers speak exactly what their variant says. Probes that map
# nothing: UPnP status, NAT-PMP public address, PCP ANNOUNCE.
speaks() {
    local n=$1 proto=$2
    case "$proto" in
    upnp) lab_exec "$n" timeout 10 upnpc -i -s 2>&1 | grep -q 'Found .*IGD' ;;
    natpmp) lab_exec "$n" timeout 10 natpmpc -g "$(gw "$n")" 2>&1 | grep -q "Public IP address : ${PUB[$n]}" ;;
    pcp) lab_pcp "$n" "$(gw "$n")" announce >/dev/null 2>&1 ;;
    esac
}
declare -A SPEAKS=([pu]="upnp" [pn]="natpmp" [pp]="pcp natpmp" [q]="upnp natpmp pcp")
for n in pu pn pp q; do
    for proto in upnp natpmp pcp; do
        if [[ " ${SPEAKS[$n]} " == *" $proto "* ]]; then
            speaks "$n" "$proto" || lab_fail "${ROUTER[$n]} (lab_upnp ${LAB_UPNP_PROTOCOLS[${ROUTER[$n]}]}) does not answer $proto"
        elif speaks "$n" "$proto"; then
            lab_fail "${ROUTER[$n]} (lab_upnp ${LAB_UPNP_PROTOCOLS[${ROUTER[$n]}]}) answers $proto"
        fi
    done
    if lab_exec "${ROUTER[$n]}" nft list chain inet miniupnpd prerouting_upnp | grep -q dnat; then
        lab_fail "the probes left a mapping in ${ROUTER[$n]}"
    fi
done
echo "routers: rpu speaks UPnP only, rpn NAT-PMP only (PCP ignored), rpp PCP + NAT-PMP, rq all three"

# Proof on the wire: a packet counter per UDP flow on the internet's bridge.
lab_flow_counter inet
for n in "${NODES[@]}"; do lab_wait "$n reaching the server" 10 lab_exec "$n" ping -c1 -W1 "$SRV_IP"; done

SRV_DIR=$LAB_DIR/srv
lab_bg srv server.log "$WARREN" server --listen "$SRV_IP:7777" --state-dir "$SRV_DIR"
lab_wait "coordinator admin socket" 10 lab_exec srv "$WARREN" server nodes --state-dir "$SRV_DIR"
token=$(lab_exec srv "$WARREN" server invite --reusable --state-dir "$SRV_DIR")

declare -A IF=() ADDR=() KEY=() APID=()
sock() { echo "$LAB_DIR/$1/warren.sock"; }
st() { lab_exec "$1" "$WARREN" status --json --socket "$(sock "$1")"; }
nc() { lab_exec "$1" "$WARREN" netcheck --json --socket "$(sock "$1")"; }
for n in "${NODES[@]}"; do
    IF[$n]=$(lab_ifname "$n")
    extra=()
    [ "$n" = q ] && extra=(--no-portmap)
    lab_bg "$n" "agent-$n.log" "$WARREN" agent --state-dir "$LAB_DIR/$n" --interface "${IF[$n]}" \
        --socket "$(sock "$n")" --port "$WG_PORT" --join "$token" --name "$n" "${extra[@]}"
    APID[$n]=$LAB_LAST_PID
done
peers=$((${#NODES[@]} - 1))
joined() { st "$1" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"]) == int(sys.argv[1]) and s["mesh_addr"] else 1)' "$peers"; }
for n in "${NODES[@]}"; do lab_wait "$n joined with $peers peers" 60 joined "$n"; done
for n in "${NODES[@]}"; do
    read -r "ADDR[$n]" "KEY[$n]" < <(st "$n" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["mesh_addr"], s["public_key"])')
done
echo "all ${#NODES[@]} nodes joined"

# ---- The mappings: nftables and netcheck agree, exactly two, of the right protocol.
CHECK_PY=$LAB_DIR/portmap_check.py
cat >"$CHECK_PY" <<'PY'
import json, re, sys

def rules(nft):
    """(proto, external port, internal ip, internal port) per dnat rule of prerouting_upnp."""
    out = []
    for line in nft.splitlines():
        m = re.search(r"dport (\d+) dnat ip to ([\d.]+):(\d+)", line)
        if m:
            p = re.search(r"@nh,72,8 (0x[0-9a-f]+)", line)
            out.append((p.group(1) if p else "?", int(m.group(1)), m.group(2), int(m.group(3))))
    return out

def mapped(args):
    # mapped NETCHECK_FILE NFT_FILE PROTO GATEWAY PUB OWN WG_PORT CHECK_PORT
    nc_file, nft_file, proto, gw, pub, own, wg_port, check_port = args
    why = []
    try:
        nc = json.load(open(nc_file))
    except ValueError:
        print("netcheck: no JSON")
        return 1
    pm = nc.get("portmap")
    if not isinstance(pm, dict):
        print("netcheck: no portmap section")
        return 1
    if pm.get("enabled") is not True:
        why.append("enabled=%r" % pm.get("enabled"))
    if pm.get("protocol") != proto:
        why.append("protocol=%r, want %r (probes %s)" % (pm.get("protocol"), proto, json.dumps(pm.get("probes"))))
    if pm.get("gateway") != gw:
        why.append("gateway=%r, want %s" % (pm.get("gateway"), gw))
    if pm.get("external_ip") != pub:
        why.append("external_ip=%r, want %s" % (pm.get("external_ip"), pub))
    ext = {}
    maps = pm.get("mappings") or []
    for m in maps:
        sock = m.get("socket")
        want_internal = {"wireguard": int(wg_port), "check": int(check_port)}.get(sock)
        if want_internal is None or sock in ext:
            why.append("unexpected mapping %s" % json.dumps(m))
            continue
        ext[sock] = m.get("external_port")
        if m.get("internal_port") != want_internal:
            why.append("%s internal_port %r, want %d" % (sock, m.get("internal_port"), want_internal))
        if not (isinstance(m.get("lease_secs_left"), int) and m["lease_secs_left"] > 0):
            why.append("%s lease_secs_left %r" % (sock, m.get("lease_secs_left")))
    for sock in ("wireguard", "check"):
        if sock not in ext:
            why.append("no %s mapping in netcheck" % sock)
    got = sorted(r for r in rules(open(nft_file).read()))
    want = sorted(("0x11", ext[s], own, p) for s, p in (("wireguard", int(wg_port)), ("check", int(check_port))) if s in ext)
    if got != want:
        why.append("router's prerouting_upnp %s, want exactly %s" % (got, want))
    if "wireguard" in ext and "check" in ext:
        cand = {"kind": proto, "wg": "%s:%d" % (pub, ext["wireguard"]), "check": "%s:%d" % (pub, ext["check"])}
        if cand not in nc.get("candidates", []):
            why.append("candidate %s not announced (candidates %s)" % (json.dumps(cand), json.dumps(nc.get("candidates"))))
    if why:
        print("; ".join(why))
        return 1
    print(ext["wireguard"], ext["check"])
    return 0

def unmapped(args):
    # unmapped NETCHECK_FILE NFT_FILE: port mapping off, nothing mapped, no mapped candidate
    nc_file, nft_file = args
    why = []
    try:
        nc = json.load(open(nc_file))
        pm = nc.get("portmap") or {}
        if pm.get("enabled") is not False:
            why.append("netcheck portmap.enabled=%r, want false" % pm.get("enabled"))
        if pm.get("mappings"):
            why.append("netcheck mappings %s" % json.dumps(pm["mappings"]))
        kinds = [c for c in nc.get("candidates", []) if c.get("kind") in ("pcp", "natpmp", "upnp")]
        if kinds:
            why.append("mapped candidates announced: %s" % json.dumps(kinds))
    except ValueError:
        why.append("netcheck: no JSON")
    got = rules(open(nft_file).read())
    if got:
        why.append("router's prerouting_upnp has %s" % got)
    print("; ".join(why) or "ok")
    return 1 if why else 0

def gone(args):
    # gone NFT_FILE OWN: no dnat rule to OWN left
    nft_file, own = args
    left = [r for r in rules(open(nft_file).read()) if r[2] == own]
    print(left or "none")
    return 1 if left else 0

def peer(args):
    # peer STATUS_FILE KEY FIELD: FIELD of that peer (pair.FIELD for pair fields)
    st_file, key, field = args
    try:
        for p in json.load(open(st_file))["peers"]:
            if p["public_key"] == key:
                v = (p.get("pair") or {}).get(field[5:]) if field.startswith("pair.") else p.get(field)
                print(v if v is not None else "")
    except (ValueError, KeyError):
        pass
    return 0

sys.exit({"mapped": mapped, "unmapped": unmapped, "gone": gone, "peer": peer}[sys.argv[1]](sys.argv[2:]))
PY
chk() { python3 "$CHECK_PY" "$@"; }

# portmap_state NODE: one look at NODE's netcheck and its router's nftables;
# on success sets EXT_WG[NODE], EXT_CHECK[NODE]; PM_WHY[NODE] says what is wrong.
declare -A EXT_WG=() EXT_CHECK=() PM_WHY=()
portmap_state() {
    local n=$1 out
    nc "$n" >"$LAB_DIR/nc-$n.json" 2>&1 || true
    lab_exec "${ROUTER[$n]}" nft list chain inet miniupnpd prerouting_upnp >"$LAB_DIR/nft-$n.txt" 2>&1 || true
    if out=$(chk mapped "$LAB_DIR/nc-$n.json" "$LAB_DIR/nft-$n.txt" "${PROTO[$n]}" "$(gw "$n")" \
        "${PUB[$n]}" "${OWN[$n]}" "$WG_PORT" "$CHECK_PORT"); then
        read -r "EXT_WG[$n]" "EXT_CHECK[$n]" <<<"$out"
        return 0
    fi
    PM_WHY[$n]=$out
    return 1
}
portmap_wait() {
    local n=$1 deadline=$2
    lab_poll "$deadline" portmap_state "$n" ||
        lab_fail "$n (behind ${ROUTER[$n]}, lab_upnp ${LAB_UPNP_PROTOCOLS[${ROUTER[$n]}]}): no consistent ${PROTO[$n]} mappings within ${deadline}s: ${PM_WHY[$n]}"
    portmap_state "$n"
    echo "$n: ${PROTO[$n]} mappings ${PUB[$n]}:${EXT_WG[$n]} -> $WG_PORT (WireGuard), ${PUB[$n]}:${EXT_CHECK[$n]} -> $CHECK_PORT (check), in nftables and netcheck"
}
for n in "${PORTMAP_NODES[@]}"; do portmap_wait "$n" "$MAP_DEADLINE"; done

# ---- An outside host reaches the mapped ports: its datagrams are counted
# arriving at the node's own WireGuard and check ports.
for n in "${PORTMAP_NODES[@]}" q; do
    lab_exec "$n" nft -f - <<EOF || lab_fail "loading the knock counters into $n"
table ip lab_knock {
    counter wg {}
    counter check {}
    chain input {
        type filter hook input priority filter - 1; policy accept;
        ip saddr $X_IP udp dport $WG_PORT counter name "wg"
        ip saddr $X_IP udp dport $CHECK_PORT counter name "check"
    }
}
EOF
done
knocked() { lab_exec "$1" nft -j list counter ip lab_knock "$2" | python3 -c 'import json,sys; print([o["counter"]["packets"] for o in json.load(sys.stdin)["nftables"] if "counter" in o][0])'; }
knock() { lab_exec x python3 -c 'import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"knock", (sys.argv[1], int(sys.argv[2])))' "$1" "$2"; }
knock_arrives() {
    knock "${PUB[$1]}" "$3"
    [ "$(knocked "$1" "$2")" -gt 0 ]
}
for n in "${PORTMAP_NODES[@]}"; do
    lab_wait "a datagram from $X_IP to ${PUB[$n]}:${EXT_WG[$n]} arriving at $n's WireGuard port" 10 knock_arrives "$n" wg "${EXT_WG[$n]}"
    lab_wait "a datagram from $X_IP to ${PUB[$n]}:${EXT_CHECK[$n]} arriving at $n's check port" 10 knock_arrives "$n" check "${EXT_CHECK[$n]}"
done
# The control: q's router forwards nothing (sent after the others arrived,
# then a round trip through q's router so anything in flight has landed).
for p in "$WG_PORT" "$CHECK_PORT"; do knock "${PUB[q]}" "$p"; done
lab_exec x ping -c1 -W1 "${PUB[q]}" >/dev/null || true
[ "$(knocked q wg)" = 0 ] && [ "$(knocked q check)" = 0 ] ||
    lab_fail "datagrams to q's router (no mapping) arrived at q: wg $(knocked q wg), check $(knocked q check)"
echo "outside host $X_IP reaches pu, pn, pp on their mapped ports; q's router lets nothing in"

# ---- Direct pairs, and the one relay pair.
# X Y D|R [ENDPOINT...]: the wire flow must include one of the ENDPOINTs
# (where only the mapping can carry it). "view" marks the direction whose
# `wg show` endpoint must be exactly the first ENDPOINT.
m() { echo "${PUB[$1]}:${EXT_WG[$1]}"; }
PAIRS=(
    "c pu D $(m pu)"
    "c pn D $(m pn)"
    "c pp D $(m pp)"
    "o pu D"
    "pp pn D $(m pp) $(m pn)"
    "pu pn D $(m pu) $(m pn)"
    "s pp D $(m pp)"
    "s q R"
)
# Directions whose `wg show` endpoint must be the mapping itself: the cone
# and the plain symmetric node can reach a symmetric NAT only there.
declare -A VIEW=([c,pu]=$(m pu) [c,pn]=$(m pn) [c,pp]=$(m pp) [s,pp]=$(m pp))

snap=$LAB_DIR/snap
mkdir -p "$snap"
snapshot() {
    local n
    for n in "${NODES[@]}"; do
        lab_exec "$n" wg show "${IF[$n]}" endpoints >"$snap/$n.wg" 2>/dev/null || : >"$snap/$n.wg"
        st "$n" >"$snap/$n.json" 2>/dev/null || : >"$snap/$n.json"
    done
}
wg_ep() { awk -v k="${KEY[$2]}" '$1 == k { print $2 }' "$snap/$1.wg"; }
path_of() { chk peer "$snap/$1.json" "${KEY[$2]}" path; }
reason_of() { chk peer "$snap/$1.json" "${KEY[$2]}" reason; }
settled_dir() {
    local x=$1 y=$2 want=$3 ep
    ep=$(wg_ep "$x" "$y")
    if [ "$want" = D ]; then
        [ "${ep%:*}" = "${PUB[$y]}" ] && [ "$(path_of "$x" "$y")" = direct ]
    else
        [[ "$ep" == 127.0.0.1:* ]] && [[ "$(reason_of "$x" "$y")" =~ ^(checks\ failing|banned\ until) ]]
    fi
}
all_settled() {
    local line x y want
    snapshot
    for line in "${PAIRS[@]}"; do
        read -r x y want _ <<<"$line"
        settled_dir "$x" "$y" "$want" && settled_dir "$y" "$x" "$want" || return 1
    done
}
echo "waiting up to ${SETTLE}s for the pairs to settle"
t0=$SECONDS
settled=yes
lab_poll "$SETTLE" all_settled || settled=no
echo "settled: $settled after $((SECONDS - t0)) s; per direction (X Y X's-endpoint-for-Y path reason remote_kind):"
for line in "${PAIRS[@]}"; do
    read -r x y _ <<<"$line"
    for d in "$x $y" "$y $x"; do
        read -r a b <<<"$d"
        echo "  $a $b $(wg_ep "$a" "$b") $(path_of "$a" "$b") '$(reason_of "$a" "$b")' $(chk peer "$snap/$a.json" "${KEY[$b]}" pair.remote_kind)"
    done
done

# The UDP flows on the internet between X's and Y's WireGuard sockets, as
# "X_PUBLIC,Y_PUBLIC" tokens: what the two `wg show` endpoints say (EYX is Y's
# endpoint for X) and what the routers' conntrack says (lab_wire_flows: a
# router may have rewritten the peer's port on its LAN side).
wire_pairs() {
    local x=$1 y=$2 eyx=$3 exy=$4
    {
        echo "$eyx,$exy"
        [ "${ROUTER[$x]}" = - ] || lab_wire_flows "${ROUTER[$x]}" "${OWN[$x]}" "$WG_PORT" "${PUB[$y]}" | awk '{ print $1 "," $2 }'
        [ "${ROUTER[$y]}" = - ] || lab_wire_flows "${ROUTER[$y]}" "${OWN[$y]}" "$WG_PORT" "${PUB[$x]}" | awk '{ print $2 "," $1 }'
    } | sort -u | tr '\n' ' '
}
# One try at the wire proof for the pair X Y (MUST: endpoints one of which the
# flow must use). Sets WIRE. Status 2: an endpoint is wrong (final: the settle
# phase waited for it); 1: the ping or the counters missed (worth another try).
WIRE=
wire_once() {
    local x=$1 y=$2 exy eyx pairs pair
    shift 2
    exy=$(lab_wg_endpoint "$x" "${IF[$x]}" "${KEY[$y]}")
    eyx=$(lab_wg_endpoint "$y" "${IF[$y]}" "${KEY[$x]}")
    for d in "$x $y $exy" "$y $x $eyx"; do
        read -r a b e <<<"$d"
        if [ "${e%:*}" != "${PUB[$b]}" ]; then
            WIRE="✗ $a's wg endpoint for $b is $e, not ${PUB[$b]}:port"
            return 2
        fi
        if [ -n "${VIEW[$a,$b]:-}" ] && [ "$e" != "${VIEW[$a,$b]}" ]; then
            WIRE="✗ $a's wg endpoint for $b is $e, not its mapping ${VIEW[$a,$b]}"
            return 2
        fi
    done
    pairs=$(wire_pairs "$x" "$y" "$eyx" "$exy")
    lab_flow_dump inet "$LAB_DIR/flows0.json"
    if ! lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}" >/dev/null 2>&1; then
        WIRE="✗ wg endpoints $eyx <-> $exy but the mesh ping failed"
        return 1
    fi
    lab_flow_dump inet "$LAB_DIR/flows1.json"
    # shellcheck disable=SC2086 # one argument per endpoint pair
    if ! pair=$(lab_flow_grown "$LAB_DIR/flows0.json" "$LAB_DIR/flows1.json" $pairs); then
        WIRE="✗ wg endpoints $eyx <-> $exy but the ping grew no UDP flow both ways on the internet between them: $pair"
        return 1
    fi
    if [ $# -gt 0 ] && ! [[ " $* " == *" ${pair% *} "* || " $* " == *" ${pair#* } "* ]]; then
        WIRE="✗ the ping crossed the internet as $pair, not through a mapping ($*)"
        return 1
    fi
    WIRE="✓ wg endpoints $eyx <-> $exy, the ping crossed the internet as ${pair/ / <-> }"
}
WHY=
prove_direct() {
    local x=$1 y=$2 i rc ok=0 path kind e want_kind
    shift 2
    for ((i = 0; i < 10; i++)); do
        rc=0
        wire_once "$x" "$y" "$@" || rc=$?
        [ "$rc" = 1 ] || break
        sleep 0.5
    done
    [ "$rc" = 0 ] && ok=1
    WHY=$WIRE
    for d in "$x $y" "$y $x"; do
        read -r a b <<<"$d"
        st "$a" >"$snap/$a.json" 2>/dev/null || true
        path=$(path_of "$a" "$b")
        if [ "$path" = direct ]; then WHY+=", ✓ $a says direct"; else
            WHY+=", ✗ $a says '$path'"
            ok=0
        fi
        # Facing a portmap node: the kind must say how the path really runs.
        # Through b's mapping, it is b's protocol. Else (the wire check above
        # allows that only where something else can work: an open node, or
        # between two portmap nodes, where the one flow uses one of the two
        # mappings and the other side sees its peer's random NAT port), it is
        # the address WireGuard learned by roaming: prflx.
        if [ "${PROTO[$b]}" != - ]; then
            kind=$(chk peer "$snap/$a.json" "${KEY[$b]}" pair.remote_kind)
            e=$(lab_wg_endpoint "$a" "${IF[$a]}" "${KEY[$b]}")
            if [ "$e" = "$(m "$b")" ]; then want_kind=${PROTO[$b]}; else want_kind=prflx; fi
            if [ "$kind" = "$want_kind" ]; then WHY+=", ✓ $a's remote_kind for $b $kind"; else
                WHY+=", ✗ $a's remote_kind for $b '$kind' with wg endpoint $e, want $want_kind"
                ok=0
            fi
            [ "$want_kind" = prflx ] && WHY+=" (not through $b's mapping $(m "$b"))"
        fi
    done
    if lab_poll 15 lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"; then WHY+=", ✓ ping"; else
        WHY+=", ✗ ping"
        ok=0
    fi
    [ "$ok" = 1 ]
}
prove_relay() {
    local x=$1 y=$2 ep reason ok=1 n
    for d in "$x $y" "$y $x"; do
        read -r a b <<<"$d"
        ep=$(lab_wg_endpoint "$a" "${IF[$a]}" "${KEY[$b]}")
        if [[ "$ep" == 127.0.0.1:* ]]; then WHY+=", ✓ $a's wg endpoint for $b $ep"; else
            WHY+=", ✗ $a's wg endpoint for $b $ep, not the loopback relay socket"
            ok=0
        fi
        for ((n = 0; n < 60; n++)); do
            st "$a" >"$snap/$a.json" 2>/dev/null || true
            reason=$(reason_of "$a" "$b")
            [[ "$reason" =~ ^(checks\ failing|banned\ until) ]] && break
            sleep 0.25
        done
        if [[ "$reason" =~ ^(checks\ failing|banned\ until) ]]; then WHY+=", ✓ $a: '$reason'"; else
            WHY+=", ✗ $a: reason '$reason'"
            ok=0
        fi
    done
    if lab_poll 15 lab_exec "$x" ping -c1 -W1 "${ADDR[$y]}"; then WHY+=", ✓ ping"; else
        WHY+=", ✗ ping"
        ok=0
    fi
    WHY=${WHY#, }
    [ "$ok" = 1 ]
}
wrong=()
for line in "${PAIRS[@]}"; do
    read -r x y want must <<<"$line"
    WHY=
    if [ "$want" = D ]; then
        # shellcheck disable=SC2086 # must: zero or more endpoints
        if prove_direct "$x" "$y" $must; then res=ok; else res=WRONG; fi
    else
        if prove_relay "$x" "$y"; then res=ok; else res=WRONG; fi
    fi
    echo "$x-$y want $want: $res: $WHY"
    [ "$res" = ok ] || wrong+=("$x-$y want $want: $WHY")
done

# ---- q: port mapping off; nothing mapped although its router speaks all three.
nc q >"$LAB_DIR/nc-q.json" 2>&1 || true
lab_exec rq nft list chain inet miniupnpd prerouting_upnp >"$LAB_DIR/nft-q.txt" 2>&1 || true
if out=$(chk unmapped "$LAB_DIR/nc-q.json" "$LAB_DIR/nft-q.txt"); then
    echo "q (--no-portmap): nothing mapped on rq, netcheck says port mapping is off"
else
    wrong+=("q (--no-portmap): $out")
fi
[ "${#wrong[@]}" = 0 ] || {
    for w in "${wrong[@]}"; do echo "wrong: $w"; done
    lab_fail "${#wrong[@]} wrong before the down/restart phase"
}

# ---- `warren down` on pp gives its mappings back.
lab_exec pp "$WARREN" down --socket "$(sock pp)" || lab_fail "warren down on pp failed"
pp_gone() {
    lab_exec rpp nft list chain inet miniupnpd prerouting_upnp >"$LAB_DIR/nft-pp.txt" 2>&1
    chk gone "$LAB_DIR/nft-pp.txt" "${OWN[pp]}"
}
lab_poll 15 pp_gone || lab_fail "pp's mappings still in rpp 15 s after warren down: $(pp_gone)"
pp_stopped() { ! kill -0 "${APID[pp]}" 2>/dev/null; }
lab_wait "pp's agent to exit after warren down" 15 pp_stopped
echo "warren down on pp: its mappings are gone from rpp"

# ---- rpu's miniupnpd restarts and forgets: the agent maps again by itself.
old="${EXT_WG[pu]} ${EXT_CHECK[pu]}"
lab_upnp_restart rpu
t0=$SECONDS
lab_exec rpu nft list chain inet miniupnpd prerouting_upnp | grep -q dnat && lab_fail "rpu still has forwards after lab_upnp_restart"
portmap_wait pu "$RECOVER_DEADLINE"
echo "rpu restarted: pu mapped again after $((SECONDS - t0)) s (external ports before: $old)"
VIEW[c,pu]=$(m pu)
pu_c_direct() {
    snapshot
    settled_dir c pu D && settled_dir pu c D
}
lab_poll 60 pu_c_direct || true
WHY=
prove_direct c pu "$(m pu)" || lab_fail "pu-c not direct again after rpu's restart: $WHY"
echo "pu-c direct again $((SECONDS - t0)) s after rpu's restart: $WHY"
echo "nat_portmap: ok"
