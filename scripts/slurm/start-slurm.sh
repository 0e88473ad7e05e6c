#!/usr/bin/env bash
# start-slurm.sh - a real single-node Slurm cluster on this machine, for budget-lab's tests and
# for trying `budget-lab launch --cluster slurm-local` without a real cluster. Run as root.
#
#   munged + slurmctld + slurmd, and slurmdbd on MariaDB so that `sacct` works (submitit reads
#   job states with sacct; the ledger prices every run of a requeued job from it).
#
# Everything listens on loopback only and lives under $SLURM_ROOT (config, state, logs, pids,
# database); /etc/slurm/*.conf become symlinks to it so that plain `sinfo` works. The packages
# (Debian/Ubuntu: munge slurmctld slurmd slurm-client slurmdbd mariadb-server) are installed with
# apt when missing. Idempotent and safe to run from several processes at once (a lock file
# serialises them): running daemons are kept unless the generated configuration changed.
# It returns once node "localhost" takes jobs.
#
# The cluster it builds (see clusters/slurm-local.yaml):
#   node localhost   $SLURM_CPUS CPUs, $SLURM_GPUS fake GPUs (gres/gpu, char devices, so jobs get
#                    a real CUDA_VISIBLE_DEVICES; no CUDA behind them)
#   partition debug  the default; PriorityTier 10, never preempted
#   partition spot   PriorityTier 1, PreemptMode REQUEUE, GraceTime 30 s: a debug job that needs
#                    its resources preempts a spot job, which gets its --signal (submitit: USR2),
#                    is killed 30 s later at most, and is requeued - like a spot instance reclaim
#
# Knobs (environment variables, all optional):
#   SLURM_ROOT=/tmp/budget-lab-slurm   where config, state, logs, pids and the database live
#   SLURM_CPUS=8       CPUs the node advertises; more than `nproc` is allowed (oversubscribes
#                      the cores) so that several 1-CPU test jobs run at once on a 2-core VM
#   SLURM_MEM_MB=      memory the node advertises (default: 95 % of what slurmd detects)
#   SLURM_GPUS=8       fake GPUs; 0 = no GPU gres
#   SLURM_WITH_DBD=1   0 = no slurmdbd/MariaDB (sacct then fails; submitit cannot see states)
#   SLURM_LINK_ETC=1   0 = do not symlink /etc/slurm/*.conf (clients then need SLURM_CONF)
#   SLURM_FRESH=0      1 = stop everything and wipe state, logs and database first (job ids
#                      start again at 1: never reuse a submitit folder across a fresh start)
#   SLURM_DB_PORT=3307 MariaDB port on 127.0.0.1
#   SLURM_WAIT_S=60    how long to wait for each daemon and for the node
#
# Exit status: 0 up, 1 failed (the message names the log), 3 the packages cannot be installed
# (no apt-get, or apt-get failed), 4 not root. Stop it with scripts/slurm/stop-slurm.sh.
#
# Tested on Debian 12 (bookworm): Slurm 22.05.8, munge 0.5.15, MariaDB 10.11.
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

SLURM_ROOT=${SLURM_ROOT:-/tmp/budget-lab-slurm}
SLURM_CPUS=${SLURM_CPUS:-8}
SLURM_GPUS=${SLURM_GPUS:-8}
SLURM_WITH_DBD=${SLURM_WITH_DBD:-1}
SLURM_LINK_ETC=${SLURM_LINK_ETC:-1}
SLURM_FRESH=${SLURM_FRESH:-0}
SLURM_DB_PORT=${SLURM_DB_PORT:-3307}
SLURM_WAIT_S=${SLURM_WAIT_S:-60}
CLUSTER=budgetlab
NODE=localhost

ETC=$SLURM_ROOT/etc
RUN=$SLURM_ROOT/run
LOG=$SLURM_ROOT/log
STATE=$SLURM_ROOT/state
DB=$SLURM_ROOT/db
APT_LOG=$SLURM_ROOT/apt.log
export SLURM_CONF=$ETC/slurm.conf
T0=$(date +%s%N)

