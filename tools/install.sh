#!/usr/bin/env bash
# Installs replicad: the binaries (replicad, replctl, replcheck), the systemd unit, the
# man pages and the shell completions. See docs/OPERATIONS.md, "Install and run under
# systemd". Run it from anywhere in the source tree, as root for the default prefix.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tools/install.sh [--prefix DIR] [--unit-dir DIR] [--from DIR] [--dry-run]

  --prefix DIR    install under DIR (default /usr/local): DIR/bin, DIR/share/man/man1,
                  DIR/share/{bash-completion,zsh,fish}/...
  --unit-dir DIR  where replicad.service goes (default DIR/lib/systemd/system of the
                  prefix, which systemd searches for /usr/local and /usr)
  --from DIR      take the binaries from DIR instead of building them
                  (default: cargo build --release --locked)
  --dry-run       print what would be done, change nothing
  -h, --help      this text

The unit's ExecStart points at PREFIX/bin/replicad; the config stays
/etc/replicad/replicad.toml, which this script does not write.
EOF
}

PREFIX=/usr/local
UNIT_DIR=""
FROM=""
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --unit-dir) UNIT_DIR="${2:?--unit-dir needs a directory}"; shift 2 ;;
    --unit-dir=*) UNIT_DIR="${1#*=}"; shift ;;
    --from) FROM="${2:?--from needs a directory}"; shift 2 ;;
    --from=*) FROM="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$PREFIX" in
  /*) ;;
  *) echo "install.sh: --prefix must be an absolute path (the unit names the binary by it)" >&2; exit 2 ;;
esac
PREFIX="${PREFIX%/}"
UNIT_DIR="${UNIT_DIR:-$PREFIX/lib/systemd/system}"
SOURCE="$(cd "$(dirname "$0")/.." && pwd)"
PROGRAMS=(replicad replctl replcheck)

# Runs a command, or prints it with --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Runs a command with its output into a file (mode 0644), or prints it with --dry-run.
run_into() {
  local file="$1"; shift
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf ' > %q\n' "$file"
  else
    "$@" > "$file.tmp"
    chmod 0644 "$file.tmp"
    mv "$file.tmp" "$file"
  fi
}

# 1. The binaries.
if [ -z "$FROM" ]; then
  run cargo build --release --locked --manifest-path "$SOURCE/Cargo.toml" \
    -p replicad-tools --bins
  FROM="${CARGO_TARGET_DIR:-$SOURCE/target}/release"
fi
if [ "$DRY_RUN" = 0 ]; then
  for program in "${PROGRAMS[@]}"; do
    [ -x "$FROM/$program" ] || { echo "install.sh: no $FROM/$program" >&2; exit 1; }
  done
fi
run install -d -m 0755 "$PREFIX/bin"
for program in "${PROGRAMS[@]}"; do
  run install -m 0755 "$FROM/$program" "$PREFIX/bin/$program"
done
REPLCTL="$PREFIX/bin/replctl"

# 2. The systemd unit, its ExecStart pointing at the installed daemon.
run install -d -m 0755 "$UNIT_DIR"
run_into "$UNIT_DIR/replicad.service" \
  sed "s|^ExecStart=/usr/local/bin/replicad |ExecStart=$PREFIX/bin/replicad |" \
  "$SOURCE/tools/systemd/replicad.service"

# 3. Man pages: replctl.1 and one per subcommand, replicad.1, replcheck.1.
run install -d -m 0755 "$PREFIX/share/man/man1"
run "$REPLCTL" man --out-dir "$PREFIX/share/man/man1"

# 4. Completions for bash, zsh and fish.
BASH_DIR="$PREFIX/share/bash-completion/completions"
ZSH_DIR="$PREFIX/share/zsh/site-functions"
FISH_DIR="$PREFIX/share/fish/vendor_completions.d"
run install -d -m 0755 "$BASH_DIR" "$ZSH_DIR" "$FISH_DIR"
for program in "${PROGRAMS[@]}"; do
  run_into "$BASH_DIR/$program" "$REPLCTL" completions bash --program "$program"
  run_into "$ZSH_DIR/_$program" "$REPLCTL" completions zsh --program "$program"
  run_into "$FISH_DIR/$program.fish" "$REPLCTL" completions fish --program "$program"
done

if [ "$DRY_RUN" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  case "$UNIT_DIR" in
    /etc/systemd/system|/usr/local/lib/systemd/system|/usr/lib/systemd/system|/lib/systemd/system)
      systemctl daemon-reload ;;
  esac
fi
case "$UNIT_DIR" in
  /etc/systemd/system|/usr/local/lib/systemd/system|/usr/lib/systemd/system|/lib/systemd/system) ;;
  *) echo "note: systemd does not look for units in $UNIT_DIR; use --unit-dir /etc/systemd/system to run it" ;;
esac
if [ "$DRY_RUN" = 1 ]; then
  echo "(dry run: nothing was changed)"
fi
cat <<EOF
Installed under $PREFIX, unit in $UNIT_DIR/replicad.service. Next:
  write /etc/replicad/replicad.toml (the same on every node), then on each node:
  $REPLCTL create-md r0
  systemctl enable --now replicad
  journalctl -u replicad -f
EOF
