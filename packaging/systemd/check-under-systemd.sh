#!/usr/bin/env bash
# Runs packaging/systemd/iii.service, unchanged, under a real systemd (PID 1 of a
# systemd-nspawn container) with `processes: 2`, and checks what the unit promises:
# READY=1 only once both engine processes are ready, a killed or frozen child is
# restarted by the supervisor, a frozen supervisor is restarted by systemd's
# watchdog, and `systemctl stop` ends everything with exit 0.
#
# Needs: root, debootstrap and systemd-nspawn (Debian: debootstrap,
# systemd-container), Redis on 127.0.0.1:6379, network access to a Debian mirror,
# and this checkout's .venv (for `pip wheel`). The container shares the host's
# network. Not part of the test suite: it downloads a Debian base system (~250 MB)
# and takes about three minutes.
#
# Usage: sudo packaging/systemd/check-under-systemd.sh [ROOTFS_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${1:-/var/tmp/iii-nspawn}
MACHINE=iii-check-$$
PORT=49234

if [ ! -x "$ROOT/usr/lib/systemd/systemd" ]; then
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-venv,procps \
    bookworm "$ROOT" http://deb.debian.org/debian
fi
rm -rf "$ROOT/opt/wheels" && mkdir -p "$ROOT/opt/wheels" "$ROOT/etc/iii"
.venv/bin/pip wheel -q -w "$ROOT/opt/wheels" .
chroot "$ROOT" bash -c 'rm -rf /opt/iii && python3 -m venv /opt/iii &&
  /opt/iii/bin/pip install -q --no-index --find-links /opt/wheels iii &&
  ln -sf /opt/iii/bin/iii /usr/local/bin/iii'

PREFIX="iiicheck$$:"
REDIS="redis://127.0.0.1:6379"
ADAPTER_CONFIG="{redis_url: \"$REDIS\", key_prefix: \"$PREFIX\"}"
cat > "$ROOT/etc/iii/config.yaml" <<EOF
port: $PORT
processes: 2
cluster: {name: "check-$$", redis_url: "$REDIS", token_env: III_CLUSTER_TOKEN, dead_after_ms: 1500}
modules:
  - {class: modules::api::RestApiModule, config: {host: 127.0.0.1, port: 3211}}
  - {class: modules::state::StateModule,
     config: {adapter: {class: modules::state::adapters::RedisAdapter, config: $ADAPTER_CONFIG}}}
  - {class: modules::stream::StreamModule,
     config: {host: 127.0.0.1, port: 3212,
              adapter: {class: modules::stream::adapters::RedisAdapter, config: $ADAPTER_CONFIG}}}
  - {class: modules::pubsub::PubSubModule,
     config: {adapter: {class: modules::pubsub::RedisAdapter, config: $ADAPTER_CONFIG}}}
  - {class: modules::queue::QueueModule,
     config: {adapter: {class: modules::queue::RedisAdapter, config: $ADAPTER_CONFIG}}}
  - {class: modules::cron::CronModule,
     config: {adapter: {class: modules::cron::RedisCronAdapter, config: $ADAPTER_CONFIG}}}
EOF
echo "III_CLUSTER_TOKEN=check-cluster-token-0123456789" > "$ROOT/etc/iii/iii.env"
cp packaging/systemd/iii.service "$ROOT/etc/systemd/system/iii.service"
chroot "$ROOT" systemctl enable -q iii.service

systemd-nspawn -D "$ROOT" --boot --machine="$MACHINE" --register=no --keep-unit -q \
  > "/tmp/$MACHINE.console" 2>&1 &
NSPAWN=$!
stop_box() {
  [ -n "${PID1:-}" ] && nsenter -t "$PID1" -a systemctl poweroff 2>/dev/null || kill "$NSPAWN" 2>/dev/null || true
  wait "$NSPAWN" 2>/dev/null || true
}
trap stop_box EXIT
PID1=""
for _ in $(seq 1 100); do
  PID1=$(pgrep -P "$NSPAWN" -x systemd || true)
  [ -n "$PID1" ] && break
  sleep 0.2
done
[ -n "$PID1" ] || { echo "FAIL: the container's systemd did not start"; exit 1; }
in_box() { nsenter -t "$PID1" -a "$@"; }
prop() { in_box systemctl show iii -p "$1" --value; }
fail() { echo "FAIL: $*"; in_box journalctl -u iii --no-pager | tail -30; exit 1; }
wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local until=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -lt $until ] || return 1; sleep 0.5; done
}
active() { [ "$(prop ActiveState)" = active ]; }
journal_has() { in_box journalctl -u iii --no-pager | grep -q "$1"; }
children() { in_box pgrep -P "$(prop MainPID)" python3 | sort; }

wait_for 60 active || fail "iii.service did not become active"
# journald may show the line a moment after systemd saw READY=1
wait_for 10 journal_has "all 2 engine processes are ready" || fail "active, but the supervisor never said both children were ready"
echo "ok: active, $(prop StatusText)"

read -r FIRST SECOND < <(children | xargs)
in_box kill -9 "$FIRST"
wait_for 30 journal_has "exited with -9; restarting" || fail "a killed child was not restarted"
wait_for 30 bash -c "[ \$(nsenter -t $PID1 -a pgrep -P $(prop MainPID) python3 | wc -l) = 2 ]" \
  || fail "the killed child did not come back"
[ "$(prop NRestarts)" = 0 ] && active || fail "systemd restarted the service for a child's crash"
echo "ok: a child killed with -9 was restarted by the supervisor"

in_box kill -STOP "$SECOND"
wait_for 40 journal_has "stopped pinging its watchdog: killed" || fail "a frozen child was not killed"
echo "ok: a frozen child was killed and restarted by the supervisor"

in_box kill -STOP "$(prop MainPID)"
wait_for 45 bash -c "[ \$(nsenter -t $PID1 -a systemctl show iii -p NRestarts --value) = 1 ]" \
  || fail "systemd's watchdog did not restart a frozen supervisor"
wait_for 60 active || fail "iii.service did not come back after the watchdog restart"
echo "ok: a frozen supervisor was restarted by systemd's watchdog"

in_box systemctl stop iii
[ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] || fail "stop did not exit 0"
[ -z "$(in_box pgrep -f 'iii serve' || true)" ] || fail "processes left after stop"
echo "ok: systemctl stop ended every process with exit 0"
echo "PASS"
