#!/bin/sh
# Stops @NAME@ and the processes, mounts and network interfaces it started, leaving every file
# in place (the data dir keeps its state; @NAME@-uninstall.sh removes what install.sh put there).
# install.sh rewrites DATA_DIR below when the node uses another data dir.
set -e

DATA_DIR=/var/lib/rancher/@NAME@

[ "$(id -u)" -eq 0 ] || { echo "[ERROR] $0 must run as root" >&2; exit 1; }

if command -v systemctl > /dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop @NAME@-server.service @NAME@-agent.service 2> /dev/null || true
fi

# Processes whose executable lives in the staged runtime (containerd, shims, kubelet, ...).
runtime_pids() {
    for proc in /proc/[0-9]*; do
        exe=$(readlink "$proc/exe" 2> /dev/null) || continue
        case $exe in
            "$DATA_DIR"/data/*) echo "${proc#/proc/}" ;;
        esac
    done
}

pids=$(runtime_pids)
if [ -n "$pids" ]; then
    # shellcheck disable=SC2086 # one pid per word
    kill -9 $pids 2> /dev/null || true
fi

# Unmount the runtime's mounts, deepest first.
unmount_under() {
    awk -v p="$1" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r |
        while IFS= read -r mnt; do
            umount -f "$mnt" 2> /dev/null || umount -l "$mnt" 2> /dev/null || true
        done
}

unmount_under /run/k3s
unmount_under /run/netns/cni-
unmount_under /var/lib/kubelet/pods
unmount_under /var/lib/kubelet/plugins
unmount_under "$DATA_DIR/agent/containerd"

if command -v ip > /dev/null 2>&1; then
    for link in cni0 flannel.1 flannel-v6.1 vxlan.calico vxlan-v6.calico cilium_host cilium_net cilium_vxlan kube-ipvs0 nodelocaldns; do
        ip link delete "$link" 2> /dev/null || true
    done
fi

if command -v iptables-save > /dev/null 2>&1 && command -v iptables-restore > /dev/null 2>&1; then
    iptables-save | grep -v -E 'KUBE-|CNI-|cali-|cali:|flannel|CILIUM_' | iptables-restore || true
fi
