#!/usr/bin/env bash
# tiers: lab
# The Debian package as an operator gets it: built (make deb, lintian clean),
# installed with dpkg into a clean Debian root (debootstrap minbase, the host's
# suite and mirror), `warren --version` from it, then a coordinator and one
# node run from the installed files in namespaces, each started as its
# installed unit says (ExecStart=, only the capabilities of its
# CapabilityBoundingSet=, the directories systemd would create); the node
# joins. The package is upgraded over itself: the edited conffile and the
# node's key and membership are kept, and the node comes back from them alone.
# A purge then leaves nothing of warren in the root (file lists before install
# and after purge compared).
#
# The pristine root is kept under target/integration/debroot/SUITE (built
# once, a few minutes; later runs copy it). wireguard-go, the node's userspace
# WireGuard, is installed into it from the mirror (deb-systemd-helper comes
# with minbase: init-system-helpers is essential). No systemd runs in the
# root: the maintainer scripts must cope, as in any chroot.
#
# Env: WARREN_DEB (a .deb to test instead of one made from $WARREN).
set -euo pipefail
. "$(dirname "$0")/../lab.sh"
lab_require_cmd debootstrap dpkg-deb chroot setpriv
lab_init

SUITE=$(. /etc/os-release && echo "$VERSION_CODENAME")
MIRROR=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
: "${MIRROR:=http://deb.debian.org/debian}"
ROOT_INCLUDE=wireguard-go
CACHE=$LAB_ROOT/target/integration/debroot
PRISTINE=$CACHE/$SUITE

# --- the package -------------------------------------------------------------
deb=${WARREN_DEB:-}
if [ -z "$deb" ]; then
    # The binary under test packaged (no release build in `make test`),
    # compressed fast; `make deb` runs lintian on it as on the release package.
    out=$LAB_ROOT/target/debian-test
    make -C "$LAB_ROOT" --no-print-directory deb DEB_BIN="$WARREN" DEB_OUT="$out" DEB_FLAGS=--fast >&2 ||
        lab_fail "make deb (build or lintian) failed"
    deb=$(ls "$out"/warren_*.deb)
fi
version=$(dpkg-deb -f "$deb" Version)
echo "package: $deb (version $version)"

# --- a clean Debian root ------------------------------------------------------
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ ! -e "$PRISTINE/.warren-debroot" ] || [ "$(cat "$PRISTINE/.warren-debroot")" != "$ROOT_INCLUDE" ]; then
    rm -rf --one-file-system "$PRISTINE" "$PRISTINE.new"
    echo "debootstrap $SUITE from $MIRROR (once; kept in $PRISTINE)"
    debootstrap --variant=minbase --include="$ROOT_INCLUDE" "$SUITE" "$PRISTINE.new" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || lab_fail "debootstrap failed: see $CACHE/debootstrap.log"
    chroot "$PRISTINE.new" apt-get clean
    echo "$ROOT_INCLUDE" >"$PRISTINE.new/.warren-debroot"
    mv "$PRISTINE.new" "$PRISTINE"
fi
ROOT=$LAB_DIR/root
cp -a "$PRISTINE" "$ROOT"
flock -u 9

# The root's mounts go before lab_cleanup removes LAB_DIR (lazily: a process
# still inside may hold them), so its rm never walks into them.
lab_on_cleanup "umount -l '$ROOT/proc'"
# dpkg's scripts must not start anything here (invoke-rc.d asks policy-rc.d).
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ROOT/dev/net"
[ -e "$ROOT/dev/net/tun" ] || mknod -m 666 "$ROOT/dev/net/tun" c 10 200
# The maintainer scripts' calls into a running systemd, recorded: the root
# looks booted with systemd (/run/systemd/system), and systemctl and
# deb-systemd-invoke earlier in dpkg's PATH write their arguments to a file.
mkdir -p "$ROOT/run/systemd/system"
for c in systemctl deb-systemd-invoke; do
    printf '#!/bin/sh\necho "%s $*" >>/tmp/systemd-calls\n' "$c" >"$ROOT/usr/local/bin/$c"
    chmod 755 "$ROOT/usr/local/bin/$c"