say() { echo "[start-slurm $(date +%T)] $*" >&2; }
fail() { say "ERROR: $1"; exit "${2:-1}"; }  # fail MESSAGE [EXIT_STATUS]
elapsed() { awk -v t0="$T0" -v t1="$(date +%s%N)" 'BEGIN { printf "%.1f", (t1 - t0) / 1e9 }'; }

[ "$(id -u)" = 0 ] || fail "run me as root (the daemons run as root and need /etc/munge)" 4
case "$SLURM_CPUS$SLURM_GPUS" in *[!0-9]*) fail "SLURM_CPUS and SLURM_GPUS must be integers" ;; esac

# Serialise concurrent starts (several test processes may call this at the same time).
mkdir -p "$SLURM_ROOT"
exec 9>"$SLURM_ROOT/.start.lock"
flock -w 600 9 || fail "another start-slurm.sh held $SLURM_ROOT/.start.lock for 10 minutes"
# (Daemons are started with 9>&- so that they do not inherit, and hold, the lock.)

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
    say "$2 ignored SIGTERM; killing it"
    kill -9 "$pid" 2>/dev/null || true
    sleep 0.5
}

# until_ok WHAT CMD...: retry CMD every 0.3 s for SLURM_WAIT_S seconds.
until_ok() {
    local what=$1 deadline=$(( $(date +%s) + SLURM_WAIT_S ))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.3
    done
    say "$what ready"
}

