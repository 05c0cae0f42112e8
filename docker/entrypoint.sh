#!/bin/sh
# The image's entry point. Without GATEWAY_WORKERS, run one Granian worker per CPU the container
# may use: nproc, capped by a cgroup CPU quota (an ECS task's cpu, `docker run --cpus`), since
# nproc shows every CPU of the host or VM. Then exec, so the gateway's Granian parent is PID 1
# and receives the stop signal itself.
set -eu

cpu_quota() {
    # Prints the quota in whole CPUs, rounded up, or nothing when there is none.
    if [ -r /sys/fs/cgroup/cpu.max ]; then
        read -r quota period < /sys/fs/cgroup/cpu.max
    elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)
        period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)
    else
        return 0
    fi
    case "$quota" in
        max | -1) ;;
        *) echo $(( (quota + period - 1) / period )) ;;
    esac
}

if [ -z "${GATEWAY_WORKERS:-}" ]; then
    cpus=$(nproc)
    quota=$(cpu_quota)
    if [ -n "$quota" ] && [ "$quota" -ge 1 ] && [ "$quota" -lt "$cpus" ]; then
        cpus=$quota
    fi
    GATEWAY_WORKERS=$cpus
    export GATEWAY_WORKERS
fi

exec llm-gateway "$@"
