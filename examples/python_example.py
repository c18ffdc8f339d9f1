#!/usr/bin/env python3
"""Share a service's settings through nkv, with the Python client.

One process publishes settings and another reacts to them:

    python3 examples/python_example.py publish      # writes demo.settings.*
    python3 examples/python_example.py watch        # prints every change

Without an argument it does both in one process: it subscribes, publishes a
few settings, and prints the events they cause. The socket is $NKV_SOCKET or
/tmp/nkv/nkv.sock; nkv.py comes from clients/python/ (or copy it next to your
program).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))

import nkv  # noqa: E402  (after the path set-up above)

SOCKET = os.environ.get("NKV_SOCKET", nkv.DEFAULT_SOCKET)
PREFIX = "demo.settings"


def publish(db):
    rev = db.put(PREFIX + ".log_level", "debug")
    print("put log_level at revision", rev)
    db.put(PREFIX + ".limits", {"max_jobs": 8, "queue": [1, 2, 3]})
    db.put(PREFIX + ".motd", "Welcome!\nMaintenance on Sunday.")  # newlines are fine
    print("all settings:", db.get_prefix(PREFIX))
    print("retries:", db.get(PREFIX + ".retries", default=3))  # a default instead of NotFound
    try:
        db.put("demo..bad", 1)
    except nkv.NkvError as err:
        print("refused:", err.code, "-", err.message)
    db.delete(PREFIX + ".motd")


def watch(db):
    # Events are dicts exactly as the server sends them: "init" for each current
    # key, one "ready", then "put" and "del" as they happen, until the server
    # stops ("shutdown").
    with db.subscribe(PREFIX, name="python-example") as events:
        for event in events:
            print("event:", event, flush=True)


def main(argv):
    mode = argv[1] if len(argv) > 1 else "demo"
    if mode not in ("publish", "watch", "demo"):
        print(__doc__, file=sys.stderr)
        return 2
    # wait=5: keep trying for a while if the server is still starting.
    with nkv.Client(SOCKET, wait=5.0) as db:
        print("server", db.version(), "is", db.health())
        if mode == "publish":
            publish(db)
        elif mode == "watch":
            watch(db)
        else:
            db.delete_prefix(PREFIX)
            with db.subscribe(PREFIX) as events:
                print("first event:", next(events))  # ready: nothing there yet
                publish(db)
                # publish() made 3 puts and 1 delete.
                for _ in range(4):
                    print("event:", next(events))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
