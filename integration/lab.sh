# warren network lab: hosts, routers and a fake internet in network namespaces.
#
# Source it from a test (`. "$(dirname "$0")/../lab.sh"`), call `lab_init`, then
# build a topology:
#
#   lab_internet                                   # 203.0.113.0/24 + 198.51.100.0/24, gateways .254
#   lab_public_host srv 203.0.113.5                # host on the internet
#   lab_router r1 cone 203.0.113.10 10.1.0.1/24    # NAT router, LAN bridge 10.1.0.0/24
#   lab_lan_host a r1 10.1.0.2                     # host behind it
#   lab_router r2 cone 10.1.0.3 10.2.0.1/24 r1     # double NAT: r2's WAN is r1's LAN
#   lab_exec a ping -c1 203.0.113.5
#
# Everything lives in namespaces named "$LAB-<name>"; inside a node the uplink
# is always `eth0` and a router's LAN is the bridge `br0`. veth pairs are created
# directly inside their namespaces, so nothing ever appears in the root
# namespace. lab_init's EXIT trap kills every process the test started and
# deletes every namespace, also when the test fails or is interrupted.
#
# Router kinds (nftables; all drop unsolicited inbound on the WAN, like home
# routers, see DESIGN.md "NAT-lab pitfalls"):
#   open       no NAT, no firewall; the LAN must be a public subnet (e.g. 203.0.113.64/27),
#              reachable from the internet through proxy ARP on the WAN
#   cone       masquerade: endpoint-independent mapping, port preserved when free
#   symmetric  masquerade random,fully-random: a new random port per destination
#   udpblock   cone, but UDP to or from the WAN is dropped (except DNS)
# `lab_upnp ROUTER ...` adds miniupnpd (UPnP-IGD, NAT-PMP, PCP) to a NAT router.

LAB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${WARREN:=$LAB_ROOT/target/debug/warren}"
export WARREN
# wireguard-go refuses to start on Linux without it.
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

LAB=
LAB_DIR=
LAB_PIDS=()
LAB_NAMESPACES=()
LAB_CLEANUP_HOOKS=()
declare -gA LAB_LAN_GW=() LAB_LAN_PREFIX=() LAB_KIND=() LAB_WAN_IP=()

lab_log() { echo "lab: $*" >&2; }
lab_fail() {
    echo "FAIL: $*" >&2
    exit 1
}
lab_skip() {
    echo "SKIP: $*" >&2
    exit 77
}

# Skips the test (exit 77) unless every command exists.
lab_require_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || lab_skip "$c not installed"
    done
}

