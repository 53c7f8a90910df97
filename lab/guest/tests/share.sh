#!/bin/sh
# Mounts every virtio-fs tag of cloister.shares=TAG[:ro],... at /mnt/TAG and exercises it: reads
# the host's files (a small one, a 64 MiB one, one with a set mode and time), and on a writable
# share writes a file, renames one, deletes one, makes a directory, sets a mode and a time; on a
# ":ro" share a write must fail. One CLOISTER-SHARE-TAG line of key=value results per share.
shares=
for word in $(cat /proc/cmdline); do
    case "$word" in cloister.shares=*) shares=${word#cloister.shares=} ;; esac
done
sum() { sha256sum <"$1" | cut -d' ' -f1; }
rc=0
for spec in $(echo "$shares" | tr ',' ' '); do
    tag=${spec%:ro}
    d=/mnt/$tag
    mkdir -p "$d"
    if ! mount -t virtiofs "$tag" "$d"; then
        echo "CLOISTER-SHARE-$tag mount=failed"
        rc=1
        continue
    fi
    out="CLOISTER-SHARE-$tag mount=ok from_host=$(sum "$d/from-host") big=$(sum "$d/big")"
    out="$out mode=$(stat -c %a "$d/moded") mtime=$(stat -c %Y "$d/moded")"
    if [ "$spec" != "$tag" ]; then
        if echo x >"$d/should-fail" 2>/dev/null; then
            out="$out ro_write=allowed"
        else
            out="$out ro_write=refused"
        fi
    else
        seq 1 10000 >"$d/from-guest"
        mv "$d/to-rename" "$d/renamed"
        rm "$d/to-delete"
        mkdir "$d/guest-dir" && echo inside >"$d/guest-dir/file"
        echo m >"$d/guest-mode"
        chmod 604 "$d/guest-mode"
        touch -d '2001-02-03 04:05:06' "$d/guest-mode"
        sync
        out="$out from_guest=$(sum "$d/from-guest") renamed=$(cat "$d/renamed")"
        [ -e "$d/to-delete" ] || out="$out deleted=yes"
    fi
    echo "$out"
    umount "$d" || rc=1
done
exit $rc
