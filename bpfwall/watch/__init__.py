"""`bpfwall watch`: the daemon that keeps the policy's filters on every matching cgroup.

inotify.py   inotify(7) via ctypes          notify.py    sd_notify over $NOTIFY_SOCKET
log.py       journald fields or stderr     state.py     what the watcher loaded (across restarts)
daemon.py    reconcile, event loop, SIGHUP (with nft entries it drives nft/guard.py's Guard)

The units themselves are reached through the backends (bpfwall/backends/base.py:
prepare, ensure, attach, detach, refresh, ours_on); the watcher holds one of each.
"""
