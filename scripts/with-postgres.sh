#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL server, for the tests that need a real database.
#
#   scripts/with-postgres.sh COMMAND [ARGS...]
#
# - MARROWSCOPE_TEST_DATABASE_URL already set: runs COMMAND against that database, starts nothing.
# - PostgreSQL server binaries found (Debian's `postgresql` package, or PG_BINDIR=/path/to/bin):
#   creates a cluster in a temporary folder, starts it on a free port on 127.0.0.1 only,
#   creates the database `marrowscope_test`, exports
#   MARROWSCOPE_TEST_DATABASE_URL=postgresql+psycopg://marrowscope:PASSWORD@127.0.0.1:PORT/marrowscope_test,
#   runs COMMAND, then stops the server and deletes the folder (also on failure or Ctrl-C).
#   As root the server runs as the `postgres` system user (PostgreSQL refuses to run as root).
# - No binaries: runs COMMAND without a database URL (the PostgreSQL tests then report themselves
#   as skipped), unless MARROWSCOPE_REQUIRE_POSTGRES=1, which makes that an error.
#
# Exits with COMMAND's exit status.
set -euo pipefail

say() { echo "with-postgres: $*" >&2; }
die() { say "error: $*"; exit 2; }

[[ $# -gt 0 ]] || die "usage: scripts/with-postgres.sh COMMAND [ARGS...]"

if [[ -n "${MARROWSCOPE_TEST_DATABASE_URL:-}" ]]; then
    say "using the given MARROWSCOPE_TEST_DATABASE_URL (no server started)"
    exec "$@"
fi

find_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        [[ -x "$PG_BINDIR/initdb" && -x "$PG_BINDIR/pg_ctl" ]] || die "PG_BINDIR=$PG_BINDIR has no initdb/pg_ctl"
        echo "$PG_BINDIR"
        return
    fi
    local d
    # Debian installs the server outside PATH, one folder per major version: take the newest.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then echo "$d"; return; fi
    done
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"
    fi
}

BINDIR="$(find_bindir)"
if [[ -z "$BINDIR" ]]; then
    if [[ "${MARROWSCOPE_REQUIRE_POSTGRES:-}" == "1" ]]; then
        die "MARROWSCOPE_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries were found (install Debian's package: apt-get install postgresql)"
    fi
    say "no PostgreSQL server binaries found: the PostgreSQL tests will be skipped (apt-get install postgresql, or set MARROWSCOPE_TEST_DATABASE_URL)"
    exec "$@"
fi

# PostgreSQL refuses to run as root: as root, run the server tools as the `postgres` system user.
AS=()
if [[ "$(id -u)" == "0" ]]; then
    id postgres >/dev/null 2>&1 || die "running as root and there is no 'postgres' system user to run the server as"
    AS=(runuser -u postgres --)
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/marrowscope-pg.XXXXXX")"
DATA="$TMP/data"
STARTED=0
# Run a server tool (as `postgres` when root) from inside $TMP: the caller's folder may be closed to it.
pg() { (cd "$TMP" && "${AS[@]}" "$BINDIR/$1" "${@:2}"); }
cleanup() {
    if [[ "$STARTED" == "1" ]]; then
        pg pg_ctl -D "$DATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            pg pg_ctl -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PASSWORD="$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$PASSWORD" >"$TMP/pwfile"
chmod 700 "$TMP"
chmod 600 "$TMP/pwfile"
[[ ${#AS[@]} -eq 0 ]] || chown -R postgres "$TMP"

t0=$(date +%s%N)
# Test data is thrown away: skip fsync (faster on a busy disk); a password is still required.
pg initdb -D "$DATA" -U marrowscope --pwfile="$TMP/pwfile" \
    --auth=scram-sha-256 -E UTF8 --no-locale --no-sync >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# A free port can be taken between the check and the start: try a few.
for attempt in 1 2 3; do
    PORT="$(free_port)"
    if pg pg_ctl -D "$DATA" -l "$TMP/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $TMP -c fsync=off -c full_page_writes=off" \
        start >/dev/null 2>&1; then
        STARTED=1
        break
    fi
done
if [[ "$STARTED" != "1" ]]; then
    cat "$TMP/server.log" >&2 || true
    die "PostgreSQL did not start (log above)"
fi

export PGPASSWORD="$PASSWORD"
"$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U marrowscope marrowscope_test ||
    die "createdb failed"
unset PGPASSWORD
ms=$((($(date +%s%N) - t0) / 1000000))

export MARROWSCOPE_TEST_DATABASE_URL="postgresql+psycopg://marrowscope:$PASSWORD@127.0.0.1:$PORT/marrowscope_test"
say "PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT (throwaway cluster in $TMP, ready in $ms ms)"

set +e
"$@"
rc=$?
set -e
exit "$rc"
