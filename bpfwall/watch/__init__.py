"""`bpfwall watch`: the daemon that keeps the policy's programs on every matching cgroup.

inotify.py   inotify(7) via ctypes          notify.py  sd_notify over $NOTIFY_SOCKET
log.py       journald fields or stderr     state.py   what the watcher loaded (across restarts)
units.py     loaded units, open for attach  daemon.py  reconcile, event loop, SIGHUP
"""
