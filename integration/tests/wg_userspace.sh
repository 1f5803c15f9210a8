#!/usr/bin/env bash
# tiers: lab kernel
# Two hosts on the fake internet, each WireGuard interface configured only by
# `warren wg apply` (backend from WARREN_WG_BACKEND: wireguard-go here, the
# kernel module in the VM). Checks against the real tools: ping crosses the
# tunnel; `wg show dump` equals the applied config field by field; re-applying
# says "up to date" and changes nothing; dropping a peer from the config and
# re-applying stops its traffic; `warren wg delete` removes the interface.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd wg ping
lab_init
[ -x "$WARREN" ] || lab_fail "no warren binary at $WARREN"
echo "backend: ${WARREN_WG_BACKEND:-auto}"

lab_internet
lab_public_host a 203.0.113.1
lab_public_host b 203.0.113.2
IFA=$(lab_ifname a)
IFB=$(lab_ifname b)

cd "$LAB_DIR"
lab_genkey a.key
lab_genkey b.key
lab_genkey c.key
(umask 077 && wg genpsk >ab.psk)
PUBA=$(lab_pubkey a.key)
PUBB=$(lab_pubkey b.key)
# A peer that never shows up, so A keeps a second peer after B is dropped.
PUBC=$(lab_pubkey c.key)

