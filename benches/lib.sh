# lib.sh - what the replctl benchmark scripts share; source it, then call bench_setup.
#
#   . "$(dirname "$0")/lib.sh"
#   bench_setup NAME TOOL...   # checks the tools and $REPLCTL, makes $work, cleans up on exit
#   port=$(free_port)
#   start_serve LOG URI ARGS...  # replctl serve ARGS in the background ($server), waits for URI

# bench_setup NAME TOOL...: every TOOL and an executable $REPLCTL, or exit 2; a fresh
# $work under $DIR, removed (and $server stopped) on exit.
bench_setup() {
    local name=$1 tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$name: needs $tool" >&2; exit 2; }
    done
    [ -x "$REPLCTL" ] || { echo "$name: no $REPLCTL (cargo build --release -p replicad-tools)" >&2; exit 2; }
    work=$(mktemp -d "$DIR/${name%.sh}.XXXXXX")
    server=
    trap bench_cleanup EXIT
}

bench_cleanup() {
    stop_serve
    rm -rf "$work"
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_serve LOG URI ARGS...: `replctl serve ARGS` in the background; returns once URI
# answers (60 s at most), or exits showing LOG if the server died or never answered.
start_serve() {
    local log=$1 uri=$2
    shift 2
    "$REPLCTL" serve "$@" >"$log" 2>&1 &
    server=$!
    for _ in $(seq 1 600); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    echo "server not ready at $uri" >&2
    exit 1
}

# Stops the server start_serve started, if any.
stop_serve() {
    if [ -n "${server:-}" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=
    fi
}
