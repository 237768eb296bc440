#!/usr/bin/env bash
# local-slurm.sh - a REAL Slurm cluster on this one machine, for the integration tests of encdec-launch.
# (This project's copy of shared/tools/local-slurm.sh; CI runs `bash tests/cluster/local-slurm.sh up` before
# the tests, and tests/cluster/slurm_testlib.py runs it too when the cluster is not up and it can.)
#
#   local-slurm.sh up      install (if missing), configure, start munged/slurmctld/slurmd x N,
#                          wait until every node is idle, print sinfo. Idempotent.
#   local-slurm.sh down    cancel all jobs, stop only the daemons this script started (pid files).
#   local-slurm.sh status  daemons, sinfo, squeue; exit 0 only if every daemon runs and answers.
#   local-slurm.sh logs    tail of every daemon log (for CI failure output).
#
# Simulated nodes n1..nN share 127.0.0.1 (Debian's Slurm is built with multiple-slurmd support:
# one slurmd per node, each on its own port). Needs root, Debian/Ubuntu with apt, no systemd.
# Accounting (sacct, slurmdbd) is NOT set up: use `scontrol show job` (jobs stay for MinJobAge).
#
# Environment overrides (defaults in brackets):
#   LOCAL_SLURM_NODES [2]            number of simulated nodes (n1..nN)
#   LOCAL_SLURM_CPUS [nproc/N, >=1]  CPUs per node (may exceed the hardware; config_overrides is on)
#   LOCAL_SLURM_MEM_MB [80% RAM / N] RealMemory per node (memory is not a consumable resource)
#   LOCAL_SLURM_PROCTRACK [auto]     auto | cgroup | linuxproc
#   LOCAL_SLURM_CRED_EXPIRE [10]     seconds; also how long a requeued job waits before it may restart
#   LOCAL_SLURM_KILLWAIT [10]        seconds between SIGTERM and SIGKILL at time limit / scancel
#   LOCAL_SLURM_CTLD_PORT [6817]     slurmctld port; slurmd ports are LOCAL_SLURM_SLURMD_PORT [17001]..+N-1
#   LOCAL_SLURM_TIMEOUT [60]         seconds to wait for the nodes to become idle
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"   # slurmctld, slurmd, munged live in sbin

NODES="${LOCAL_SLURM_NODES:-2}"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-17001}"
CRED_EXPIRE="${LOCAL_SLURM_CRED_EXPIRE:-10}"
KILLWAIT="${LOCAL_SLURM_KILLWAIT:-10}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
PROCTRACK="${LOCAL_SLURM_PROCTRACK:-auto}"

