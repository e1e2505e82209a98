#!/bin/sh
# Installs the sollol agent as a systemd service on this machine, or removes it.
#
#   install-agent.sh --token-file FILE [--join HOST:PORT | --seeds HOST:PORT,...] [--name NAME] [--binary PATH]
#                    [--models-dir DIR] [--no-start]
#   install-agent.sh --uninstall
#   install-agent.sh --print-unit
#
# Without --join the agent finds its coordinator over mDNS on the LAN (or tries the --seeds where
# multicast does not pass) and joins the one that proves it holds the same token.
#
# From a release tarball: run it beside the `sollol` binary. From a copied binary alone:
#   ./sollol install-script | sudo sh -s -- --binary ./sollol --join HOST:PORT --token-file ./cluster-token
# (--token TOKEN still works, but puts the token on a command line every user can read.)
#
# What it creates (and --uninstall removes, as listed in /etc/sollol/.installed, which only root writes):
#   /usr/local/bin/sollol                        the binary
#   /etc/sollol/agent.toml                       token, coordinator address or seeds (mode 0600, owner sollol)
#   /etc/systemd/system/sollol-agent.service     restart policy and sandboxing
#   /var/lib/sollol                              the agent's data (node id), the service user's home
#   the system user and group `sollol`
# Running it again updates the binary and the config and restarts the service (idempotent).
#
# DESTDIR=/some/root installs the files under that root instead and skips what needs the live system
# (the user, systemctl): for packaging and for the tests.
set -eu

DESTDIR="${DESTDIR:-}"
BIN_PATH=/usr/local/bin/sollol
CONFIG_DIR=/etc/sollol
CONFIG_PATH=$CONFIG_DIR/agent.toml
UNIT_PATH=/etc/systemd/system/sollol-agent.service
DATA_DIR=/var/lib/sollol
MANIFEST=$CONFIG_DIR/.installed
# Where versions before 0.1.1 kept the manifest: in the service user's directory, so not trusted.
LEGACY_MANIFEST=$DATA_DIR/.installed
SERVICE_USER=sollol

usage() {
  cat <<'USAGE'
Installs the sollol agent as a systemd service, or removes it.
  install-agent.sh --token-file FILE [--join HOST:PORT | --seeds HOST:PORT,...] [--name NAME] [--binary PATH] [--models-dir DIR] [--no-start]
  install-agent.sh --uninstall
  install-agent.sh --print-unit     (the systemd unit it writes, to stdout)
Without --join the agent joins the coordinator it finds over mDNS (or through --seeds) that holds the token.
From a copied binary: ./sollol install-script | sudo sh -s -- --binary ./sollol --join HOST:PORT --token-file ./cluster-token
DESTDIR=DIR installs the files under DIR and skips the user and systemctl.
USAGE
}
say() { printf '%s\n' "install-agent: $*"; }
die() { printf '%s\n' "install-agent: error: $*" >&2; exit 64; }

# Every value ends up in the config file or the unit: a newline or another control character could
# add lines to them, so none is accepted anywhere.
for arg in "$@"; do
  case "$arg" in *[[:cntrl:]]*) die "arguments must not contain control characters (newlines, tabs, escapes)" ;; esac
done

join="" seeds="" token="" token_file="" name="" binary="" models_dir="" start=1 uninstall=0 print_unit=0
while [ $# -gt 0 ]; do
  case "$1" in
    --join) join="${2:-}"; shift 2 ;;
    --seeds) seeds="${2:-}"; shift 2 ;;
    --print-unit) print_unit=1; shift ;;
    --token) token="${2:-}"; shift 2
      printf '%s\n' "install-agent: warning: --token puts the token on a command line every user can read; prefer --token-file" >&2 ;;
    --token-file) token_file="${2:-}"; shift 2 ;;
    --name) name="${2:-}"; shift 2 ;;
    --binary) binary="${2:-}"; shift 2 ;;
    --models-dir) models_dir="${2:-}"; shift 2 ;;
    --no-start) start=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# The systemd unit; extra writable paths (the models dir) in $1.
unit_text() {
  cat <<UNIT
[Unit]
Description=sollol agent: reports this node to the coordinator and runs its share of inference
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$SERVICE_USER
Group=$SERVICE_USER
ExecStart=$BIN_PATH agent --config $CONFIG_PATH
Restart=on-failure
RestartSec=2s
TimeoutStopSec=15s
KillSignal=SIGTERM
Environment=RUST_LOG=info
StateDirectory=sollol
StateDirectoryMode=0700
ReadWritePaths=$DATA_DIR${1:+ $1}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
UNIT
}

if [ "$print_unit" = 1 ]; then
  unit_text "$models_dir"
  exit 0
fi

live() { [ -z "$DESTDIR" ]; }
has_systemd() { live && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; }

if live && [ "$(id -u)" != 0 ]; then
  die "run it as root (sudo), or with DESTDIR=... to install into a directory"
fi

