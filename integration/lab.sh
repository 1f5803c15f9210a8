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
# `lab_upnp ROUTER ...` adds miniupnpd (UPnP-IGD, NAT-PMP, PCP, or a subset) to a NAT
# router; `lab_upnp_restart ROUTER` restarts it with its mappings lost.

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
declare -gA LAB_UPNP_PID=() LAB_UPNP_PROTOCOLS=() LAB_UPNP_STARTS=()

# Every bridge's own address (locally administered). No two bridges share a
# segment: a router's WAN is a veth, so one address serves them all.
LAB_BRIDGE_MAC=02:00:00:00:00:01

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
    # A bridge without an address of its own takes the lowest of its ports'
    # and changes it as ports are plugged in later; hosts that already know
    # the old one then send frames the bridge no longer takes as its own
    # (dropped as for another host) until their neighbour entry times out,
    # tens of seconds without the internet. A fixed address never changes.
    ip -n "$ns" link add br0 address "$LAB_BRIDGE_MAC" type bridge
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
    # A fixed address, as for the internet's bridge (lab_internet).
    ip -n "$ns" link add br0 address "$LAB_BRIDGE_MAC" type bridge
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

# lab_upnp ROUTER STUN_IP STUN_ALT_IP [PROTOCOLS]
# Turns a NAT router into a port-mapping router: Debian's miniupnpd (nftables
# backend) serving its LAN, port forwards in its own table `inet miniupnpd`
# (chains prerouting_upnp, forward_upnp, postrouting_upnp). PROTOCOLS:
#   all     UPnP IGD, PCP and NAT-PMP (default)
#   upnp    UPnP IGD only
#   pcp     PCP and NAT-PMP, no UPnP: a client that tries PCP first gets PCP
#   natpmp  NAT-PMP only, no UPnP: emulates an old NAT-PMP router that
#           ignores PCP. miniupnpd 2.3 answers PCP and NAT-PMP on UDP 5351
#           behind the one option enable_natpmp, so an nft table drops what
#           tells them apart, the first payload byte (the version: 0 NAT-PMP,
#           2 PCP), both ways: PCP requests in from the LAN, and miniupnpd's
#           PCP announcements out to it. A PCP client gets no answer at all
#           (some old routers instead answer "unsupported version"; that is
#           not emulated) and must fall back to NAT-PMP on its retry budget.
# The documentation prefixes count as reserved to miniupnpd, so it must learn
# that its WAN address is usable by STUN with CHANGE-REQUEST: STUN_IP and
# STUN_ALT_IP are an RFC 5780 STUN server (turnserver -L IP -L ALT_IP) that
# must already be running. The router accepts that server's answers to itself
# (they come from the other address and port, so they look unsolicited).
# UPnP clients need to ignore "not connected" (`upnpc -i`), see DESIGN.md.
# The PCP / NAT-PMP epoch is the daemon's own uptime (system_uptime=no), so
# it goes backwards when lab_upnp_restart restarts the daemon, as after a
# router reboot.
lab_upnp() {
    local router=$1 stun=$2 alt=$3 protocols=${4:-all} ns conf upnp natpmp
    lab_require_cmd miniupnpd
    ns=$(lab_ns "$router")
    case "${LAB_KIND[$router]:-}" in cone | symmetric) ;; *) lab_fail "lab_upnp: $router is not a NAT router" ;; esac
    case "$protocols" in
    all) upnp=yes natpmp=yes ;;
    upnp) upnp=yes natpmp=no ;;
    pcp | natpmp) upnp=no natpmp=yes ;;
    *) lab_fail "lab_upnp: unknown protocols '$protocols' (all, upnp, pcp, natpmp)" ;;
    esac
    LAB_UPNP_PROTOCOLS[$router]=$protocols
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
    if [ "$protocols" = natpmp ]; then
        # @th,64,8: the 8 bits after the 8-byte UDP header, the version byte.
        ip netns exec "$ns" nft -f - <<'EOF' || lab_fail "lab_upnp: making $router deaf to PCP"
table ip lab_natpmp_only {
    chain input {
        type filter hook input priority filter - 1; policy accept;
        iifname "br0" udp dport 5351 @th,64,8 2 drop
    }
    chain output {
        type filter hook output priority filter - 1; policy accept;
        oifname "br0" udp sport 5351 @th,64,8 2 drop
    }
}
EOF
    fi
    conf="$LAB_DIR/miniupnpd-$router.conf"
    cat >"$conf" <<EOF
ext_ifname=eth0
listening_ip=br0
port=5000
enable_upnp=$upnp
enable_natpmp=$natpmp
ext_perform_stun=yes
ext_stun_host=$stun
ext_stun_port=3478
secure_mode=yes
system_uptime=no
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
    lab_upnp_start "$router"
}

