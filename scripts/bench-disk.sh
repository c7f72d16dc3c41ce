#!/bin/sh
# A journaled ext4 for the benchmark, in an image file, for a host whose own filesystem has no
# journal (`cowfs bench` warns when its work dir is on one).
#
#   scripts/bench-disk.sh mount DIR [SIZE]   make the image DIR.img (default 24G, sparse),
#                                           format it and mount it on DIR
#   scripts/bench-disk.sh umount DIR         unmount it (the image stays, with its data)
#
# Why: ext4 without a journal makes a new inode skip every inode freed in the last minutes,
# reading each one's dtime (recently_deleted() in fs/ext4/ialloc.c), so creating 10,000 files
# after 10,000 were unlinked took 3.8-9.0 s here against 0.36 s on a journaled ext4 on the
# same disk. The bench's create row then measured the order of its samples. cowfs also syncs
# copy-ups before their rename on such an upper (cowfs/settling.py). Any journaled ext4, xfs or
# btrfs does as well as this one; the loop device does direct I/O to its image, so the page
# cache holds each block once.
set -eu
cmd=${1:?usage: $0 mount|umount DIR [SIZE]}
dir=$(realpath -m "${2:?usage: $0 mount|umount DIR [SIZE]}")
img="$dir.img"
case $cmd in
mount)
	if mountpoint -q "$dir"; then echo "$dir is mounted already" >&2; exit 1; fi
	mkdir -p "$dir"
	if [ ! -e "$img" ]; then
		truncate -s "${3:-24G}" "$img"
		mkfs.ext4 -q -F "$img"
	fi
	dev=$(losetup --direct-io=on --find --show "$img")
	mount "$dev" "$dir" || { losetup -d "$dev"; exit 1; }
	losetup --detach "$dev" 2>/dev/null || true  # autoclear: it goes when unmounted
	echo "$dir: journaled ext4 on $dev ($img)"
	;;
umount)
	umount "$dir"
	;;
*)
	echo "usage: $0 mount|umount DIR [SIZE]" >&2
	exit 2
	;;
esac
