#!/usr/bin/env bash
# tiers: lab
# Bad input to `warren wg`: each case must exit non-zero with exactly one line
# on stderr that starts with "warren:" and names what was wrong, never panic,
# and leave no interface, process or UAPI socket behind.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg setpriv python3
lab_init
[ -x "$WARREN" ] || lab_fail "no warren binary at $WARREN"

lab_internet
lab_public_host a 203.0.113.1
IF=$(lab_ifname a)
cd "$LAB_DIR"
lab_genkey a.key
PUB1=$(wg genkey | wg pubkey)
PUB2=$(wg genkey | wg pubkey)
links_before=$(lab_exec a ip -o link show | awk -F': ' '{print $2}' | sort)

# config FILE [PRIVATE_KEY_FILE] [PEER_STANZAS...]
config() {
    local file=$1 key=${2:-$LAB_DIR/a.key}
    shift 2 || shift $#
    {
        echo "private_key_file = \"$key\""
        echo "listen_port = 51820"
        echo 'address = ["10.9.0.1/24"]'
        for p in "$@"; do printf '\n%s\n' "$p"; done
    } >"$file"
}
peer() { printf '[[peer]]\npublic_key = "%s"\nallowed_ips = [%s]\n' "$1" "$2"; }

cases=0
# expect_error DESC PATTERN CMD...: run CMD in node a, check the failure.
expect_error() {
    local desc=$1 pattern=$2 rc=0 lines
    shift 2
    cases=$((cases + 1))
    lab_exec a "$@" >"out.$cases" 2>"err.$cases" || rc=$?
    echo "-- $desc: exit $rc: $(head -c 300 "err.$cases")"
    [ "$rc" -ne 0 ] || lab_fail "$desc: exit status 0"
    if grep -q 'panicked' "err.$cases" || [ "$rc" -eq 101 ]; then lab_fail "$desc: panicked"; fi
    lines=$(wc -l <"err.$cases")
    [ "$lines" -eq 1 ] || lab_fail "$desc: $lines lines on stderr, want exactly 1"
    grep -q '^warren: ' "err.$cases" || lab_fail "$desc: stderr does not start with 'warren:'"
    grep -Eqi "$pattern" "err.$cases" || lab_fail "$desc: stderr does not name the problem (/$pattern/)"
    nothing_left "$desc"
}
nothing_left() {
    local links
    # wireguard-go may take a moment to go after a failed start.
    lab_poll 5 bash -c "[ -z \"\$(ip netns pids $(lab_ns a))\" ]" ||
        lab_fail "$1: processes left behind: $(ip netns pids "$(lab_ns a)" | xargs -r ps -o pid=,args= -p)"
    links=$(lab_exec a ip -o link show | awk -F': ' '{print $2}' | sort)
    [ "$links" = "$links_before" ] || lab_fail "$1: interfaces left behind: $links"
    [ ! -e "/var/run/wireguard/$IF.sock" ] || lab_fail "$1: UAPI socket /var/run/wireguard/$IF.sock left behind"
}
apply() { echo "$WARREN" wg apply --backend userspace --interface "$IF" --config "$1"; }

# Malformed keys: a peer's public key, the private key file's content.
config bad-pub.toml "" "$(peer 'not-a-key' '"10.9.0.2/32"')"
expect_error "malformed public key" 'not-a-key|public.?key' $(apply bad-pub.toml)
config short-pub.toml "" "$(peer "${PUB1:0:20}" '"10.9.0.2/32"')"
expect_error "truncated public key" 'public.?key|key' $(apply short-pub.toml)
(umask 077 && echo 'this is no key' >bad.key)
config bad-priv.toml "$LAB_DIR/bad.key" "$(peer "$PUB1" '"10.9.0.2/32"')"
expect_error "malformed private key file" 'bad\.key|private.?key' $(apply bad-priv.toml)
lab_genkey open.key
chmod 644 open.key
config open-priv.toml "$LAB_DIR/open.key" "$(peer "$PUB1" '"10.9.0.2/32"')"
expect_error "private key readable by others" 'open\.key|permission|mode|readable' $(apply open-priv.toml)
config missing-priv.toml "$LAB_DIR/nonexistent.key"
expect_error "private key file missing" 'nonexistent\.key' $(apply missing-priv.toml)

