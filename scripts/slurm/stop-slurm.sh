#!/usr/bin/env bash
# stop-slurm.sh - stop the single-node cluster that scripts/slurm/start-slurm.sh started.
#
# Cancels the jobs still queued or running (while the controller can still do it cleanly), then
# stops only the daemons whose pid files live under $SLURM_ROOT, and munged only when
# start-slurm.sh started it. Nothing else on the machine is touched.
#
#   --purge              also delete state, logs, database and the /etc/slurm symlinks (the next
#                        start is a fresh cluster whose job ids start again at 1)
#   SLURM_ROOT=/tmp/budget-lab-slurm   the folder given to start-slurm.sh
#   SLURM_KEEP_MUNGE=1   leave munged running
set -uo pipefail

case "${1:-}" in
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "" | --purge) ;;
    *) echo "stop-slurm.sh: unknown argument '$1'; valid: --purge, --help" >&2; exit 2 ;;
esac

SLURM_ROOT=${SLURM_ROOT:-/tmp/budget-lab-slurm}
RUN=$SLURM_ROOT/run
DB=$SLURM_ROOT/db
export SLURM_CONF=$SLURM_ROOT/etc/slurm.conf

say() { echo "[stop-slurm $(date +%T)] $*" >&2; }

# alive PIDFILE NAME: the pid in PIDFILE is a live (not zombie) process called NAME.
alive() {
    local pid state
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    state=$(awk '$1 == "State:" {print $2}' "/proc/$pid/status" 2>/dev/null)
    [ "$state" != Z ]
}

# halt PIDFILE NAME: SIGTERM, up to 15 s of grace, then SIGKILL.
halt() {
    local pid i
    alive "$1" "$2" || return 0
    pid=$(cat "$1")
    say "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do alive "$1" "$2" || return 0; sleep 0.3; done
    say "$2 ignored SIGTERM for 15 s; killing it"
    kill -9 "$pid" 2>/dev/null || true
    sleep 0.5
}

# Cancel the jobs first, so that no slurmstepd outlives its slurmd.
if alive "$RUN/slurmctld.pid" slurmctld && [ -f "$SLURM_CONF" ]; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 60); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

halt "$RUN/slurmd.pid" slurmd
halt "$RUN/slurmctld.pid" slurmctld
halt "$RUN/slurmdbd.pid" slurmdbd
halt "$DB/mysqld.pid" mariadbd

# munged is shared by anything on the machine that uses munge: stop it only if it is ours.
if [ "${SLURM_KEEP_MUNGE:-0}" != 1 ] && [ -s "$RUN/munged.pid" ] && [ -s /run/munge/munged.pid ] \
    && [ "$(cat "$RUN/munged.pid")" = "$(cat /run/munge/munged.pid)" ]; then
    halt /run/munge/munged.pid munged
    rm -f "$RUN/munged.pid"
fi

left=$(ps -eo pid=,comm= | awk '$2 ~ /^slurmstepd/ {print $1}' | tr '\n' ' ')
[ -n "${left// /}" ] && say "WARNING: slurmstepd processes are still running: $left"

if [ "${1:-}" = --purge ]; then
    say "purging $SLURM_ROOT/{state,log,db,run}"
    rm -rf "$SLURM_ROOT/state" "$SLURM_ROOT/log" "$SLURM_ROOT/db" "$SLURM_ROOT/run"
    for f in slurm.conf gres.conf slurmdbd.conf; do
        [ "$(readlink "/etc/slurm/$f" 2>/dev/null)" = "$SLURM_ROOT/etc/$f" ] && rm -f "/etc/slurm/$f"
    done
fi
say "stopped"
exit 0