CONF_DIR=/etc/slurm                 # the default path: sbatch & co. need no SLURM_CONF
CONF="$CONF_DIR/slurm.conf"
CGROUP_CONF="$CONF_DIR/cgroup.conf"
RUN_DIR=/run/local-slurm            # pid files of the daemons this script started (and only those)
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MARKER="# written by local-slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local-slurm: $*" >&2; }
die() { echo "local-slurm: ERROR: $*" >&2; exit 1; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

# proc_alive PID COMM: true if PID is a live (non-zombie) process named COMM.
proc_alive() {
    local state
    [[ -n "$1" && -r "/proc/$1/stat" ]] || return 1
    [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

pid_of() { { tr -dc '0-9' <"$1"; } 2>/dev/null || true; }

# pid_alive PIDFILE COMM: true if the pid in PIDFILE is a live process named COMM.
pid_alive() { proc_alive "$(pid_of "$1")" "$2"; }

# stop_pidfile PIDFILE COMM: SIGTERM, wait up to 10 s, then SIGKILL. Only that one pid.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    pid=$(pid_of "$pidfile")
    if proc_alive "$pid" "$comm"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do proc_alive "$pid" "$comm" || break; sleep 0.1; done
        if proc_alive "$pid" "$comm"; then
            log "$comm (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        log "stopped $comm (pid $pid)"
    fi
    rm -f "$pidfile"
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

install_packages() {
    local missing=0 c
    for c in slurmctld slurmd sbatch munged; do command -v "$c" >/dev/null 2>&1 || missing=1; done
    [[ $missing -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
    log "installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" </dev/null >/tmp/local-slurm-apt.log 2>&1 \
        || { tail -20 /tmp/local-slurm-apt.log >&2; die "apt-get install ${PACKAGES[*]} failed"; }
    for c in slurmctld slurmd sbatch munged; do command -v "$c" >/dev/null || die "$c missing after install"; done
}

# n1..nN must resolve (jobs read them from SLURM_JOB_NODELIST, e.g. for a Ray head or MASTER_ADDR).
ensure_hosts() {
    local n missing=()
    for n in $(node_names); do getent hosts "$n" >/dev/null 2>&1 || missing+=("$n"); done
    if ((${#missing[@]})); then
        # append (not sed -i): /etc/hosts is often a bind mount that cannot be replaced
        [[ -s /etc/hosts && -n "$(tail -c 1 /etc/hosts)" ]] && echo >>/etc/hosts
        echo "127.0.0.1 ${missing[*]} $MARKER" >>/etc/hosts || die "cannot append to /etc/hosts"
        log "added '127.0.0.1 ${missing[*]}' to /etc/hosts"
    fi
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge "$MUNGE_RUN"
    chown munge:munge /etc/munge /var/lib/munge /var/log/munge "$MUNGE_RUN"
    chmod 0700 /etc/munge /var/log/munge
    chmod 0755 "$MUNGE_RUN"
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating $MUNGE_KEY"
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    if munge_works; then
        return 0    # ours from an earlier `up`, or someone else's: either way reuse it
    fi
    rm -f "$RUN_DIR/munged.pid" "$MUNGE_RUN/munged.pid"
    # munged runs as the munge user, so its own pid file lives in the munge-owned $MUNGE_RUN;
    # $RUN_DIR/munged.pid is our copy, the record that this script started it.
    # --force: run despite a stale socket or "insecure" parent-dir permissions common in containers
    local as_munge=(runuser -u munge --)
    command -v runuser >/dev/null 2>&1 || as_munge=(setpriv --reuid=munge --regid=munge --init-groups)
    "${as_munge[@]}" munged --force --pid-file="$MUNGE_RUN/munged.pid" \
        --socket="$MUNGE_RUN/munge.socket.2" --log-file=/var/log/munge/munged.log </dev/null \
        || die "munged failed to start; see /var/log/munge/munged.log"
    local i
    for ((i = 0; i < 50; i++)); do munge_works && break; sleep 0.1; done
    munge_works || die "munged started but munge -n | unmunge fails; see /var/log/munge/munged.log"
    cp "$MUNGE_RUN/munged.pid" "$RUN_DIR/munged.pid"
    log "started munged (pid $(cat "$RUN_DIR/munged.pid"))"
}

# Prints the ProctrackType to use. cgroup v1 (freezer) kills every process of a step, even ones
# that re-parented to init; linuxproc only follows the parent chain.
choose_proctrack() {
    case "$PROCTRACK" in
        cgroup | linuxproc) echo "proctrack/$PROCTRACK"; return ;;
        auto) ;;
        *) die "LOCAL_SLURM_PROCTRACK must be auto, cgroup or linuxproc (got '$PROCTRACK')" ;;
    esac
    local probe="/sys/fs/cgroup/freezer/local_slurm_probe_$$"
    if [[ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" == tmpfs && -d /sys/fs/cgroup/freezer ]] \
        && mkdir "$probe" 2>/dev/null; then
        rmdir "$probe" 2>/dev/null || true
        echo proctrack/cgroup
    else
        echo proctrack/linuxproc
    fi
}

render_conf() {
    local proctrack=$1 cpus=$2 mem=$3 last=$((SLURMD_PORT + NODES - 1))
    cat <<EOF
$MARKER - regenerated on every 'up'; edit the script, not this file
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_RUN/munge.socket.2,cred_expire=$CRED_EXPIRE
CryptoType=crypto/munge
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=$proctrack
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# scan pending jobs every 2 s (default 60 s main / 30 s backfill): a requeued job whose BeginTime has
# passed starts within seconds instead of up to a minute later
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=$KILLWAIT
MinJobAge=3600
InactiveLimit=0
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$SLURMD_PORT-$last] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

render_cgroup_conf() {
    cat <<EOF
$MARKER
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
}

# every slurmd pid file we have, including nodes of an earlier, larger LOCAL_SLURM_NODES
slurmd_pidfiles() { compgen -G "$RUN_DIR/slurmd-*.pid" || true; }

slurm_daemons_running() {
    local f
    pid_alive "$RUN_DIR/slurmctld.pid" slurmctld && return 0
    for f in $(slurmd_pidfiles); do pid_alive "$f" slurmd && return 0; done
    return 1
}

validate_env() {
    local v
    for v in NODES:"$NODES" CTLD_PORT:"$CTLD_PORT" SLURMD_PORT:"$SLURMD_PORT" CRED_EXPIRE:"$CRED_EXPIRE" \
        KILLWAIT:"$KILLWAIT" TIMEOUT:"$TIMEOUT" CPUS:"${LOCAL_SLURM_CPUS:-1}" MEM_MB:"${LOCAL_SLURM_MEM_MB:-1}"; do
        [[ "${v#*:}" =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_${v%%:*} must be a positive integer (got '${v#*:}')"
    done
    ((CRED_EXPIRE >= 5)) || die "LOCAL_SLURM_CRED_EXPIRE must be >= 5 (Slurm's minimum)"
}

write_config() {
    local cpus mem proctrack new
    cpus="${LOCAL_SLURM_CPUS:-$(($(nproc) / NODES))}"
    ((cpus >= 1)) || cpus=1
    mem="${LOCAL_SLURM_MEM_MB:-$(awk -v n="$NODES" '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8 / n}' /proc/meminfo)}"
    proctrack=$(choose_proctrack)
    new=$(render_conf "$proctrack" "$cpus" "$mem")
    mkdir -p "$CONF_DIR"
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        cp -p "$CONF" "$CONF.before-local-slurm"
        log "WARNING: replaced a slurm.conf not written by this script (saved as $CONF.before-local-slurm)"
    fi
    if [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
        return 0
    fi
    if slurm_daemons_running; then
        log "configuration changed: restarting the Slurm daemons"
        cancel_all_jobs
        stop_slurm_daemons
    fi
    printf '%s\n' "$new" >"$CONF"
    chmod 0644 "$CONF"
    if [[ "$proctrack" == proctrack/cgroup ]]; then
        render_cgroup_conf >"$CGROUP_CONF"
    elif [[ -f "$CGROUP_CONF" ]] && grep -qF "$MARKER" "$CGROUP_CONF"; then
        rm -f "$CGROUP_CONF"
    fi
    log "wrote $CONF ($NODES nodes x $cpus CPUs, RealMemory=$mem MB, $proctrack)"
}

# Client commands: never let a wedged or foreign server hang `up`/`down` (MessageTimeout is 10 s).
sctl() { timeout 5 "$@" </dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurm() {
    local n i port
    mkdir -p "$RUN_DIR" "$CTLD_SPOOL" "$LOG_DIR"
    chown slurm:slurm "$CTLD_SPOOL" "$LOG_DIR"
    if ! pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
        port_busy "$CTLD_PORT" && die "port $CTLD_PORT (slurmctld) is taken by another process; set LOCAL_SLURM_CTLD_PORT"
        # -c: start from an empty state (no jobs or node states left from an earlier run)
        slurmctld -c </dev/null || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
        for ((i = 0; i < 100; i++)); do
            sctl scontrol ping >/dev/null 2>&1 && break
            # it daemonizes first, so a fatal error (bad config, port) shows as a dead pid
            ((i < 10)) || pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || break
            sleep 0.1
        done
        sctl scontrol ping >/dev/null 2>&1 \
            || { tail -20 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld did not come up (log above)"; }
        log "started slurmctld (pid $(cat "$RUN_DIR/slurmctld.pid"))"
    fi
    for n in $(node_names); do
        port=$((SLURMD_PORT + ${n#n} - 1))
        if ! pid_alive "$RUN_DIR/slurmd-$n.pid" slurmd; then
            port_busy "$port" && die "port $port (slurmd $n) is taken by another process; set LOCAL_SLURM_SLURMD_PORT"
            mkdir -p "$SLURMD_SPOOL/$n"
            slurmd -N "$n" </dev/null || { tail -20 "$LOG_DIR/slurmd-$n.log" >&2; die "slurmd -N $n failed to start"; }
            for ((i = 0; i < 50; i++)); do pid_alive "$RUN_DIR/slurmd-$n.pid" slurmd && break; sleep 0.1; done
            pid_alive "$RUN_DIR/slurmd-$n.pid" slurmd \
                || { tail -20 "$LOG_DIR/slurmd-$n.log" >&2; die "slurmd -N $n exited right after start"; }
            log "started slurmd -N $n (pid $(cat "$RUN_DIR/slurmd-$n.pid"))"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) states bad resumed=0
    while :; do
        # %t: compact state; a trailing *, ~, #, ! ... marks a non-responding/powering node
        states=$(sctl sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u) || states=""
        bad=$(awk '$2 !~ /^(idle|mix|alloc)$/' <<<"$states")
        if [[ -n "$states" && -z "$bad" && $(wc -l <<<"$states") -eq $NODES ]]; then
            return 0
        fi
        if [[ $resumed -eq 0 ]] && grep -Eq '(drain|down|drng)$' <<<"$bad"; then
            sctl scontrol update NodeName="n[1-$NODES]" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            echo "$states" >&2
            sctl sinfo -R >&2 || true
            cmd_logs >&2
            die "nodes not idle after ${TIMEOUT}s"
        fi
        sleep 0.2
    done
}

cmd_up() {
    need_root
    validate_env
    local t0
    t0=$(date +%s.%N)
    install_packages
    mkdir -p "$RUN_DIR"
    ensure_hosts
    start_munge
    write_config
    start_slurm
    wait_idle
    log "cluster up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
    sctl sinfo
}

stop_slurm_daemons() {
    local f
    for f in $(slurmd_pidfiles); do stop_pidfile "$f" slurmd; done
    stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
}

cancel_all_jobs() {
    local i
    pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || return 0
    sctl scontrol ping >/dev/null 2>&1 || return 0
    [[ -n "$(sctl squeue -h -o %A 2>/dev/null)" ]] || return 0
    log "cancelling all jobs"
    sctl squeue -h -o %A | xargs -r timeout 5 scancel 2>/dev/null || true
    # slurmstepd processes outlive slurmd: let them finish before slurmd goes away
    for ((i = 0; i < (KILLWAIT + 10) * 5; i++)); do
        [[ -z "$(sctl squeue -h -o %A 2>/dev/null)" ]] && return 0
        sleep 0.2
    done
    log "WARNING: jobs still listed after cancel: $(sctl squeue -h -o '%A %T' | tr '\n' ' ')"
}

cmd_down() {
    need_root
    cancel_all_jobs
    stop_slurm_daemons
    local d
    # empty freezer cgroups left by proctrack/cgroup (rmdir removes only empty ones)
    for d in /sys/fs/cgroup/freezer/slurm_n[0-9]*; do
        [[ -d "$d" ]] && { find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true; }
    done
    if pid_alive "$RUN_DIR/munged.pid" munged; then
        stop_pidfile "$RUN_DIR/munged.pid" munged
    fi
    rm -f "$RUN_DIR/munged.pid"
}

cmd_status() {
    local n rc=0 f
    for f in "munged:$RUN_DIR/munged.pid" "slurmctld:$RUN_DIR/slurmctld.pid"; do
        if pid_alive "${f#*:}" "${f%%:*}"; then
            echo "${f%%:*}: running (pid $(cat "${f#*:}"))"
        elif [[ "${f%%:*}" == munged ]] && munge_works; then
            echo "munged: running (not started by local-slurm.sh)"
        else
            echo "${f%%:*}: stopped"; rc=3
        fi
    done
    for n in $(node_names); do
        if pid_alive "$RUN_DIR/slurmd-$n.pid" slurmd; then
            echo "slurmd $n: running (pid $(cat "$RUN_DIR/slurmd-$n.pid"))"
        else
            echo "slurmd $n: stopped"; rc=3
        fi
    done
    if [[ $rc -eq 0 ]]; then
        if sctl scontrol ping >/dev/null 2>&1; then
            sctl sinfo
            sctl squeue
        else
            echo "slurmctld: not answering"; rc=3
        fi
    fi
    return $rc
}

cmd_logs() {
    local f
    for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log /var/log/munge/munged.log; do
        [[ -f "$f" ]] || continue
        echo "==> $f <=="
        tail -n 25 "$f"
    done
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    *) echo "usage: $0 up|down|status|logs" >&2; exit 2 ;;
esac
