#!/bin/sh
# Removes exactly what install.sh installed, as recorded in PREFIX/share/@NAME@/installed-files
# (PREFIX is the parent of the directory holding this script):
#   f PATH   a file install.sh placed (bundle files, image archives and lists, this manifest)
#   l PATH   the DATA_DIR/bin symlink
#   r PATH   a runtime directory DATA_DIR/data/KEY that install.sh staged (removed whole)
#   d PATH   a directory install.sh created (removed only when empty)
# Anything else (state the node wrote in the data dir, /etc/@NAME@ config, directories that existed
# before the install) stays. UNINSTALL_SKIP_KILLALL=true skips stopping the runtime first.
set -e

NAME=@NAME@

fatal() {
    echo "[ERROR] $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || fatal "$0 must run as root"

here=$(cd -- "$(dirname -- "$0")" && pwd)
PREFIX=$(dirname -- "$here")
MANIFEST=$PREFIX/share/$NAME/installed-files
[ -f "$MANIFEST" ] || fatal "$MANIFEST not found: nothing recorded to uninstall"

bad=$(grep -n -v -E '^[fdlr] /.' "$MANIFEST" | head -n 1 || true)
[ -z "$bad" ] || fatal "$MANIFEST: malformed line ${bad%%:*}; refusing to remove anything"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/uninstall.XXXXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
cp "$MANIFEST" "$WORK/manifest"

if command -v systemctl > /dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now "$NAME-server.service" "$NAME-agent.service" 2> /dev/null || true
fi
case ${UNINSTALL_SKIP_KILLALL:-} in
    true | 1 | yes) ;;
    *)
        if [ -x "$here/$NAME-killall.sh" ]; then
            "$here/$NAME-killall.sh"
        fi
        ;;
esac

while IFS= read -r line; do
    path=${line#? }
    case $line in
        f\ *) if [ -f "$path" ] || [ -L "$path" ]; then rm -f -- "$path"; fi ;;
        l\ *) if [ -L "$path" ]; then rm -f -- "$path"; fi ;;
        r\ *)
            case $path in
                */data/?*) rm -rf -- "$path" ;;
                *) echo "[WARN]  not removing $path: not a runtime data directory" >&2 ;;
            esac
            ;;
    esac
done < "$WORK/manifest"

# Children sort after their parents, so reverse order empties the deepest directories first.
grep '^d ' "$WORK/manifest" | cut -c 3- | sort -r | while IFS= read -r dir; do
    rmdir -- "$dir" 2> /dev/null || true
done

if command -v systemctl > /dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "[INFO]  $NAME uninstalled"