# Starts ROUTER's miniupnpd with the config lab_upnp wrote and waits until it
# serves what its PROTOCOLS say (and has not disabled forwarding). Each start
# logs to its own file: miniupnpd-ROUTER.log, then miniupnpd-ROUTER-2.log, ...
lab_upnp_start() {
    local router=$1 log ready='Listening for NAT-PMP'
    LAB_UPNP_STARTS[$router]=$((${LAB_UPNP_STARTS[$router]:-0} + 1))
    log="$LAB_DIR/miniupnpd-$router.log"
    [ "${LAB_UPNP_STARTS[$router]}" = 1 ] || log="$LAB_DIR/miniupnpd-$router-${LAB_UPNP_STARTS[$router]}.log"
    lab_bg "$router" "$log" miniupnpd -d -f "$LAB_DIR/miniupnpd-$router.conf" -P "$LAB_DIR/miniupnpd-$router.pid"
    LAB_UPNP_PID[$router]=$LAB_LAST_PID
    [ "${LAB_UPNP_PROTOCOLS[$router]}" = upnp ] && ready='HTTP listening on port'
    lab_wait "miniupnpd on $router to start serving (${LAB_UPNP_PROTOCOLS[$router]})" 20 grep -q "$ready" "$log"
    if grep -q 'Port forwarding is now disabled' "$log"; then
        lab_fail "miniupnpd on $router disabled port forwarding (STUN check failed): $(grep 'STUN:' "$log" | tail -n 1)"
    fi
}

# lab_stun_server [IP ALT_IP] (after lab_internet)
# The public host `stun`: an RFC 5780 STUN server (coturn) on IP and, for
# CHANGE-REQUEST answers, ALT_IP (default 203.0.113.5 and .6); returns once
# it listens on both.
lab_stun_server() {
    local ip=${1:-203.0.113.5} alt=${2:-203.0.113.6}
    lab_require_cmd turnserver
    lab_public_host stun "$ip"
    lab_exec stun ip addr add "$alt/24" dev eth0
    lab_bg stun turnserver.log turnserver -n -L "$ip" -L "$alt" --stun-only --no-cli \
        --no-tls --no-dtls --log-file stdout --simple-log --pidfile "$LAB_DIR/turnserver.pid"
    lab_wait "turnserver listening on $ip and $alt" 10 lab_stun_listening "$alt"
}
lab_stun_listening() { lab_exec stun ss -Hlun | grep -q "$1:3479"; }

# lab_upnp_site [PROTOCOLS]
# The stage the UPnP tests share: the internet, lab_stun_server (for
# miniupnpd's WAN address check), and the cone router `rupnp` (WAN
# 198.51.100.20, LAN 10.1.0.1/24) serving PROTOCOLS (lab_upnp, default all).
# LAN hosts are the caller's to add.
lab_upnp_site() {
    local protocols=${1:-all}
    lab_internet
    lab_stun_server
    lab_router rupnp cone 198.51.100.20 10.1.0.1/24
    lab_wait "router reaching the STUN server" 10 lab_exec rupnp ping -c1 -W1 203.0.113.5
    lab_upnp rupnp 203.0.113.5 203.0.113.6 "$protocols"
}

# lab_upnp_restart ROUTER
# Emulates ROUTER rebooting its mapping daemon with every mapping lost: stops
# its miniupnpd (the PID lab_upnp recorded), deletes the lease file, flushes
# the forwards from its nftables chains and its conntrack table, and starts
# it again with the same config. Clients must notice on their own (PCP /
# NAT-PMP epoch gone backwards; UPnP entry gone) and map again.
lab_upnp_restart() {
    local router=$1 ns chain
    ns=$(lab_ns "$router")
    [ -n "${LAB_UPNP_PID[$router]:-}" ] || lab_fail "lab_upnp_restart: $router has no miniupnpd (lab_upnp first)"
    lab_stop "${LAB_UPNP_PID[$router]}"
    LAB_UPNP_PID[$router]=
    rm -f "$LAB_DIR/miniupnpd-$router.leases" "$LAB_DIR/miniupnpd-$router.pid"
    for chain in prerouting_upnp forward_upnp postrouting_upnp; do
        ip netns exec "$ns" nft flush chain inet miniupnpd "$chain" ||
            lab_fail "lab_upnp_restart: flushing $chain in $router"
    done
    ip netns exec "$ns" conntrack -F >/dev/null 2>&1 || lab_fail "lab_upnp_restart: flushing conntrack in $router"
    lab_upnp_start "$router"
}