done
calls() { cat "$ROOT/tmp/systemd-calls" 2>/dev/null; rm -f "$ROOT/tmp/systemd-calls"; }
ALL_UNITS="warren.service warren-server.service warren-relay.service warren-wgstun.service"

# Everything in the root but the files dpkg keeps about every package.
file_list() {
    (cd "$ROOT" && find . -xdev \( -path ./var/lib/dpkg -o -path ./var/cache/debconf \) -prune -o -print | sort)
}
file_list >"$LAB_DIR/files-before"

in_root() { chroot "$ROOT" "$@"; }
cp "$deb" "$ROOT/tmp/warren.deb"
in_root dpkg -i /tmp/warren.deb >"$LAB_DIR/dpkg-install.log" 2>&1 || {
    cat "$LAB_DIR/dpkg-install.log" >&2
    lab_fail "dpkg -i failed"
}

# --- what the package installed -----------------------------------------------
got=$(in_root warren --version)
[ "$got" = "warren ${version%%-*}" ] || lab_fail "warren --version says '$got', the package is $version"
echo "installed: $got"
for f in /usr/bin/warren /usr/share/man/man1/warren.1.gz /usr/share/doc/warren/copyright \
    /usr/share/doc/warren/changelog.Debian.gz /etc/warren/warren.toml \
    /lib/systemd/system/{warren,warren-server,warren-relay,warren-wgstun}.service; do
    [ -e "$ROOT$f" ] || lab_fail "the package did not install $f"
done
grep -qx /etc/warren/warren.toml "$ROOT/var/lib/dpkg/info/warren.conffiles" ||
    lab_fail "/etc/warren/warren.toml is not a conffile"
[ "$(stat -c %a "$ROOT/etc/warren/warren.toml")" = 600 ] || lab_fail "/etc/warren/warren.toml is not mode 0600"
# A user who may not read root's 0600 config file still gets `warren status`'s
# own answer (no agent running), not an error about the file.
got=$(chroot --userspec=nobody:nogroup "$ROOT" warren status 2>&1) && lab_fail "warren status without an agent succeeded: $got"
! grep -q "warren.toml" <<<"$got" || lab_fail "warren status as a user tripped over the config file: $got"
echo "status as a user: $got"
# Not configured yet (no token, no state): systemd reloaded, nothing started.
got=$(calls | tr '\n' ';')
grep -q "systemctl --system daemon-reload;" <<<"$got" || lab_fail "postinst did not reload systemd: $got"
! grep -q "deb-systemd-invoke" <<<"$got" || lab_fail "postinst started an unconfigured agent: $got"
# deb-systemd-helper enabled the agent and only the agent.
wants=$ROOT/etc/systemd/system/multi-user.target.wants
[ -L "$wants/warren.service" ] || lab_fail "postinst did not enable warren.service"
for u in warren-server warren-relay warren-wgstun; do
    [ ! -e "$wants/$u.service" ] || lab_fail "postinst enabled $u.service"
done

# --- run the units' commands from the installed files ---------------------------
mount -t proc proc "$ROOT/proc"
lab_internet
lab_public_host srv 203.0.113.5
lab_public_host node 203.0.113.20

