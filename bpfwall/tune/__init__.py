"""`bpfwall tune`: a full-screen terminal UI to watch units and change their values live.

    model  rates, the drop-rate history, what each key does (pure: tested without a terminal)
    view   drawing the two screens with curses
    app    the loop: reading counters once a second, keys, the terminal always restored
"""