# Starts a lab: unique id, scratch directory, cleanup trap. Skips unless root.
lab_init() {
    [ "$(id -u)" -eq 0 ] || lab_skip "the lab needs root"
    lab_require_cmd ip nft
    # Short, so "$LAB" plus a suffix still fits the 15-byte interface name limit
    # (wireguard-go's UAPI socket path is global, so interface names must be unique).
    LAB=$(printf 'w%x%02x' "$$" "$((RANDOM % 256))")
    LAB_DIR=$(mktemp -d "/tmp/warren-$LAB.XXXX")
    trap lab_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Runs CMD (a string, eval'd) during cleanup, before processes are killed.
lab_on_cleanup() { LAB_CLEANUP_HOOKS+=("$1"); }

lab_cleanup() {
    local status=$? hook pid ns i f
    trap - EXIT INT TERM
    set +e
    for hook in "${LAB_CLEANUP_HOOKS[@]}"; do eval "$hook" >/dev/null 2>&1; done
    for pid in "${LAB_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${LAB_PIDS[@]}"; do
        for ((i = 0; i < 20; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    done
    # Anything still running inside our namespaces was started by this test
    # (e.g. a wireguard-go that warren spawned): end it before the namespace goes.
    for ns in "${LAB_NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for ns in "${LAB_NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
    # wireguard-go leaves its UAPI socket behind when killed; ours all start with $LAB.
    [ -n "$LAB" ] && rm -f /var/run/wireguard/"$LAB"*.sock
    # A killed agent leaves its interface lock and wireguard-go's log (a stopped one does not).
    [ -n "$LAB" ] && rm -f /run/warren/"$LAB"*.lock /var/log/warren/"$LAB"*-userspace.log
    if [ "$status" -ne 0 ] && [ "$status" -ne 77 ] && [ -d "$LAB_DIR" ]; then
        for f in "$LAB_DIR"/*.log; do
            [ -s "$f" ] || continue
            echo "---- $(basename "$f") (last 40 lines)" >&2
            tail -n 40 "$f" >&2
        done
    fi
    [ -n "$LAB_DIR" ] && rm -rf "$LAB_DIR"
    exit "$status"
}

# Namespace name of lab node NAME.
lab_ns() { echo "$LAB-$1"; }

# A fresh interface name "$LAB<suffix>" checked against the kernel's 15-byte limit.
lab_ifname() {
    local n="$LAB$1"
    [ "${#n}" -le 15 ] || lab_fail "interface name $n is longer than 15 bytes"
    echo "$n"
}

lab_exec() {
    local ns
    ns=$(lab_ns "$1")
    shift
    ip netns exec "$ns" "$@"
}

# Runs CMD in the background inside node NAME, output to LOGFILE (a bare name
# goes to the lab's scratch directory); the PID is killed at cleanup.
# Prints nothing; the PID is in $LAB_LAST_PID.
lab_bg() {
    local ns log
    ns=$(lab_ns "$1")
    log=$2
    shift 2
    [[ "$log" == */* ]] || log="$LAB_DIR/$log"
    # `ip netns exec` execs CMD itself, so $! is CMD's PID.
    ip netns exec "$ns" "$@" >"$log" 2>&1 </dev/null &
    LAB_LAST_PID=$!
    LAB_PIDS+=("$LAB_LAST_PID")
}

# Polls CMD every 0.1 s until it succeeds or TIMEOUT_S (may be fractional) runs
# out; on timeout prints DESC and fails the test.
lab_wait() {
    local desc=$1 timeout=$2 deadline now
    shift 2
    deadline=$(awk -v t="$timeout" -v n="$(date +%s.%N)" 'BEGIN { printf "%.3f", n + t }')
    while true; do
        "$@" >/dev/null 2>&1 && return 0
        now=$(date +%s.%N)
        if awk -v n="$now" -v d="$deadline" 'BEGIN { exit !(n >= d) }'; then
            lab_fail "timed out after ${timeout}s waiting for: $desc"
        fi
        sleep 0.1
    done
}

# Like lab_wait but returns 1 instead of failing the test.
lab_poll() {
    local timeout=$1 deadline
    shift
    deadline=$(awk -v t="$timeout" -v n="$(date +%s.%N)" 'BEGIN { printf "%.3f", n + t }')
    while true; do
        "$@" >/dev/null 2>&1 && return 0
        awk -v n="$(date +%s.%N)" -v d="$deadline" 'BEGIN { exit !(n >= d) }' && return 1
        sleep 0.1
    done
}

lab_new_ns() {
    local ns
    ns=$(lab_ns "$1")
    ip netns add "$ns" || lab_fail "creating namespace $ns"
    LAB_NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
}

# Bridges inside a namespace would hand frames to iptables/nftables (bridge-nf
# is built into these kernels): switch that off so bridged traffic is plain L2.
lab_no_bridge_nf() {
    local f
    for f in /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-ip6tables \
        /proc/sys/net/bridge/bridge-nf-call-arptables; do
        ip netns exec "$(lab_ns "$1")" sh -c "[ ! -e $f ] || echo 0 > $f"
    done
}

# The fake internet: one namespace holding bridge br0 that every public host
# and router WAN plugs into, and routing between the two documentation /24s
# as the ISP (gateway .254 in each). Private addresses are not routed, so
# traffic to a 10.x address never crosses the internet by accident.
lab_internet() {
    local ns
    ns=$(lab_ns inet)
    lab_new_ns inet
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" addr add 203.0.113.254/24 dev br0
    ip -n "$ns" addr add 198.51.100.254/24 dev br0
    ip -n "$ns" link set br0 up
    lab_no_bridge_nf inet
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    # Hosts of both /24s share the segment: no redirects teaching them shortcuts.
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.br0.send_redirects=0
    LAB_LAN_PREFIX[inet]=24
}

# The internet gateway for a public address (.254 of its /24).
lab_inet_gw() { echo "${1%.*}.254"; }

# Connects node NAME's eth0 to the bridge of UPSTREAM (inet or a router's LAN).
lab_plug() {
    local name=$1 upstream=$2 port
    port="v-$name"
    port=${port:0:15}
    ip link add eth0 netns "$(lab_ns "$name")" type veth peer name "$port" netns "$(lab_ns "$upstream")" ||
        lab_fail "creating veth for $name"
    ip -n "$(lab_ns "$upstream")" link set "$port" master br0 up
    ip -n "$(lab_ns "$name")" link set eth0 up
}

# A host on the internet with one public address.
lab_public_host() {
    local name=$1 ip=$2
    lab_new_ns "$name"
    lab_plug "$name" inet
    ip -n "$(lab_ns "$name")" addr add "$ip/24" dev eth0
    ip -n "$(lab_ns "$name")" route add default via "$(lab_inet_gw "$ip")"
}

# lab_router NAME KIND WAN_IP LAN_CIDR [UPSTREAM]
# LAN_CIDR is the router's own LAN address with prefix (10.1.0.1/24). UPSTREAM
# defaults to the internet; name another router for double NAT.
lab_router() {
    local name=$1 kind=$2 wan=$3 lan=$4 upstream=${5:-inet} ns
    case "$kind" in open | cone | symmetric | udpblock) ;; *) lab_fail "unknown router kind $kind" ;; esac
    ns=$(lab_ns "$name")
    lab_new_ns "$name"
    lab_plug "$name" "$upstream"
    ip -n "$ns" addr add "$wan/${LAB_LAN_PREFIX[$upstream]}" dev eth0
    if [ "$upstream" = inet ]; then
        ip -n "$ns" route add default via "$(lab_inet_gw "$wan")"
    else
        ip -n "$ns" route add default via "${LAB_LAN_GW[$upstream]}"
    fi
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" addr add "$lan" dev br0
    ip -n "$ns" link set br0 up
    lab_no_bridge_nf "$name"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    LAB_LAN_GW[$name]=${lan%/*}
    LAB_LAN_PREFIX[$name]=${lan#*/}
    LAB_KIND[$name]=$kind
    LAB_WAN_IP[$name]=$wan
    if [ "$kind" = open ]; then
        # Answer ARP on the WAN for the LAN's public addresses (a slice of the
        # WAN's /24) so the internet reaches them on-link, as if routed to us.
        ip netns exec "$ns" sysctl -qw net.ipv4.conf.eth0.proxy_arp=1
        return 0
    fi
    local masq="masquerade" udpdrop=""
    [ "$kind" = symmetric ] && masq="masquerade random,fully-random"
    [ "$kind" = udpblock ] && udpdrop='
        oifname "eth0" udp dport != 53 drop
        iifname "eth0" udp sport != 53 drop'
    ip netns exec "$ns" nft -f - <<EOF || lab_fail "loading nftables rules into router $name"
table ip lab {
    chain input {
        type filter hook input priority filter; policy accept;
        # Unsolicited inbound must not even create a conntrack entry, or it can
        # steal the port a LAN host is about to be mapped to.
        iifname "eth0" ct state established,related accept
        iifname "eth0" drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;$udpdrop
        # Port forwards (lab_upnp's miniupnpd) are openings the owner asked for.
        ct status dnat accept
        ct state established,related accept
        iifname "eth0" drop
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        # Only forwarded LAN traffic: the router's own (miniupnpd's STUN
        # check of its WAN address) keeps its ports, as on a home router.
        oifname "eth0" ip saddr != $wan $masq
    }
}
EOF
}

# lab_upnp ROUTER STUN_IP STUN_ALT_IP
# Turns a NAT router into a UPnP-IGD / NAT-PMP / PCP router: Debian's miniupnpd
# (nftables backend) serving its LAN, port forwards in its own table. The
# documentation prefixes count as reserved to miniupnpd, so it must learn that
# its WAN address is usable by STUN with CHANGE-REQUEST: STUN_IP and
# STUN_ALT_IP are an RFC 5780 STUN server (turnserver -L IP -L ALT_IP) that
# must already be running. The router accepts that server's answers to itself
# (they come from the other address and port, so they look unsolicited).
# UPnP clients need to ignore "not connected" (`upnpc -i`), see DESIGN.md.
lab_upnp() {
    local router=$1 stun=$2 alt=$3 ns conf log
    lab_require_cmd miniupnpd
    ns=$(lab_ns "$router")
    case "${LAB_KIND[$router]:-}" in cone | symmetric) ;; *) lab_fail "lab_upnp: $router is not a NAT router" ;; esac
    ip netns exec "$ns" nft insert rule ip lab input iifname eth0 ip saddr "{ $stun, $alt }" \
        udp sport "{ 3478, 3479 }" accept || lab_fail "lab_upnp: opening $router for STUN answers"
    ip netns exec "$ns" nft -f - <<EOF || lab_fail "lab_upnp: creating miniupnpd's table in $router"