unit_key() { sed -n "s/^$2=//p" "$ROOT/lib/systemd/system/$1.service"; }
# Until the config file lands (`--config`), the unit's `--config FILE` is
# replaced by the flags that file's shipped settings stand for.
has_config_flag() { in_root warren "$1" --help | grep -q -- '--config'; }
exec_start() {
    local unit=$1 role=$2 cmd
    cmd=$(unit_key "$unit" ExecStart)
    cmd=${cmd//%d/$(credentials_dir "$unit")}
    if ! has_config_flag "$role"; then
        cmd=$(sed 's| --config [^ ]*||' <<<"$cmd")
        [ "$role" = agent ] && cmd+=" --join-file /etc/warren/join-token"
        echo "note: this binary has no --config; $unit runs as: $cmd" >&2
    fi
    echo "$cmd"
}
# What systemd sets up for a unit before its command runs: StateDirectory=
# (for DynamicUser= under /var/lib/private, with a symlink, owned by the
# dynamic user; systemd makes /var/lib/private passable inside the service's
# mount namespace only, here it is mode 0755 instead), RuntimeDirectory=,
# LogsDirectory=, and LoadCredential= copies readable by the service alone
# in its credentials directory (%d).
DYNAMIC_UID=61873
unit_uid() { if [ "$(unit_key "$1" DynamicUser)" = yes ]; then echo "$DYNAMIC_UID"; else echo 0; fi; }
credentials_dir() { echo "/run/credentials/$1.service"; }
unit_setup() {
    local unit=$1 uid d c
    uid=$(unit_uid "$unit")
    for d in $(unit_key "$unit" StateDirectory); do
        if [ "$uid" != 0 ]; then
            install -d -m 0755 "$ROOT/var/lib/private"
            install -d -m 0700 -o "$uid" -g "$uid" "$ROOT/var/lib/private/$d"
            ln -sfn "private/$d" "$ROOT/var/lib/$d"
        else
            install -d -m 0700 "$ROOT/var/lib/$d"
        fi
    done
    for d in $(unit_key "$unit" RuntimeDirectory); do install -d -m 0700 "$ROOT/run/$d"; done
    for d in $(unit_key "$unit" LogsDirectory); do install -d -m 0700 "$ROOT/var/log/$d"; done
    for c in $(unit_key "$unit" LoadCredential); do
        d=$ROOT$(credentials_dir "$unit")
        install -d -m 0500 -o "$uid" -g "$uid" "$d"
        install -m 0400 -o "$uid" -g "$uid" "$ROOT${c#*:}" "$d/${c%%:*}"
    done
}
# systemd removes the credentials when the service stops.
unit_teardown() { rm -rf "$ROOT$(credentials_dir "$1")"; rmdir "$ROOT/run/credentials" 2>/dev/null || true; }

# setpriv arguments for the unit's user (DynamicUser=), CapabilityBoundingSet=
# and NoNewPrivileges=: the process gets exactly those, as under systemd.
unit_privs() {
    local unit=$1 uid caps c
    uid=$(unit_uid "$unit")
    [ "$uid" != 0 ] && echo "--reuid=$uid --regid=$uid --clear-groups"
    caps=-all
    for c in $(unit_key "$unit" CapabilityBoundingSet); do
        c=${c#CAP_}
        caps+=",+${c,,}"
    done
    echo "--bounding-set=$caps --inh-caps=-all"
    [ "$(unit_key "$unit" NoNewPrivileges)" = yes ] && echo --no-new-privs
}

SERVER_STATE=/var/lib/warren-server
server_cmd=$(exec_start warren-server server)
[[ "$server_cmd" == *"--state-dir $SERVER_STATE"* ]] || lab_fail "warren-server.service does not use $SERVER_STATE"
start_server() {
    unit_setup warren-server
    # shellcheck disable=SC2046,SC2086 # the unit's command line, split as systemd does
    lab_bg srv server.log chroot "$ROOT" setpriv $(unit_privs warren-server) -- $server_cmd
    SERVER_PID=$LAB_LAST_PID
    lab_wait "coordinator admin socket" 30 lab_exec srv chroot "$ROOT" warren server --state-dir "$SERVER_STATE" nodes
}
agent_cmd=$(exec_start warren agent)
start_agent() {
    unit_setup warren
    # shellcheck disable=SC2046,SC2086
    lab_bg node agent.log chroot "$ROOT" setpriv $(unit_privs warren) -- $agent_cmd
    AGENT_PID=$LAB_LAST_PID
}
stop() {
    kill -TERM "$1"
    lab_wait "$2 stopped" 20 bash -c "! kill -0 $1"
}
status() { lab_exec node chroot "$ROOT" warren status --json; }
connected() { status | grep -q '"coordinator": "connected"'; }
mesh_addr() { status | python3 -c 'import json,sys; print(json.load(sys.stdin)["mesh_addr"] or "")'; }
# WireGuard itself works: the WG-STUN server, a peer reached through the
# tunnel, told the node its public address (this is how userspace WireGuard
# without CAP_NET_ADMIN, or without wireguard-go in the root, fails).
wg_mapped() {
    lab_exec node chroot "$ROOT" warren netcheck --json |
        python3 -c 'import json,sys; m=json.load(sys.stdin)["wg_mapping"]; sys.exit(not (m or "").startswith("203.0.113.20:"))'
}

start_server
token=$(lab_exec srv chroot "$ROOT" warren server --state-dir "$SERVER_STATE" invite)
# As the agent unit's comment tells the operator.
(umask 077 && echo "$token" >"$ROOT/etc/warren/join-token")
start_agent
lab_wait "the node joined and is connected" 30 connected
addr=$(mesh_addr)
[ -n "$addr" ] || lab_fail "the node has no mesh address"
lab_exec srv chroot "$ROOT" warren server --state-dir "$SERVER_STATE" nodes | grep -q "$addr" ||
    lab_fail "the coordinator does not list $addr"
lab_wait "the node's WireGuard answered through the tunnel (WG-STUN mapping)" 30 wg_mapped
echo "node joined as $addr, WireGuard up"

# --- upgrade over itself ----------------------------------------------------------
echo "# kept across upgrades" >>"$ROOT/etc/warren/warren.toml"
state_sums() { (cd "$ROOT/var/lib/warren" && find . -type f ! -name '*.lock' -exec sha256sum {} + | sort); }
sums=$(state_sums)
in_root dpkg -i /tmp/warren.deb >"$LAB_DIR/dpkg-upgrade.log" 2>&1 || {
    cat "$LAB_DIR/dpkg-upgrade.log" >&2
    lab_fail "dpkg -i over the installed package failed"
}
[ "$(calls | grep deb-systemd-invoke)" = "deb-systemd-invoke try-restart $ALL_UNITS" ] ||
    lab_fail "the upgrade did not try-restart every unit (and only that)"
grep -qx "# kept across upgrades" "$ROOT/etc/warren/warren.toml" || lab_fail "the upgrade replaced the edited conffile"
! ls "$ROOT"/etc/warren/warren.toml.dpkg-* 2>/dev/null || lab_fail "the upgrade left conffile copies"
[ "$(state_sums)" = "$sums" ] || lab_fail "the upgrade changed the node's state"
# What postinst's try-restart does under systemd; the token is gone, so the
# node comes back from its kept state alone.
rm "$ROOT/etc/warren/join-token"
stop "$AGENT_PID" agent
stop "$SERVER_PID" coordinator
unit_teardown warren-server
start_server
start_agent
lab_wait "the node reconnected after the upgrade" 30 connected
[ "$(mesh_addr)" = "$addr" ] || lab_fail "after the upgrade the node is $(mesh_addr), was $addr"
echo "upgraded: conffile and state kept, node back as $addr"

# --- purge -------------------------------------------------------------------------
# prerm stops the units under systemd; here the test does.
stop "$AGENT_PID" agent
stop "$SERVER_PID" coordinator
unit_teardown warren-server
in_root dpkg --purge warren >"$LAB_DIR/dpkg-purge.log" 2>&1 || {
    cat "$LAB_DIR/dpkg-purge.log" >&2
    lab_fail "dpkg --purge failed"
}
[ "$(calls | grep deb-systemd-invoke)" = "deb-systemd-invoke stop $ALL_UNITS" ] ||
    lab_fail "the removal did not stop every unit"
umount "$ROOT/proc"

# Installed where a token is already in place: the agent is started at once.
install -d -m 0700 "$ROOT/etc/warren"
(umask 077 && echo "$token" >"$ROOT/etc/warren/join-token")
in_root dpkg -i /tmp/warren.deb >"$LAB_DIR/dpkg-install2.log" 2>&1 || lab_fail "dpkg -i (configured) failed"
[ "$(calls | grep deb-systemd-invoke)" = "deb-systemd-invoke start warren.service" ] ||
    lab_fail "installed with a join token in place, the agent was not started (alone)"
in_root dpkg --purge warren >"$LAB_DIR/dpkg-purge2.log" 2>&1 || lab_fail "dpkg --purge (again) failed"
calls >/dev/null
rm "$ROOT/tmp/warren.deb"
file_list >"$LAB_DIR/files-after"
if ! diff -u "$LAB_DIR/files-before" "$LAB_DIR/files-after" >"$LAB_DIR/files.diff"; then
    cat "$LAB_DIR/files.diff" >&2
    lab_fail "the purge left files behind (or removed some): + left, - removed"
fi
echo "purged: the root's files are as before the install"
