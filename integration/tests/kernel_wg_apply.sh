#!/usr/bin/env bash
# tiers: kernel
#
# The kernel backend against the real wireguard.ko (run inside the VM by
# `integration/run kernel`): two hosts, each a kernel WireGuard interface
# configured only through `warren wg apply --backend kernel`; ping across;
# `wg show` reports exactly what was applied; re-applying changes nothing;
# a 1,000-peer apply and dump agree between `wg` and `warren wg show --json`;
# removing the peer stops traffic.
set -euo pipefail
. "$(dirname "$0")/../lab.sh"

WARREN=${WARREN:-target/debug/warren}
WARREN=$(realpath "$WARREN")
lab_init
lab_require_cmd wg ping python3
modprobe wireguard 2>/dev/null || true
[ -d /sys/module/wireguard ] || lab_skip "no wireguard kernel module here (run through integration/vm)"

lab_internet
lab_public_host a 203.0.113.1
lab_public_host b 203.0.113.2
IF=$(lab_ifname k)

wg_apply() { # NODE CONFIG
    lab_exec "$1" "$WARREN" wg apply --backend kernel --interface "$IF" --config "$2"
}

for n in a b; do
    "$WARREN" genkey >"$LAB_DIR/$n.key"
    chmod 600 "$LAB_DIR/$n.key"
    "$WARREN" pubkey <"$LAB_DIR/$n.key" >"$LAB_DIR/$n.pub"
done
pub_a=$(cat "$LAB_DIR/a.pub")
pub_b=$(cat "$LAB_DIR/b.pub")

cat >"$LAB_DIR/a.toml" <<EOF
private_key_file = "$LAB_DIR/a.key"
listen_port = 51820
address = ["10.77.0.1/24"]

[[peer]]
public_key = "$pub_b"
endpoint = "203.0.113.2:51821"
allowed_ips = ["10.77.0.2/32", "fd77::2/128"]
persistent_keepalive = 25
EOF
cat >"$LAB_DIR/b.toml" <<EOF
private_key_file = "$LAB_DIR/b.key"
listen_port = 51821
address = ["10.77.0.2/24"]

[[peer]]
public_key = "$pub_a"
endpoint = "203.0.113.1:51820"
allowed_ips = ["10.77.0.1/32"]
EOF

out=$(wg_apply a "$LAB_DIR/a.toml") || lab_fail "apply on a: $out"
echo "a: $out"
[[ "$out" == *created* && "$out" == *kernel* ]] || lab_fail "first apply on a should create a kernel interface: $out"
out=$(wg_apply b "$LAB_DIR/b.toml") || lab_fail "apply on b: $out"
echo "b: $out"

lab_wait "ping a -> b through the kernel tunnel" 20 lab_exec a ping -c1 -W1 10.77.0.2
lab_exec b ping -c1 -W2 10.77.0.1 >/dev/null || lab_fail "ping b -> a"

# The real tool sees exactly what was applied.
wgs() { lab_exec "$1" wg show "$IF" "${@:2}"; }
[ "$(wgs a public-key)" = "$pub_a" ] || lab_fail "a: public key $(wgs a public-key), want $pub_a"
[ "$(wgs a listen-port)" = 51820 ] || lab_fail "a: listen port $(wgs a listen-port)"
[ "$(wgs a private-key)" = "$(cat "$LAB_DIR/a.key")" ] || lab_fail "a: private key differs"
[ "$(wgs a peers)" = "$pub_b" ] || lab_fail "a: peers $(wgs a peers)"
[ "$(wgs a endpoints)" = "$pub_b	203.0.113.2:51821" ] || lab_fail "a: endpoints $(wgs a endpoints)"
ips=$(wgs a allowed-ips | cut -f2 | tr ' ' '\n' | sort | xargs)
[ "$ips" = "10.77.0.2/32 fd77::2/128" ] || lab_fail "a: allowed ips '$ips'"
[ "$(wgs a persistent-keepalive)" = "$pub_b	25" ] || lab_fail "a: keepalive $(wgs a persistent-keepalive)"
[ "$(wgs b persistent-keepalive)" = "$pub_a	off" ] || lab_fail "b: keepalive $(wgs b persistent-keepalive)"
lab_exec a ip -o addr show dev "$IF" | grep -q 'inet 10.77.0.1/24' || lab_fail "a: address missing"