# ------------------------------------------------------------------------------ 1. packages
packages=(munge slurm-client slurmctld slurmd)
[ "$SLURM_WITH_DBD" = 1 ] && packages+=(slurmdbd mariadb-server)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null \
        || fail "missing ${missing[*]} and no apt-get here: install Slurm, munge and MariaDB yourself" 3
    say "installing ${missing[*]} (log: $APT_LOG)"
    # A policy-rc.d that says "no" keeps apt from starting the packaged services: this script
    # runs its own daemons with its own configuration.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; }
    ok=1
    if ! apt_install "${missing[@]}" >"$APT_LOG" 2>&1; then
        say "apt-get install failed; running apt-get update and trying again"
        { apt-get update && apt_install "${missing[@]}"; } >>"$APT_LOG" 2>&1 || ok=0
    fi
    [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || fail "apt-get could not install ${missing[*]}; see $APT_LOG" 3
    say "packages installed after $(elapsed) s"
fi

# ------------------------------------------------------------------------------ 2. fresh start
if [ "$SLURM_FRESH" = 1 ]; then
    say "SLURM_FRESH=1: stopping the daemons and wiping state, logs and database"
    halt "$RUN/slurmd.pid" slurmd
    halt "$RUN/slurmctld.pid" slurmctld
    halt "$RUN/slurmdbd.pid" slurmdbd
    halt "$DB/mysqld.pid" mariadbd
    rm -rf "$STATE" "$LOG" "$DB"
fi
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d" "$SLURM_ROOT/fakegpu"

# ------------------------------------------------------------------------------ 3. munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key --force
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    say "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&-
    until_ok munged bash -c 'munge -n | unmunge' || fail "munged did not start; see /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$RUN/munged.pid"  # so that stop-slurm.sh stops only a munged of ours
fi

# ------------------------------------------------------------------------------ 4. node, GPUs
if [ -z "${SLURM_MEM_MB:-}" ]; then
    mem=$(/usr/sbin/slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    [ -n "$mem" ] || mem=$(free -m | awk '$1 == "Mem:" {print $2}')
    SLURM_MEM_MB=$(( mem * 95 / 100 ))
fi
# slurmd refuses to advertise more CPUs than it finds unless told to trust the config.
cpu_override=""
[ "$SLURM_CPUS" -gt "$(nproc)" ] && cpu_override="SlurmdParameters=config_overrides"

gres_types=""
node_gres=""
gres_conf="AutoDetect=off"
if [ "$SLURM_GPUS" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    node_gres=" Gres=gpu:$SLURM_GPUS"
    # Character devices with the NVIDIA major number: Slurm hands them out like real GPUs and
    # sets CUDA_VISIBLE_DEVICES per job. Nothing opens them.
    devices_ok=1
    for i in $(seq 0 $(( SLURM_GPUS - 1 ))); do
        dev=$SLURM_ROOT/fakegpu/nvidia$i
        [ -c "$dev" ] && continue
        rm -f "$dev"
        mknod "$dev" c 195 "$i" 2>/dev/null || { devices_ok=0; break; }
    done
    if [ $devices_ok = 1 ]; then
        gres_conf+=$'\n'"NodeName=$NODE Name=gpu File=$SLURM_ROOT/fakegpu/nvidia[0-$(( SLURM_GPUS - 1 ))]"
    else
        say "WARNING: mknod is not allowed here: GPUs are counted, but jobs get no CUDA_VISIBLE_DEVICES"
        gres_conf+=$'\n'"NodeName=$NODE Name=gpu Count=$SLURM_GPUS"
    fi
fi

# ------------------------------------------------------------------------------ 5. configuration
if [ "$SLURM_WITH_DBD" = 1 ]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
    [ "$SLURM_GPUS" -gt 0 ] && accounting+=$'\n'"AccountingStorageTRES=gres/gpu"
else
    accounting="AccountingStorageType=accounting_storage/none"
fi

slurm_conf=$(cat <<EOF
# Written by budget-lab scripts/slurm/start-slurm.sh; edits are overwritten at the next start.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after it ended (default 120 s: too slow).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
# No cgroups in containers: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmdSpoolDir=$STATE/d
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
$accounting
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
$gres_types
$cpu_override
# Preemption by partition priority: debug (tier 10) preempts spot (tier 1), which is requeued.
# preempt_send_user_signal delivers the job's --signal (submitit's USR2) at preemption.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$SLURM_CPUS RealMemory=$SLURM_MEM_MB$node_gres State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
PartitionName=spot Nodes=$NODE Default=NO MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
EOF
)

slurmdbd_conf=$(cat <<EOF
# Written by budget-lab scripts/slurm/start-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$SLURM_DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
)

changed=0
# put FILE MODE CONTENT: write FILE only when its content differs (then the daemons restart).
put() {
    if [ ! -f "$1" ] || [ "$(cat "$1")" != "$3" ]; then
        printf '%s\n' "$3" >"$1"
        changed=1
    fi
    chmod "$2" "$1"
}
put "$ETC/slurm.conf" 644 "$slurm_conf"
put "$ETC/gres.conf" 644 "$gres_conf"
if [ "$SLURM_WITH_DBD" = 1 ]; then
    put "$ETC/slurmdbd.conf" 600 "$slurmdbd_conf"  # slurmdbd insists on 600: it holds a password
else
    rm -f "$ETC/slurmdbd.conf"
fi
echo "export SLURM_CONF=$SLURM_CONF" >"$SLURM_ROOT/env.sh"

if [ "$SLURM_LINK_ETC" = 1 ]; then
    mkdir -p /etc/slurm
    for f in slurm.conf gres.conf slurmdbd.conf; do
        if [ -e "/etc/slurm/$f" ] && [ ! -L "/etc/slurm/$f" ]; then
            say "WARNING: /etc/slurm/$f is a real file; left alone (clients need SLURM_CONF=$SLURM_CONF)"
        elif [ -f "$ETC/$f" ]; then
            ln -sfn "$ETC/$f" "/etc/slurm/$f"
        elif [ "$(readlink "/etc/slurm/$f" 2>/dev/null)" = "$ETC/$f" ]; then
            rm -f "/etc/slurm/$f"
        fi
    done
fi

if [ $changed = 1 ]; then
    say "configuration written to $ETC; restarting any running Slurm daemons"
    halt "$RUN/slurmd.pid" slurmd
    halt "$RUN/slurmctld.pid" slurmctld
    halt "$RUN/slurmdbd.pid" slurmdbd
fi

# ------------------------------------------------------------------------------ 6. MariaDB, slurmdbd
if [ "$SLURM_WITH_DBD" = 1 ]; then
    install -d -o mysql -g mysql "$DB"
    if [ ! -d "$DB/data/mysql" ]; then
        say "creating the MariaDB data folder $DB/data"
        mariadb-install-db --user=mysql --datadir="$DB/data" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || fail "mariadb-install-db failed; see $LOG/mariadb-install.log"
    fi
    if alive "$DB/mysqld.pid" mariadbd; then
        say "mariadbd already running"
    else
        say "starting mariadbd on 127.0.0.1:$SLURM_DB_PORT"
        setsid nohup /usr/sbin/mariadbd --user=mysql --datadir="$DB/data" \
            --socket="$DB/mysqld.sock" --pid-file="$DB/mysqld.pid" \
            --port="$SLURM_DB_PORT" --bind-address=127.0.0.1 --log-error="$LOG/mariadb.log" \
            --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
            </dev/null >/dev/null 2>&1 9>&- &
        until_ok mariadbd mariadb --socket="$DB/mysqld.sock" -uroot -e 'SELECT 1' \
            || fail "mariadbd did not start; see $LOG/mariadb.log"
    fi
    mariadb --socket="$DB/mysqld.sock" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        FLUSH PRIVILEGES;" || fail "could not create the database user 'slurm'"
    if alive "$RUN/slurmdbd.pid" slurmdbd; then
        say "slurmdbd already running"
    else
        say "starting slurmdbd"
        /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 9>&- || fail "slurmdbd failed; see $LOG/slurmdbd.log"
        until_ok slurmdbd sacctmgr -n show cluster || fail "slurmdbd does not answer; see $LOG/slurmdbd.log"
    fi
else
    # Switched from a cluster with accounting to one without: stop our database daemons.
    halt "$RUN/slurmdbd.pid" slurmdbd
    halt "$DB/mysqld.pid" mariadbd
fi

# ------------------------------------------------------------------------------ 7. slurmctld, slurmd
if alive "$RUN/slurmctld.pid" slurmctld; then
    say "slurmctld already running"
else
    say "starting slurmctld"
    /usr/sbin/slurmctld -i </dev/null >/dev/null 2>&1 9>&- || fail "slurmctld failed; see $LOG/slurmctld.log"
fi
until_ok slurmctld bash -c 'scontrol ping | grep -q "is UP"' \
    || fail "slurmctld does not answer; see $LOG/slurmctld.log"

if alive "$RUN/slurmd.pid" slurmd; then
    say "slurmd already running"
else
    say "starting slurmd"
    /usr/sbin/slurmd -N "$NODE" </dev/null >/dev/null 2>&1 9>&- || fail "slurmd failed; see $LOG/slurmd.log"
fi

# node_ready: the node takes jobs. A node left DOWN or DRAINED by an unclean stop is ours to
# resume.
node_ready() {
    local state
    state=$(scontrol -o show node "$NODE" 2>/dev/null | sed -n 's/.* State=\([^ ]*\).*/\1/p')
    case "$state" in
        *DRAIN* | DOWN*)
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        IDLE* | MIXED* | ALLOCATED*) return 0 ;;
        *) return 1 ;;
    esac
}
if ! until_ok "node $NODE" node_ready; then
    scontrol show node "$NODE" >&2 || true
    fail "node $NODE does not take jobs; see $LOG/slurmd.log and $LOG/slurmctld.log"
fi
if [ "$SLURM_WITH_DBD" = 1 ]; then
    # slurmctld registers the cluster in slurmdbd by itself, a moment after it starts; until then
    # sacct answers nothing.
    until_ok "accounting" bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER" \
        || say "WARNING: cluster $CLUSTER is not registered in slurmdbd yet; sacct may lag"
fi

say "cluster up after $(elapsed) s; clients: SLURM_CONF=$SLURM_CONF (or source $SLURM_ROOT/env.sh)"
sinfo -o '%P %a %D %T %c %m %G' >&2
echo "SLURM_CONF=$SLURM_CONF"
