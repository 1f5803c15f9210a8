#!/usr/bin/env bash
# tiers: lab
# The OpenWrt package's uci-defaults script (first boot after install) run
# against a firewall config like OpenWrt's default, with /etc a tmpfs in a
# mount namespace of its own and integration/openwrt/uci, a stand-in for
# OpenWrt's uci (Debian has none: it does get, batch, set, commit with uci's
# file syntax), on PATH: it adds a zone for the mesh interface and a WAN rule
# for the agent's two UDP ports, leaves every other section as it was, and a
# second run changes nothing. The port and interface follow /etc/config/warren;
# without a firewall config it does nothing. Not exercised: fw4 reading the result.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd busybox unshare python3
lab_init

SCRIPT=$LAB_ROOT/packaging/openwrt/warren/files/warren.uci-defaults
SHIM=$LAB_ROOT/integration/openwrt
UCI=$SHIM/uci

cat >"$LAB_DIR/firewall" <<'UCI'
config defaults
	option input 'REJECT'
	option output 'ACCEPT'
	option forward 'REJECT'

config zone
	option name 'lan'
	list network 'lan'
	option input 'ACCEPT'
	option output 'ACCEPT'
	option forward 'ACCEPT'

config zone
	option name 'wan'
	list network 'wan'
	list network 'wan6'
	option input 'REJECT'
	option output 'ACCEPT'
	option forward 'REJECT'
	option masq '1'

config forwarding
	option src 'lan'
	option dest 'wan'
UCI

# defaults IN OUT [WARREN_CONFIG]: runs the script twice on /etc/config/firewall
# = IN (absent if IN is -), leaves the result after each run in OUT.1, OUT.2.
defaults() {
    local in=$1 out=$2 warren=${3:-$LAB_ROOT/packaging/openwrt/warren/files/warren.config}
    # shellcheck disable=SC2016 # expanded by the inner sh
    unshare -m sh -c '
        mount -t tmpfs tmpfs /etc && mkdir /etc/config && cp "$3" /etc/config/warren &&
        if [ "$2" != - ]; then cp "$2" /etc/config/firewall; fi &&
        for i in 1 2; do
            PATH="$1:$PATH" busybox sh "$4" || exit 1
            if [ -f /etc/config/firewall ]; then cp /etc/config/firewall "$5.$i"; fi
        done' _ "$SHIM" "$in" "$warren" "$SCRIPT" "$out"
}
get() { "$UCI" -c "$(dirname "$1")" get "$(basename "$1").$2"; }
want() { # FILE KEY VALUE
    local got
    got=$(get "$1" "$2") || lab_fail "$2 is missing from $(cat "$1")"
    [ "$got" = "$3" ] || lab_fail "$2 is '$got', not '$3'"
}

defaults "$LAB_DIR/firewall" "$LAB_DIR/out" || lab_fail "the uci-defaults script failed"
mkdir -p "$LAB_DIR/c1" && cp "$LAB_DIR/out.1" "$LAB_DIR/c1/firewall"
F=$LAB_DIR/c1/firewall
echo "--- firewall after uci-defaults"
cat "$F"
want "$F" warren zone
want "$F" warren.name warren
want "$F" warren.device warren0
want "$F" warren.input ACCEPT
want "$F" warren.forward REJECT
want "$F" warren_wan rule
want "$F" warren_wan.src wan
want "$F" warren_wan.proto udp
want "$F" warren_wan.dest_port 51820-51821
want "$F" warren_wan.target ACCEPT
# Every section that was there is still there as it was.
diff <("$UCI" -c "$LAB_DIR" show firewall) <("$UCI" -c "$LAB_DIR/c1" show firewall | grep -v '^firewall\.warren') ||
    lab_fail "the script changed sections that are not its own"
cmp "$LAB_DIR/out.1" "$LAB_DIR/out.2" || lab_fail "a second run changed the firewall config"
echo "second run: no change"

# The mesh interface and port come from /etc/config/warren.
cp "$LAB_ROOT/packaging/openwrt/warren/files/warren.config" "$LAB_DIR/warren"
printf "\toption port '41000'\n\toption interface 'mesh0'\n" >>"$LAB_DIR/warren"
defaults "$LAB_DIR/firewall" "$LAB_DIR/custom" "$LAB_DIR/warren" || lab_fail "the script failed with a custom port"
mkdir -p "$LAB_DIR/c2" && cp "$LAB_DIR/custom.1" "$LAB_DIR/c2/firewall"
want "$LAB_DIR/c2/firewall" warren.device mesh0
want "$LAB_DIR/c2/firewall" warren_wan.dest_port 41000-41001

# No firewall package: nothing to do, and no config is made up.
defaults - "$LAB_DIR/none" || lab_fail "the script failed without a firewall config"
[ ! -e "$LAB_DIR/none.1" ] || lab_fail "the script created a firewall config"
echo "no firewall config: left alone"
