#!/usr/bin/env bash
# Installs the broker as a systemd service: the binaries, the configuration and the unit.
#
#   scripts/install.sh [--prefix DIR] [--destdir DIR] [--binaries DIR]
#
#   --prefix DIR     where the binaries go: DIR/bin (default /usr/local); the unit's ExecStart
#                    follows it
#   --destdir DIR    install under DIR instead of / (for packaging and tests); nothing is
#                    reloaded or started then
#   --binaries DIR   take mbws-broker and mbws from DIR instead of building them
#                    (cargo build --release)
#
# Installs DESTDIR/PREFIX/bin/{mbws-broker,mbws}, DESTDIR/etc/mbws/broker.toml (from
# packaging/broker.toml; an existing one is kept, the new one is written beside it as
# broker.toml.new), DESTDIR/etc/systemd/system/mbws-broker.service and
# DESTDIR/PREFIX/share/doc/mbws/OPERATIONS.md. The data directory, /var/lib/mbws, is made by
# systemd at the first start (StateDirectory=). Then, without --destdir and as root, it runs
# `systemctl daemon-reload` and says how to start the service; it never starts it itself.
set -euo pipefail

prefix=/usr/local
destdir=""
binaries=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --destdir) destdir=$2; shift 2 ;;
        --binaries) binaries=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (--prefix DIR, --destdir DIR, --binaries DIR)" >&2; exit 2 ;;
    esac
done
[[ $prefix == /* ]] || { echo "install.sh: --prefix must be an absolute path, not '$prefix'" >&2; exit 2; }
[[ -z $destdir || $destdir == /* ]] || destdir=$PWD/$destdir

repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z $binaries ]]; then
    (cd "$repo" && cargo build --release --quiet --bin mbws-broker --bin mbws)
    binaries=$repo/target/release
fi
for binary in mbws-broker mbws; do
    [[ -x $binaries/$binary ]] || { echo "install.sh: $binaries/$binary is missing (build it, or give --binaries)" >&2; exit 2; }
done

bindir=$destdir$prefix/bin
confdir=$destdir/etc/mbws
unitdir=$destdir/etc/systemd/system
docdir=$destdir$prefix/share/doc/mbws

install -d -m 0755 "$bindir" "$confdir" "$unitdir" "$docdir"
install -m 0755 "$binaries/mbws-broker" "$binaries/mbws" "$bindir/"
if [[ -e $confdir/broker.toml ]]; then
    install -m 0644 "$repo/packaging/broker.toml" "$confdir/broker.toml.new"
    echo "install.sh: kept $confdir/broker.toml; the shipped one is $confdir/broker.toml.new"
else
    install -m 0644 "$repo/packaging/broker.toml" "$confdir/broker.toml"
fi
sed -e "s|/usr/local/bin/mbws-broker|$prefix/bin/mbws-broker|" \
    -e "s|/usr/local/share/doc/mbws/|$prefix/share/doc/mbws/|" \
    "$repo/packaging/mbws-broker.service" > "$unitdir/mbws-broker.service"
chmod 0644 "$unitdir/mbws-broker.service"
install -m 0644 "$repo/docs/OPERATIONS.md" "$docdir/"
echo "install.sh: installed $bindir/mbws-broker, $bindir/mbws, $confdir/broker.toml, $unitdir/mbws-broker.service"

if [[ -z $destdir && $(id -u) == 0 ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    echo "install.sh: start it with: systemctl enable --now mbws-broker"
fi