table inet miniupnpd {
    chain forward { type filter hook forward priority filter - 1; policy accept; jump forward_upnp; }
    chain forward_upnp {}
    chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_upnp; }
    chain prerouting_upnp {}
    chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; jump postrouting_upnp; }
    chain postrouting_upnp {}
}
EOF
    conf="$LAB_DIR/miniupnpd-$router.conf"
    log="$LAB_DIR/miniupnpd-$router.log"
    cat >"$conf" <<EOF
ext_ifname=eth0
listening_ip=br0
port=5000
enable_upnp=yes
enable_natpmp=yes
ext_perform_stun=yes
ext_stun_host=$stun
ext_stun_port=3478
secure_mode=yes
system_uptime=yes
lease_file=$LAB_DIR/miniupnpd-$router.leases
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
upnp_forward_chain=forward_upnp
upnp_nat_chain=prerouting_upnp
upnp_nat_postrouting_chain=postrouting_upnp
uuid=$(cat /proc/sys/kernel/random/uuid)
allow 1024-65535 ${LAB_LAN_GW[$router]%.*}.0/${LAB_LAN_PREFIX[$router]} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF
    lab_bg "$router" "$log" miniupnpd -d -f "$conf" -P "$LAB_DIR/miniupnpd-$router.pid"
    lab_wait "miniupnpd on $router to start serving" 20 grep -q 'Listening for NAT-PMP' "$log"
    if grep -q 'Port forwarding is now disabled' "$log"; then
        lab_fail "miniupnpd on $router disabled port forwarding (STUN check failed): $(grep 'STUN:' "$log" | tail -n 1)"
    fi
}

