#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for das-lab's SLURM tests and for trying
# `hydra/launcher=slurm` without a real cluster (Debian/Ubuntu, as root):
#
#   scripts/slurm_cluster.sh start    install what is missing (slurm-wlm, munge, slurmdbd, MariaDB),
#                                     then start munged, MariaDB, slurmdbd, slurmctld and slurmd
#   scripts/slurm_cluster.sh status   exit 0 and print SLURM_CONF=... while the cluster answers
#   scripts/slurm_cluster.sh stop     stop the daemons that `start` started and remove its folder
#
# Clients find the cluster through SLURM_CONF (printed by start and status):
#   export SLURM_CONF=/tmp/das-lab-slurm/etc/slurm.conf; sinfo
# Configs, state and logs live in $DAS_LAB_SLURM_DIR (default /tmp/das-lab-slurm); every daemon
# listens on 127.0.0.1 only; no systemd, no cgroups (proctrack/linuxproc, task/none). Requeued jobs
# restart after $CRED_EXPIRE_S seconds instead of SLURM's default 120.
set -euo pipefail

ROOT=${DAS_LAB_SLURM_DIR:-/tmp/das-lab-slurm}
ETC=$ROOT/etc
RUN=$ROOT/run
LOG=$ROOT/log
CONF=$ETC/slurm.conf
MARKER=$ROOT/.das-lab-slurm-cluster  # only a folder holding it is ever removed
CLUSTER=daslab
NODE=localhost
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
MYSQL_PORT=3307
CRED_EXPIRE_S=10
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)  # stop order; start is the reverse
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every half second until it succeeds
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "$what did not come up within ${seconds}s; its log:"
            tail -n 20 "$LOG/$what.log" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

install_missing() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
    say "installing ${missing[*]}"
    # packages must not start their own services: this script starts what it needs
    local policy=/usr/sbin/policy-rc.d own_policy=false
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=true
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$ROOT/apt.log" 2>&1 || { tail -n 20 "$ROOT/apt.log" >&2; die "apt-get install failed"; }
    if $own_policy; then rm -f "$policy"; fi
}

# ours NAME: the pid of daemon NAME that `start` spawned, if that process still runs it (pids get reused)
ours() {
    local pid
    pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] && echo "$pid"
}

# spawn NAME COMMAND...: run a daemon in the foreground of its own session, remember its pid
spawn() {
    local name=$1
    shift
    setsid "$@" >>"$LOG/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
}

write_configs() {
    local cpus mem_mb
    cpus=$(nproc)
    ((cpus >= 2)) || cpus=2  # the tests run two tasks at once (a 2-job array, 2-rank DDP)
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >"$CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$RUN/munge.socket,cred_expire=$CRED_EXPIRE_S
StateSaveLocation=$ROOT/state/ctld
SlurmdSpoolDir=$ROOT/state/slurmd
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$RUN/munge.socket
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
    dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none
    chmod 400 "$ETC/munge.key"
    spawn munged munged --foreground --force --key-file="$ETC/munge.key" --socket="$RUN/munge.socket" \
        --pid-file="$RUN/munged.daemon.pid" --seed-file="$ROOT/state/munged.seed" --log-file="$LOG/munged.log"
    wait_for 10 munged bash -c "munge -n -S '$RUN/munge.socket' | unmunge -S '$RUN/munge.socket'"
}

start_mariadb() {
    mariadb-install-db --no-defaults --user=root --datadir="$ROOT/state/mysql" --skip-test-db \
        >"$LOG/mariadb-install.log" 2>&1 || { tail -n 20 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    spawn mariadb mariadbd --no-defaults --user=root --datadir="$ROOT/state/mysql" --socket="$RUN/mysqld.sock" \
        --pid-file="$RUN/mariadb.daemon.pid" --bind-address=127.0.0.1 --port=$MYSQL_PORT --skip-name-resolve \
        --innodb-buffer-pool-size=32M --log-error="$LOG/mariadb.log"
    wait_for 30 mariadb mariadb-admin --no-defaults --socket="$RUN/mysqld.sock" ping
    mariadb --no-defaults --socket="$RUN/mysqld.sock" -u root -e \
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

node_idle() {
    [[ $(sinfo -h -n "$NODE" -o %T) == idle ]]
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons): sudo $0 start"
    if status >/dev/null 2>&1; then
        say "already running"
        echo "SLURM_CONF=$CONF"
        return 0
    fi
    [[ ! -e $ROOT ]] || stop
    mkdir -p "$ETC" "$RUN" "$LOG" "$ROOT/state/ctld" "$ROOT/state/slurmd"
    chmod 700 "$ROOT"
    touch "$MARKER"
    install_missing
    write_configs
    export SLURM_CONF=$CONF
    start_munge
    start_mariadb
    spawn slurmdbd slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n show cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    spawn slurmctld slurmctld -D -i
    wait_for 30 slurmctld scontrol ping
    spawn slurmd slurmd -D -N "$NODE"
    wait_for 30 slurmd node_idle
    say "running (${SECONDS}s); logs in $LOG"
    echo "SLURM_CONF=$CONF"
}

status() {
    [[ -f $CONF ]] || { say "not running (no $CONF)"; return 1; }
    export SLURM_CONF=$CONF
    local name
    for name in "${DAEMONS[@]}"; do
        ours "$name" >/dev/null || { say "not running: $name is down"; return 1; }
    done
    timeout 10 scontrol ping >/dev/null 2>&1 || { say "not running: slurmctld does not answer"; return 1; }
    echo "SLURM_CONF=$CONF"
}

stop() {
    local name pid
    if status >/dev/null 2>&1; then  # jobs first: their slurmstepd processes outlive slurmd
        squeue -h -o %A | xargs -r scancel
        wait_for 30 jobs-ended bash -c '[[ -z $(squeue -h) ]]' || true
    fi
    for name in "${DAEMONS[@]}"; do
        pid=$(ours "$name") || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    [[ ! -f $MARKER ]] || rm -rf "$ROOT"
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
