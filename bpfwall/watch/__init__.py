"""`bpfwall watch`: the daemon that keeps the policy's filters on every matching cgroup.

inotify.py   inotify(7) via ctypes          notify.py    sd_notify over $NOTIFY_SOCKET
log.py       journald fields or stderr     state.py     what the watcher loaded (across restarts)
units.py     bpf units, open for attach    nftunits.py  nft units (one table), attach = map element
nftguard.py  restore a flushed nft table   daemon.py    reconcile, event loop, SIGHUP
"""