# Re-applying the same config sends nothing.
out=$(wg_apply a "$LAB_DIR/a.toml") || lab_fail "re-apply on a: $out"
[[ "$out" == *"up to date"* ]] || lab_fail "re-apply on a should be a no-op: $out"

# 1,000 peers on a second interface: one apply, one dump.
IF2=$(lab_ifname m)
python3 - "$LAB_DIR" <<'EOF'
import base64, os, sys
d = sys.argv[1]
with open(f"{d}/many.toml", "w") as f:
    f.write(f'private_key_file = "{d}/a.key"\nlisten_port = 51900\n')
    for i in range(1000):
        key = base64.b64encode(os.urandom(32)).decode()
        f.write(f'\n[[peer]]\npublic_key = "{key}"\n'
                f'allowed_ips = ["10.{100 + i // 250}.{i % 250}.0/24", "fd99::{i:x}/128"]\n'
                f'endpoint = "198.51.100.{1 + i % 200}:{20000 + i}"\n')
EOF
out=$(lab_exec a "$WARREN" wg apply --backend kernel --interface "$IF2" --config "$LAB_DIR/many.toml") ||
    lab_fail "1,000-peer apply: $out"
echo "a/1000: $out"
[[ "$out" == *"1000 peers added"* ]] || lab_fail "1,000-peer apply summary: $out"
n=$(lab_exec a wg show "$IF2" peers | wc -l)
[ "$n" = 1000 ] || lab_fail "wg show lists $n peers, want 1000"
# (keys are base64 and may contain '/': count only the IP column)
n=$(lab_exec a wg show "$IF2" allowed-ips | cut -f2 | tr ' ' '\n' | grep -c /) || true
[ "$n" = 2000 ] || lab_fail "wg show lists $n allowed IPs, want 2000"
lab_exec a "$WARREN" wg show --backend kernel --json "$IF2" >"$LAB_DIR/many.json"
lab_exec a wg show "$IF2" dump >"$LAB_DIR/many.dump"
python3 - "$LAB_DIR" <<'EOF' || lab_fail "warren wg show --json disagrees with wg show dump"
import json, sys
d = sys.argv[1]
show = json.load(open(f"{d}/many.json"))
ours = {p["public_key"]: (sorted(p["allowed_ips"]), p["endpoint"]) for p in show["peers"]}
theirs = {}
for line in open(f"{d}/many.dump").read().splitlines()[1:]:
    f = line.split("\t")
    theirs[f[0]] = (sorted(f[3].split(",")), f[2])
assert len(ours) == 1000, len(ours)
assert ours == theirs, [k for k in ours if ours.get(k) != theirs.get(k)][:3]
EOF
out=$(lab_exec a "$WARREN" wg apply --backend kernel --interface "$IF2" --config "$LAB_DIR/many.toml") ||
    lab_fail "1,000-peer re-apply: $out"
[[ "$out" == *"up to date"* ]] || lab_fail "1,000-peer re-apply should be a no-op: $out"
lab_exec a "$WARREN" wg delete --backend kernel "$IF2"
! lab_exec a ip link show "$IF2" >/dev/null 2>&1 || lab_fail "$IF2 still there after wg delete"

# Removing the peer stops traffic.
sed -i '/^\[\[peer\]\]/,$d' "$LAB_DIR/a.toml"
out=$(wg_apply a "$LAB_DIR/a.toml") || lab_fail "apply without peer: $out"
echo "a: $out"
[[ "$out" == *"1 removed"* ]] || lab_fail "removing the peer: $out"
[ -z "$(wgs a peers)" ] || lab_fail "a still lists peers: $(wgs a peers)"
if lab_exec a ping -c1 -W1 10.77.0.2 >/dev/null 2>&1; then
    lab_fail "ping a -> b still works after the peer was removed"
fi
echo "kernel_wg_apply: ok"