# Config that is not even TOML, or has an unknown field.
echo 'listen_port = [' >garbage.toml
expect_error "config is not TOML" 'garbage\.toml|toml|parse|expected' $(apply garbage.toml)
expect_error "config file missing" 'nowhere\.toml' $(apply nowhere.toml)

# Unknown interface.
expect_error "wg show of an unknown interface" "${LAB}nope" "$WARREN" wg show --backend userspace "${LAB}nope"
# With --json the error is {"error": ...} on stdout, same exit status, nothing on stderr.
rc=0
lab_exec a "$WARREN" wg show --json --backend userspace "${LAB}nope" >out.json 2>err.json || rc=$?
echo "-- wg show --json of an unknown interface: exit $rc: $(head -c 300 out.json)"
[ "$rc" -eq 1 ] || lab_fail "wg show --json of an unknown interface: exit status $rc, want 1"
[ ! -s err.json ] || lab_fail "wg show --json of an unknown interface: stderr not empty: $(head -c 300 err.json)"
python3 -c 'import json, sys; e = json.load(open("out.json"))["error"]; sys.exit(0 if sys.argv[1] in e else 1)' "${LAB}nope" ||
    lab_fail "wg show --json of an unknown interface: no JSON error naming the interface: $(head -c 300 out.json)"
nothing_left "wg show --json of an unknown interface"
expect_error "wg delete of an unknown interface" "${LAB}nope" "$WARREN" wg delete --backend userspace "${LAB}nope"

# Two peers claiming the same allowed IPs. (One inside the other is valid:
# the longest prefix wins, as subnet routes need; see src/wg/reconcile.rs.)
config dup.toml "" "$(peer "$PUB1" '"10.9.0.2/32"')" "$(peer "$PUB2" '"10.9.0.2/32"')"
expect_error "identical allowed IPs on two peers" 'also|10\.9\.0\.2' $(apply dup.toml)

# No CAP_NET_ADMIN: root without the capability, and an unprivileged user who can read its key.
config good.toml "" "$(peer "$PUB1" '"10.9.0.2/32"')"
expect_error "root without CAP_NET_ADMIN" 'permission|not permitted|CAP_NET_ADMIN|denied' \
    setpriv --inh-caps=-net_admin --bounding-set=-net_admin $(apply good.toml)
mkdir nobody && cp a.key nobody/a.key && chown -R 65534:65534 nobody && chmod 711 "$LAB_DIR"
config nobody/good.toml "$LAB_DIR/nobody/a.key" "$(peer "$PUB1" '"10.9.0.2/32"')"
expect_error "unprivileged user" 'permission|not permitted|CAP_NET_ADMIN|denied|root' \
    setpriv --reuid=65534 --regid=65534 --clear-groups $(apply nobody/good.toml)

# The userspace implementation is not installed: a PATH without wireguard-go.
mkdir -p nowg
for t in ip; do ln -sf "$(command -v $t)" nowg/$t; done
expect_error "wireguard-go missing" 'wireguard-go' env PATH="$LAB_DIR/nowg" $(apply good.toml)

# After all that, the same interface name still works.
lab_exec a "$WARREN" wg apply --backend userspace --interface "$IF" --config good.toml >/dev/null ||
    lab_fail "a good config fails after the bad ones"
lab_exec a "$WARREN" wg delete --backend userspace "$IF" || lab_fail "deleting $IF"
nothing_left "after the good apply and delete"
echo "$cases bad inputs: one-line errors, no panic, nothing left behind"
