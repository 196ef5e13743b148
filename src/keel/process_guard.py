"""Child processes that must not outlive the gateway, however it ended (SIGKILL and OOM kills included)."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(interval: float = 0.5) -> None:
    """In a child process: exit within `interval` seconds of its parent's death. A pool's `initializer`."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # re-parented (to init or a subreaper) once the parent is gone
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="keel-parent-watch", daemon=True).start()