# A host on ROUTER's LAN bridge; several hosts on one router share the LAN.
lab_lan_host() {
    local name=$1 router=$2 ip=$3
    lab_new_ns "$name"
    lab_plug "$name" "$router"
    ip -n "$(lab_ns "$name")" addr add "$ip/${LAB_LAN_PREFIX[$router]}" dev eth0
    ip -n "$(lab_ns "$name")" route add default via "${LAB_LAN_GW[$router]}"
}

# lab_conntrack_mapping ROUTER LAN_IP LAN_PORT [DST_IP [DST_PORT]]
# Prints the public IP:PORT that ROUTER's NAT maps LAN_IP:LAN_PORT (UDP) to,
# one distinct mapping per line (a symmetric NAT has one per destination).
# For double NAT, ask the outer router with the inner router's WAN address.
lab_conntrack_mapping() {
    local router=$1 src=$2 sport=$3 dst=${4:-} dport=${5:-}
    local args=(-L -p udp --orig-src "$src" --orig-port-src "$sport")
    [ -n "$dst" ] && args+=(--orig-dst "$dst")
    [ -n "$dport" ] && args+=(--orig-port-dst "$dport")
    # The reply tuple (second src=/dst= set) is addressed to the mapping.
    lab_exec "$router" conntrack "${args[@]}" 2>/dev/null | awk '{
        n = 0; m = 0; ip = ""; port = ""
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^dst=/) { n++; if (n == 2) ip = substr($i, 5) }
            if ($i ~ /^dport=/) { m++; if (m == 2) port = substr($i, 7) }
        }
        if (ip != "" && port != "") print ip ":" port
    }' | sort -u
}

