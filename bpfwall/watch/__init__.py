"""`bpfwall watch`: the daemon that keeps the policy's filters on every matching cgroup.

inotify.py   inotify(7) via ctypes          notify.py    sd_notify over $NOTIFY_SOCKET
log.py       journald fields or stderr     state.py     what the watcher loaded (across restarts)
units.py     bpf units, open for attach    nftunits.py  nft units (one table), attach = map element
daemon.py    reconcile, event loop, SIGHUP (with nft entries it drives nft/guard.py's Guard)
"""
