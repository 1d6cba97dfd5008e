#!/usr/bin/env bash
# A PostgreSQL cluster owned by the project, under .local/pg, on a non-default port.
#   infra/postgres.sh install|start|stop|status
# PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres`
# OS user (created by the Debian package); otherwise it runs as the current user.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGHOME="$ROOT/.local/pg"
PGDATA="$PGHOME/data"
PORT="${PG_PORT:-15432}"
SOCKDIR="$PGHOME/run"

die() { echo "postgres: $*" >&2; exit 1; }

find_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

install() {
  if find_bindir >/dev/null; then return 0; fi
  if [ "$(id -u)" -ne 0 ]; then die "PostgreSQL is not installed. Install it: sudo apt-get install -y postgresql"; fi
  echo "postgres: installing the server with apt..."
  DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y -qq postgresql >/dev/null
  find_bindir >/dev/null || die "apt installed postgresql but pg_ctl was not found"
}

as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() { [ -f "$PGDATA/postmaster.pid" ] && as_owner "$(find_bindir)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  install
  local bin; bin=$(find_bindir)
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir "$PGHOME" --shell /usr/sbin/nologin postgres
  fi
  mkdir -p "$PGHOME" "$SOCKDIR"
  [ "$(id -u)" -eq 0 ] && chown postgres "$PGHOME" "$SOCKDIR"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    echo "postgres: creating the cluster in $PGDATA"
    as_owner "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$PGHOME/initdb.log" 2>&1 \
      || { cat "$PGHOME/initdb.log" >&2; die "initdb failed"; }
  fi
  if running; then echo "postgres: already running on 127.0.0.1:$PORT"; return 0; fi
  if port_open "$PORT"; then die "port $PORT is taken by another process; stop it or set PG_PORT."; fi
  # Tests create a database per test; fsync off only because this cluster is disposable.
  as_owner "$bin/pg_ctl" -D "$PGDATA" -l "$PGHOME/server.log" -w -t 60 \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k $SOCKDIR -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=256MB -c max_locks_per_transaction=256" \
    start >/dev/null || { tail -20 "$PGHOME/server.log" >&2; die "could not start"; }
  echo "postgres: ready on 127.0.0.1:$PORT"
}

stop() {
  local bin; bin=$(find_bindir) || return 0
  if running; then as_owner "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; echo "postgres: stopped"; fi
}

restart() {
  local bin; bin=$(find_bindir)
  as_owner "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  start
}

status() { if running; then echo "postgres: running on 127.0.0.1:$PORT"; else echo "postgres: stopped"; return 1; fi; }

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  restart) restart ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|restart|status" >&2; exit 2 ;;
esac