# Public key of a base64 private key file, with the real `wg` tool.
lab_pubkey() { wg pubkey <"$1"; }

# Writes a fresh private key to FILE (mode 600).
lab_genkey() {
    (umask 077 && wg genkey >"$1")
}

# lab_flow_counter NODE
# Counts every UDP flow (source IP:port, destination IP:port) that enters
# NODE's bridge br0: the internet (lab_internet) or a router's LAN. A bridge
# family table at prerouting sees each frame once as it enters from a port,
# whether the bridge then forwards it (same segment; bridge-nf is off, so ip
# family hooks never see those) or hands it to the namespace to route. Read
# the counts with lab_flow_packets. Tests use it to prove traffic took a path
# on the wire, independently of what the agents report.
lab_flow_counter() {
    lab_exec "$1" nft -f - <<'NFT' || lab_fail "loading the flow counter into $1"
table bridge lab_flows {
    set flows {
        type ipv4_addr . inet_service . ipv4_addr . inet_service
        flags dynamic
        size 65535
        counter
    }
    chain prerouting {
        type filter hook prerouting priority filter; policy accept;
        ip protocol udp update @flows { ip saddr . udp sport . ip daddr . udp dport }
    }
}
NFT
}

# lab_flow_packets NODE SRC_IP:PORT DST_IP:PORT
# Prints how many UDP packets went from SRC to DST across NODE's bridge (0 if none).
lab_flow_packets() {
    lab_exec "$1" nft -j list set bridge lab_flows flows 2>/dev/null | python3 -c '
import json, sys
src, dst = sys.argv[1].rsplit(":", 1), sys.argv[2].rsplit(":", 1)
want = [src[0], int(src[1]), dst[0], int(dst[1])]
n = 0
for obj in json.load(sys.stdin).get("nftables", []):
    for e in obj.get("set", {}).get("elem", []):
        e = e.get("elem", e)
        if isinstance(e, dict) and e.get("val", {}).get("concat") == want:
            n = e.get("counter", {}).get("packets", 0)
print(n)' "$2" "$3"
}

# lab_cut_udp NODE IP1 IP2
# Drops UDP between IP1 and IP2 (both directions) on NODE's bridge br0,
# leaving TCP (the relay) and everything else alone. Bridge family again: two
# hosts on one segment of the fake internet are bridged, never routed, so an
# ip family rule in a forward chain would not see their traffic.
lab_cut_udp() {
    lab_exec "$1" nft -f - <<NFT || lab_fail "cutting UDP $2 <-> $3 in $1"
table bridge lab_cut {
    chain prerouting {
        type filter hook prerouting priority filter - 1; policy accept;
        ip saddr $2 ip daddr $3 ip protocol udp drop
        ip saddr $3 ip daddr $2 ip protocol udp drop
    }
}
NFT
}

# Undoes lab_cut_udp NODE.
lab_uncut_udp() { lab_exec "$1" nft delete table bridge lab_cut; }

# lab_wg_endpoint NODE IFNAME PUBLIC_KEY
# The endpoint NODE's WireGuard has for that peer, as `wg show` says ("(none)" if none).
lab_wg_endpoint() {
    lab_exec "$1" wg show "$2" endpoints 2>/dev/null | awk -v k="$3" '$1 == k { print $2 }'
}

# lab_stop PID: stops a process lab_bg started (SIGTERM, SIGKILL after 5 s),
# reaps it and drops it from the cleanup list, so a test that restarts
# processes many times never has cleanup signal a recycled PID.
lab_stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!LAB_PIDS[@]}"; do
        if [ "${LAB_PIDS[i]}" = "$pid" ]; then unset 'LAB_PIDS[i]'; fi
    done
}
