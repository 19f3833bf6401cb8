#!/usr/bin/env bash
# keygate-reload.sh: hand a running keygate's sockets over to a new process without dropping a
# connection (Pingora graceful upgrade). deploy/systemd/keygate.service runs it as ExecReload:
#
#   keygate-reload.sh CONFIG OLD_PID            (systemd passes $MAINPID as OLD_PID)
#
# 1. `keygate -t -c CONFIG` with the binary that is about to run. If the config is bad or the
#    binary is broken, the script stops here and the running process is never signalled.
# 2. Starts `keygate -u -d -c CONFIG`. The new process waits on server.upgrade_sock for the
#    listening sockets. With server.daemon_wait_for_ready its parent exits only once the new
#    process is ready to take them.
# 3. When the new process is waiting (the upgrade socket exists), sends SIGQUIT to OLD_PID. The
#    old process hands its sockets over, keeps accepting for about 5 s, then drains for
#    server.grace_period_seconds and exits.
# 4. Succeeds once server.pid_file names the new process, after the handover and while it is
#    still running. systemd (Type=forking + PIDFile=) then follows it as the new main process.
#
# If anything fails before step 3, the script stops what it started, puts the old pid back in
# the pid file and exits 1. The old process keeps serving as if nothing happened.
#
# Environment (the defaults match deploy/systemd/keygate.service and keygate.yaml):
#   KEYGATE_BIN             /usr/local/bin/keygate
#   KEYGATE_PID_FILE        /run/keygate/keygate.pid    must equal server.pid_file
#   KEYGATE_UPGRADE_SOCK    /run/keygate/upgrade.sock   must equal server.upgrade_sock
#   KEYGATE_RELOAD_TIMEOUT  60   seconds allowed for each wait (keep it below TimeoutStartSec)
set -euo pipefail

log() { printf 'keygate-reload: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

[ "$#" -eq 2 ] || die "usage: $0 CONFIG OLD_PID"
config=$1
old_pid=$2
bin=${KEYGATE_BIN:-/usr/local/bin/keygate}
pid_file=${KEYGATE_PID_FILE:-/run/keygate/keygate.pid}
sock=${KEYGATE_UPGRADE_SOCK:-/run/keygate/upgrade.sock}
timeout=${KEYGATE_RELOAD_TIMEOUT:-60}
case $old_pid in '' | *[!0-9]*) die "OLD_PID must be a process id, got '$old_pid'" ;; esac
case $timeout in '' | *[!0-9]*) die "KEYGATE_RELOAD_TIMEOUT must be whole seconds, got '$timeout'" ;; esac

# 1. Check the config before anything else happens, with the binary that will run it.
if ! "$bin" -t -c "$config"; then
    die "config check failed ($bin -t -c $config); pid $old_pid keeps serving, untouched"
fi
[ -d "/proc/$old_pid" ] || die "no running process with pid $old_pid; use 'systemctl restart keygate'"
if ! grep -Eq '^[[:space:]]*daemon_wait_for_ready:[[:space:]]*true' "$config"; then
    log "warning: $config does not set server.daemon_wait_for_ready: true"
fi

# The pid in the pid file, if the file exists and holds a number.
read_pid() {
    local p
    p=$(cat -- "$pid_file" 2>/dev/null) || return 1
    p=${p//[[:space:]]/}
    case $p in '' | *[!0-9]*) return 1 ;; esac
    printf '%s' "$p"
}

# A process the new start created, as opposed to the old one.
new_process() {
    local p
    p=$(read_pid) || return 1
    [ "$p" != "$old_pid" ] || return 1
    printf '%s' "$p"
}

launcher=
launcher_rc=
# Records the launcher's exit status once it has exited. Returns 1 while it still runs.
launcher_done() {
    [ -n "$launcher_rc" ] && return 0
    if kill -0 "$launcher" 2>/dev/null; then return 1; fi
    launcher_rc=0
    wait "$launcher" || launcher_rc=$?
    return 0
}

# Before SIGQUIT: stop whatever this script started and leave the old process as it was.
abort() {
    log "$*"
    if [ -n "$launcher" ] && kill -0 "$launcher" 2>/dev/null; then
        kill -INT "$launcher" 2>/dev/null || true
    fi
    local p
    # A new process that has not received any socket yet serves nothing, so stopping it is safe.
    if p=$(new_process) && kill -0 "$p" 2>/dev/null; then
        kill -INT "$p" 2>/dev/null || true
    fi
    printf '%s\n' "$old_pid" >"$pid_file" || log "cannot restore $pid_file"
    log "pid $old_pid keeps serving, untouched"
    exit 1
}
trap 'abort "interrupted"' INT TERM

# 2. Start the new process. A socket left by an earlier failed attempt would look like a waiting
# process, so remove it. Only a new keygate -u creates that socket.
rm -f -- "$sock"
"$bin" -u -d -c "$config" &
launcher=$!
deadline=$((SECONDS + timeout))
until [ -S "$sock" ]; do
    if launcher_done; then
        [ "$launcher_rc" -eq 0 ] || abort "the new process failed to start (exit $launcher_rc)"
        # With daemon_wait_for_ready the launcher exits 0 once the new process is ready.
        # That process then creates the socket. Fail if it dies before doing so.
        if p=$(new_process) && ! kill -0 "$p" 2>/dev/null; then
            abort "the new process (pid $p) exited before it took the sockets"
        fi
    fi
    [ "$SECONDS" -lt "$deadline" ] || abort "the new process did not open $sock within ${timeout}s"
    sleep 0.1
done

# 3. The new process waits for the sockets. Tell the old one to hand them over.
trap - INT TERM
log "new process waits on $sock; sending SIGQUIT to pid $old_pid"
kill -QUIT "$old_pid"

# 4. Wait until the new process has the sockets (it removes the upgrade socket once it has
# them) and its pid is in the pid file.
deadline=$((SECONDS + timeout))
new_pid=
while :; do
    if [ ! -S "$sock" ] && p=$(new_process) && kill -0 "$p" 2>/dev/null; then
        new_pid=$p
        break
    fi
    if launcher_done && [ "$launcher_rc" -ne 0 ]; then
        die "the new process failed after pid $old_pid was told to hand over (exit $launcher_rc); check the log, then 'systemctl restart keygate'"
    fi
    [ "$SECONDS" -lt "$deadline" ] ||
        die "no new keygate in $pid_file ${timeout}s after SIGQUIT; check the log, then 'systemctl restart keygate'"
    sleep 0.1
done
sleep 1
kill -0 "$new_pid" 2>/dev/null ||
    die "the new process (pid $new_pid) exited right after the handover; check the log, then 'systemctl restart keygate'"

# Without a working daemon_wait_for_ready the launcher may still be waiting for a readiness
# signal that never comes. It serves nothing, so end it.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    launcher_done && break
    sleep 0.5
done
if ! launcher_done; then
    log "warning: the launcher (pid $launcher) got no readiness signal from pid $new_pid; ending it"
    kill -TERM "$launcher" 2>/dev/null || true
    wait "$launcher" 2>/dev/null || true
fi
log "pid $new_pid serves; pid $old_pid drains for server.grace_period_seconds, then exits"