if [ "$uninstall" = 1 ]; then
  if has_systemd; then
    systemctl disable --now sollol-agent.service >/dev/null 2>&1 || true
  fi
  if [ ! -f "$DESTDIR$MANIFEST" ] && [ -f "$DESTDIR$LEGACY_MANIFEST" ]; then
    # An older install: its manifest lies where the service user could change it; remove only
    # the fixed paths this script creates.
    say "old install: removing the files this script installs, not what its manifest lists"
    rm -f "$DESTDIR$BIN_PATH" "$DESTDIR$CONFIG_PATH" "$DESTDIR$UNIT_PATH" "$DESTDIR$LEGACY_MANIFEST"
    rmdir "$DESTDIR$CONFIG_DIR" 2>/dev/null || true
  fi
  if [ -f "$DESTDIR$MANIFEST" ]; then
    # Files first, then directories deepest first; only what the install created.
    while IFS= read -r path; do
      [ -n "$path" ] || continue
      case "$path" in
        user:*) if live && id "${path#user:}" >/dev/null 2>&1; then userdel "${path#user:}" >/dev/null 2>&1 || true; fi ;;
        */) ;;
        *) rm -f "$DESTDIR$path" ;;
      esac
    done < "$DESTDIR$MANIFEST"
    grep '/$' "$DESTDIR$MANIFEST" | sort -r | while IFS= read -r dir; do
      rm -rf "${DESTDIR}${dir%/}"
    done
  fi
  rm -f "$DESTDIR$MANIFEST"
  if has_systemd; then systemctl daemon-reload; fi
  say "removed the sollol agent"
  exit 0
fi

if [ -n "$token_file" ]; then
  [ -f "$token_file" ] && [ -r "$token_file" ] || die "cannot read the token file '$token_file'"
  token="$(tr -d ' \t\r\n' < "$token_file")"
  case "$token" in *[[:cntrl:]]*) die "the token file holds control characters" ;; esac
fi
[ -n "$token" ] || die "--token-file FILE is required: a file holding the cluster token ('sollol token' on the coordinator prints it)"
[ "${#token}" -ge 32 ] || die "the token is too short (a cluster token has at least 32 characters)"
case "$join" in ''|*:*) ;; *) die "--join must be HOST:PORT, got '$join'" ;; esac
for seed in $(printf '%s' "$seeds" | tr ',' ' '); do
  case "$seed" in *:*) ;; *) die "--seeds must be HOST:PORT entries, got '$seed'" ;; esac
done
case "$token$join$seeds$name$models_dir" in *'"'*|*'\'*) die "arguments must not contain quotes or backslashes" ;; esac
if [ -z "$binary" ]; then
  here="$(cd "$(dirname "$0")" 2>/dev/null && pwd || true)"
  for candidate in "$here/sollol" "$here/../target/release/sollol" "$(command -v sollol 2>/dev/null || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then binary="$candidate"; break; fi
  done
fi
[ -n "$binary" ] && [ -x "$binary" ] || die "no sollol binary found: pass --binary PATH"

# Everything created goes into the manifest once, for --uninstall.
created=""
note() { created="$created
$1"; }

for dir in "$CONFIG_DIR/" "$DATA_DIR/"; do
  [ -d "$DESTDIR$dir" ] || note "$dir"
  mkdir -p "$DESTDIR$dir"
done
mkdir -p "$DESTDIR$(dirname "$BIN_PATH")" "$DESTDIR$(dirname "$UNIT_PATH")"

if live && ! id "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin \
    --comment "sollol agent" --user-group "$SERVICE_USER"
  note "user:$SERVICE_USER"
  say "created the system user $SERVICE_USER"
fi

# The binary: through a temporary name so that a running service keeps its old file until restarted.
install -m 0755 "$binary" "$DESTDIR$BIN_PATH.new"
mv -f "$DESTDIR$BIN_PATH.new" "$DESTDIR$BIN_PATH"
note "$BIN_PATH"

umask 077
{
  echo "# Written by install-agent.sh; run it again to change these."
  echo "data_dir = \"$DATA_DIR\""
  echo
  echo "[agent]"
  [ -z "$join" ] || echo "join = \"$join\""
  echo "token = \"$token\""
  [ -z "$name" ] || echo "name = \"$name\""
  [ -z "$models_dir" ] || echo "models_dir = \"$models_dir\""
  if [ -n "$seeds" ]; then
    echo
    echo "[discovery]"
    echo "seeds = \"$seeds\""
  fi
} > "$DESTDIR$CONFIG_PATH.new"
chmod 0600 "$DESTDIR$CONFIG_PATH.new"
mv -f "$DESTDIR$CONFIG_PATH.new" "$DESTDIR$CONFIG_PATH"
note "$CONFIG_PATH"
umask 022

unit_text "$models_dir" > "$DESTDIR$UNIT_PATH"
chmod 0644 "$DESTDIR$UNIT_PATH"
note "$UNIT_PATH"

if live; then
  # Never recursive, never through a link: the data directory's contents belong to the service user,
  # who could plant links there for root to follow.
  chown -h "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR" "$CONFIG_PATH"
fi

# The manifest keeps what earlier runs created too (a re-run creates nothing new).
{
  [ ! -f "$DESTDIR$MANIFEST" ] || cat "$DESTDIR$MANIFEST"
  printf '%s\n' "$created"
} | grep -v '^$' | sort -u > "$DESTDIR$MANIFEST.new"
mv -f "$DESTDIR$MANIFEST.new" "$DESTDIR$MANIFEST"

say "installed $("$DESTDIR$BIN_PATH" version 2>/dev/null | head -n 1 || echo sollol) as $DESTDIR$BIN_PATH"
say "config $DESTDIR$CONFIG_PATH (mode 0600), unit $DESTDIR$UNIT_PATH"
if has_systemd && [ "$start" = 1 ]; then
  systemctl daemon-reload
  systemctl enable sollol-agent.service >/dev/null 2>&1
  systemctl restart sollol-agent.service
  say "started: systemctl status sollol-agent; journalctl -u sollol-agent -f"
elif [ "$start" = 1 ] && live; then
  say "no running systemd here: start it with '$BIN_PATH agent --config $CONFIG_PATH'"
else
  say "not started (--no-start or DESTDIR)"
fi