# lab_pcp NODE GATEWAY announce
# lab_pcp NODE GATEWAY map INTERNAL_PORT SUGGESTED_EXTERNAL_PORT LIFETIME_S
# A minimal PCP client (RFC 6887, UDP 5351; no Debian package has one) run
# inside NODE, for checking the lab's routers by hand and in tests: sends an
# ANNOUNCE or a UDP MAP request (three tries, 1 s apart) and prints the answer
# as "result R lifetime L epoch E" (plus "external IP:PORT" for MAP). Status 0
# on result SUCCESS, 2 on another result, 1 on no answer (also an ICMP
# refusal: nothing listens).
lab_pcp() {
    local node=$1
    shift
    lab_exec "$node" python3 - "$@" <<'PY'
import ipaddress, os, socket, struct, sys
gw, op = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((gw, 5351))
me = ipaddress.IPv6Address("::ffff:" + s.getsockname()[0]).packed
if op == "announce":
    req = struct.pack("!BBHI", 2, 0, 0, 0) + me
elif op == "map":
    iport, eport, life = (int(a) for a in sys.argv[3:6])
    req = struct.pack("!BBHI", 2, 1, 0, life) + me + os.urandom(12) + struct.pack("!B3xHH", 17, iport, eport) + bytes(16)
else:
    sys.exit("lab_pcp: announce or map")
s.settimeout(1)
for _ in range(3):
    try:
        s.send(req)
        r = s.recv(1100)
        break
    except socket.timeout:
        pass
    except ConnectionRefusedError:
        print("no answer (port unreachable)")
        sys.exit(1)
else:
    print("no answer")
    sys.exit(1)
if len(r) < 24 or r[0] != 2 or r[1] != (req[1] | 0x80):
    print("not a PCP answer: " + r[:24].hex())
    sys.exit(2)
res, life, epoch = r[3], *struct.unpack("!II", r[4:12])
out = "result %d lifetime %d epoch %d" % (res, life, epoch)
if op == "map" and len(r) >= 60:
    eport = struct.unpack("!H", r[42:44])[0]
    out += " external %s:%d" % (ipaddress.IPv6Address(r[44:60]).ipv4_mapped, eport)
print(out)
sys.exit(0 if res == 0 else 2)
PY
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

# lab_wire_flows ROUTER LAN_IP LAN_PORT PEER_IP
# The UDP flows that LAN_IP:LAN_PORT has with PEER_IP as they cross the wire
# beyond ROUTER's NAT, one "LOCAL_PUBLIC REMOTE" line each (IP:PORT both), from
# ROUTER's conntrack: flows the LAN host started (the peer answers to the
# NAT's mapping) and flows a port forward let in (the peer sent to the
# forward's external port). A symmetric NAT with a forward can hold both for
# one peer: when the host sent first from its mapped port (out through a
# fresh random port), the peer's packets that then come in through the
# forward clash with that flow, and the kernel rewrites their source port on
# the way in, so the LAN host's view of the peer (e.g. `wg show`) is not the
# peer's address on the wire. This reads the wire side of both.
lab_wire_flows() {
    local router=$1 own=$2 port=$3 peer=$4
    lab_exec "$router" conntrack -L -p udp 2>/dev/null | awk -v own="$own" -v port="$port" -v peer="$peer" '{
        n = 0
        delete t
        for (i = 1; i <= NF; i++) {
            split($i, kv, "=")
            if (kv[1] == "src") n++
            if (n >= 1 && n <= 2 && (kv[1] == "src" || kv[1] == "dst" || kv[1] == "sport" || kv[1] == "dport")) t[n, kv[1]] = kv[2]
        }
        if (n < 2) next
        # Started by the LAN host: the reply comes back to its mapping.
        if (t[1, "src"] == own && t[1, "sport"] == port && t[1, "dst"] == peer)
            print t[2, "dst"] ":" t[2, "dport"], t[1, "dst"] ":" t[1, "dport"]
        # Let in by a forward: the peer sent to its external port.
        if (t[2, "src"] == own && t[2, "sport"] == port && t[1, "src"] == peer)
            print t[1, "dst"] ":" t[1, "dport"], t[1, "src"] ":" t[1, "sport"]
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

# lab_flow_dump NODE FILE: saves every flow count of lab_flow_counter NODE
# (for lab_flow_grown; one read for any number of flows).
lab_flow_dump() { lab_exec "$1" nft -j list set bridge lab_flows flows >"$2" 2>/dev/null || : >"$2"; }

# lab_flow_grown BEFORE AFTER A,B...
# Of the endpoint pairs A,B (IP:PORT each), the first whose UDP flows A->B
# and B->A both have more packets in dump AFTER than in dump BEFORE: prints
# "A B". Else prints each pair's counts ("A->B n->n, back n->n") and fails.
lab_flow_grown() {
    python3 - "$@" <<'PY'
import json, sys
def counts(f):
    out = {}
    try:
        for obj in json.load(open(f)).get("nftables", []):
            for e in obj.get("set", {}).get("elem", []):
                e = e.get("elem", e)
                if isinstance(e, dict) and e.get("val", {}).get("concat"):
                    out["%s:%s>%s:%s" % tuple(e["val"]["concat"])] = e.get("counter", {}).get("packets", 0)
    except (OSError, ValueError):
        pass
    return out
b, a = counts(sys.argv[1]), counts(sys.argv[2])
seen = []
for p in sys.argv[3:]:
    x, y = p.split(",")
    there, back = x + ">" + y, y + ">" + x
    if a.get(there, 0) > b.get(there, 0) and a.get(back, 0) > b.get(back, 0):
        print(x, y)
        sys.exit(0)
    seen.append("%s->%s %d->%d, back %d->%d" % (x, y, b.get(there, 0), a.get(there, 0), b.get(back, 0), a.get(back, 0)))
print("; ".join(seen) or "no endpoints")
sys.exit(1)
PY
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