peer_b="
[[peer]]
public_key = \"$PUBB\"
endpoint = \"203.0.113.2:51821\"
allowed_ips = [\"10.9.0.2/32\", \"10.99.0.0/16\"]
persistent_keepalive = 25
preshared_key_file = \"$LAB_DIR/ab.psk\"
"
peer_c="
[[peer]]
public_key = \"$PUBC\"
allowed_ips = [\"10.9.0.3/32\"]
"
write_a() {
    cat >a.toml <<EOF
private_key_file = "$LAB_DIR/a.key"
listen_port = 51820
fwmark = 4660
address = ["10.9.0.1/24"]
mtu = 1380
$1
EOF
}
write_a "$peer_b$peer_c"
cat >b.toml <<EOF
private_key_file = "$LAB_DIR/b.key"
listen_port = 51821
address = ["10.9.0.2/24"]

[[peer]]
public_key = "$PUBA"
endpoint = "203.0.113.1:51820"
allowed_ips = ["10.9.0.1/32"]
preshared_key_file = "$LAB_DIR/ab.psk"
EOF

lab_exec a "$WARREN" wg apply --interface "$IFA" --config a.toml || lab_fail "applying a.toml"
lab_exec b "$WARREN" wg apply --interface "$IFB" --config b.toml || lab_fail "applying b.toml"

lab_wait "ping from a to b through the tunnel" 20 lab_exec a ping -c1 -W1 10.9.0.2
lab_exec b ping -c1 -W2 10.9.0.1 >/dev/null || lab_fail "no ping from b to a"

# `wg show dump` without the live counters (handshake, rx, tx); allowed IPs sorted.
dump() {
    lab_exec "$1" wg show "$2" dump | awk -F'\t' 'NR == 1 { print; next } {
        n = split($4, ips, ","); s = ""
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (ips[j] < ips[i]) { t = ips[i]; ips[i] = ips[j]; ips[j] = t }
        for (i = 1; i <= n; i++) s = s (i > 1 ? "," : "") ips[i]
        print $1 "\t" $2 "\t" $3 "\t" s "\t" $8
    }' | sort
}
PSK=$(cat ab.psk)
expect_a=$(printf '%s\t%s\t%s\t%s\n' "$(cat a.key)" "$PUBA" 51820 0x1234
    printf '%s\t%s\t%s\t%s\t%s\n' "$PUBB" "$PSK" 203.0.113.2:51821 10.9.0.2/32,10.99.0.0/16 25
    printf '%s\t%s\t%s\t%s\t%s\n' "$PUBC" "(none)" "(none)" 10.9.0.3/32 off)
expect_b=$(printf '%s\t%s\t%s\t%s\n' "$(cat b.key)" "$PUBB" 51821 off
    printf '%s\t%s\t%s\t%s\t%s\n' "$PUBA" "$PSK" 203.0.113.1:51820 10.9.0.1/32 off)
check_dump() {
    local got
    got=$(dump "$1" "$2")
    [ "$got" = "$(sort <<<"$3")" ] || {
        echo "expected:" >&2
        sort <<<"$3" | sed 's/^[^\t]*\t[^\t]*\t/<key> <pub> /' >&2
        echo "wg show $2 dump:" >&2
        sed 's/^[^\t]*\t[^\t]*\t/<key> <pub> /' <<<"$got" >&2
        lab_fail "wg show $2 does not match the applied config ($4)"
    }
}
check_dump a "$IFA" "$expect_a" "a, first apply"
check_dump b "$IFB" "$expect_b" "b, first apply"

# Address, MTU and link state come from rtnetlink, checked with ip.
link=$(lab_exec a ip -o link show dev "$IFA")
grep -q 'mtu 1380' <<<"$link" || lab_fail "MTU not applied: $link"
grep -q ',UP' <<<"$link" || lab_fail "interface not up: $link"
lab_exec a ip -o -4 addr show dev "$IFA" | grep -q 'inet 10.9.0.1/24' || lab_fail "address not applied on $IFA"

# warren's own view agrees.
show=$(lab_exec a "$WARREN" wg show "$IFA") || lab_fail "warren wg show $IFA failed"
grep -q "$PUBB\|${PUBB:0:5}" <<<"$show" || lab_fail "warren wg show does not list peer b: $show"
json=$(lab_exec a "$WARREN" wg show --json "$IFA") || lab_fail "warren wg show --json failed"
python3 -c 'import json,sys; json.loads(sys.stdin.read())' <<<"$json" || lab_fail "warren wg show --json is not JSON"
if grep -qF "$(cat a.key)" <<<"$show$json"; then lab_fail "warren wg show prints the private key"; fi

# Re-apply: nothing to do, nothing changed, no process restarted.
pids_before=$(ip netns pids "$(lab_ns a)" | sort)
out=$(lab_exec a "$WARREN" wg apply --interface "$IFA" --config a.toml) || lab_fail "re-applying a.toml"
grep -q 'up to date' <<<"$out" || lab_fail "re-apply did not say 'up to date': $out"
check_dump a "$IFA" "$expect_a" "a, re-apply"
[ "$(ip netns pids "$(lab_ns a)" | sort)" = "$pids_before" ] || lab_fail "re-apply started or stopped processes"
lab_exec a ping -c1 -W2 10.9.0.2 >/dev/null || lab_fail "ping stopped after a no-op re-apply"

# Drop peer b from a's config: the tunnel stops carrying traffic, peer c stays.
write_a "$peer_c"
out=$(lab_exec a "$WARREN" wg apply --interface "$IFA" --config a.toml) || lab_fail "applying a.toml without b"
if grep -q 'up to date' <<<"$out"; then lab_fail "removing a peer reported 'up to date': $out"; fi
check_dump a "$IFA" "$(grep -v "^$PUBB" <<<"$expect_a")" "a, peer b removed"
if lab_exec a ping -c3 -W1 10.9.0.2 >/dev/null 2>&1; then lab_fail "a still reaches b after removing the peer"; fi
if lab_exec b ping -c3 -W1 10.9.0.1 >/dev/null 2>&1; then lab_fail "b still reaches a after a removed it"; fi

# Delete removes the interface (and, for userspace, its wireguard-go).
lab_exec a "$WARREN" wg delete "$IFA" || lab_fail "warren wg delete $IFA"
lab_wait "$IFA to disappear" 5 bash -c "! ip netns exec $(lab_ns a) ip link show dev $IFA"
lab_wait "processes in a to end" 5 bash -c "[ -z \"\$(ip netns pids $(lab_ns a))\" ]"
echo "warren wg apply/show/delete agree with wg show, ping and ip"
