"""Tests for nkv.py against the real server binary.

Run from the repository root, after `cargo build`:

    python3 -m unittest discover -s clients/python -v

The server is $NKV_SERVER_BIN, or <repo>/target/debug/nkv-server. Each test
starts its own server with --socket and --data-dir in a fresh temporary
directory, and stops it with SIGTERM, expecting exit code 0. Nothing waits by
sleeping: readiness is the socket accepting a connection (checked between
waits for the server's READY=1 on a NOTIFY_SOCKET), and every blocking read
has a deadline.
"""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

import nkv

REPO = Path(__file__).resolve().parents[2]
SERVER_BIN = os.environ.get("NKV_SERVER_BIN", str(REPO / "target" / "debug" / "nkv-server"))
DEADLINE = 10.0  # seconds for the server to start or stop, and for any one read


class Server:
    """One nkv-server process in its own temporary directory.

    ``listener``, if given, is a listening socket handed to the server as
    systemd socket activation would (fd 3, LISTEN_FDS=1, LISTEN_PID).
    """

    def __init__(self, tmp, *args, listener=None, data_dir=None):
        self.dir = Path(tmp)
        self.socket_path = str(self.dir / "nkv.sock")
        self.data_dir = data_dir or str(self.dir / "data")
        self.log_path = self.dir / "server.log"
        self.notifications = []
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = str(self.dir / "notify.sock")
        if os.path.exists(notify_path):  # left by an earlier server in this directory
            os.unlink(notify_path)
        self.notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, RUST_LOG="debug")
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(name, None)
        for name in list(env):
            if name.startswith("NKV_"):
                env.pop(name)
        command = [SERVER_BIN, "--socket", self.socket_path, "--data-dir", self.data_dir, *args]
        pass_fds = ()
        if listener is not None:
            # The server must see the listener as fd 3 and LISTEN_PID as its
            # own pid, which is known only after fork: exec through a
            # one-line Python that moves the fd and sets the variables.
            shim = (
                "import os, sys\n"
                "fd = int(sys.argv[1])\n"
                "if fd != 3:\n"
                "    os.dup2(fd, 3)\n"
                "    os.close(fd)\n"
                "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
                "os.execv(sys.argv[2], sys.argv[2:])\n"
            )
            command = [sys.executable, "-c", shim, str(listener.fileno()), *command]
            pass_fds = (listener.fileno(),)
        self.command = command
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=pass_fds
        )

    def output(self):
        # The server writes straight to the file's descriptor; read the file.
        return self.log_path.read_text(errors="replace")

    def describe(self):
        return "server %s\n--- output ---\n%s" % (" ".join(self.command), self.output())

    def _collect_notifications(self, timeout):
        self.notify.settimeout(timeout)
        try:
            while True:
                self.notifications.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0)
        except (BlockingIOError, socket.timeout):
            pass

    def wait_notification(self, line):
        """Wait until the server has sent a notification with ``line``; return whether it did."""
        deadline = time.monotonic() + DEADLINE
        while not any(line in n.splitlines() for n in self.notifications):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._collect_notifications(left)
        return True

    def wait_ready(self):
        """Wait until the socket accepts a connection, or fail."""
        deadline = time.monotonic() + DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("server exited with %s before accepting\n%s" % (self.proc.returncode, self.describe()))
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            finally:
                probe.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("server did not accept connections within %ss\n%s" % (DEADLINE, self.describe()))
            # Wait for the server's READY=1 (or any notification), at most a
            # short while, then probe again.
            self._collect_notifications(min(0.05, left))

    def stop(self):
        """SIGTERM the server and return its exit code (None if it was already reaped)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not exit within %ss of SIGTERM\n%s" % (DEADLINE, self.describe()))
        self._collect_notifications(0)
        self.notify.close()
        self.log.close()
        return code

    def client(self):
        return nkv.Client(self.socket_path, timeout=DEADLINE)


class ServerTestCase(unittest.TestCase):
    server_args = ()

    def setUp(self):
        if not os.access(SERVER_BIN, os.X_OK):
            self.fail("server binary %s not found: run `cargo build` or set NKV_SERVER_BIN" % SERVER_BIN)
        tmp = tempfile.TemporaryDirectory(prefix="nkv-py-")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        self.server = self.start_server()
        self.db = self.server.client()
        self.addCleanup(self.db.close)

    def start_server(self, *args, **kwargs):
        server = Server(self.tmp, *self.server_args, *args, **kwargs)
        self.addCleanup(self.stop_server, server)
        server.wait_ready()
        return server

    def stop_server(self, server):
        if getattr(server, "stopped", False):
            return
        server.stopped = True
        code = server.stop()
        self.assertEqual(code, 0, "server exit code after SIGTERM\n" + server.describe())

    def epoch(self):
        """The server's history epoch, as every ``ready`` carries it (its data directory's .epoch)."""
        return Path(self.server.data_dir, ".epoch").read_text().strip()

    def next_event(self, events):
        """The next event, or fail; the subscription's socket timeout bounds the wait."""
        try:
            return next(events)
        except StopIteration:
            self.fail("subscription ended early\n" + self.server.describe())


class DataTest(ServerTestCase):
    def test_put_get_json_values(self):
        values = {
            "t.dict": {"x": 1, "nested": {"list": [1, 2.5, None, True]}},
            "t.list": [1, "two", {"three": 3}],
            "t.int": 42,
            "t.float": 2.5,
            "t.str": "hello world",
            "t.true": True,
            "t.null": None,
            "t.numeric_str": "42",
            "t.json_str": '{"a":1}',
        }
        for key, value in values.items():
            self.assertIsInstance(self.db.put(key, value), int)
        for key, value in values.items():
            got = self.db.get(key)
            self.assertEqual(got, value, key)
            self.assertIs(type(got), type(value), key)

    def test_revisions_increase(self):
        revs = [self.db.put("r.k", i) for i in range(5)]
        self.assertEqual(revs, sorted(set(revs)))
        self.assertGreater(self.db.delete("r.k"), revs[-1])

    def test_values_with_newlines_and_odd_text(self):
        values = [
            "line1\nline2\n",
            "crlf\r\nline",
            "\n",
            "",
            "  leading and trailing spaces  ",
            "tab\there",
            "unicode: zürich ✓ 日本 \U0001f600",
            "back\\slash and \"quotes\"",
            {"text": "a\nb", "nested": ["c\nd"]},
        ]
        for i, value in enumerate(values):
            self.db.put("nl.k%d" % i, value)
        for i, value in enumerate(values):
            self.assertEqual(self.db.get("nl.k%d" % i), value)
        self.assertEqual(self.db.get_prefix("nl"), {"nl.k%d" % i: v for i, v in enumerate(values)})

    def test_large_value_round_trip(self):
        # 2 MiB arrives in many partial reads; readline must join them.
        value = "x" * (2 * 1024 * 1024) + "\nend"
        self.db.put("big.v", value)
        self.assertEqual(self.db.get("big.v"), value)

    def test_get_missing(self):
        with self.assertRaises(nkv.NotFound) as caught:
            self.db.get("no.such.key")
        self.assertIsInstance(caught.exception, nkv.NkvError)
        self.assertEqual(caught.exception.code, "not_found")
        self.assertTrue(caught.exception.message)
        self.assertIsNone(self.db.get("no.such.key", default=None))
        self.assertEqual(self.db.get("no.such.key", default="fallback"), "fallback")
        self.db.put("present", 1)
        self.assertEqual(self.db.get("present", default="fallback"), 1)

    def test_get_prefix(self):
        for key in ("a", "a.b", "a.b.c", "a.c", "ab.c", "b"):
            self.db.put(key, key.upper())
        below_a = {"a.b": "A.B", "a.b.c": "A.B.C", "a.c": "A.C"}
        self.assertEqual(self.db.get_prefix("a.*"), below_a)
        self.assertEqual(self.db.get_prefix("a"), below_a)
        self.assertEqual(list(self.db.get_prefix("a.*")), sorted(below_a))
        self.assertEqual(len(self.db.get_prefix("*")), 6)
        self.assertEqual(self.db.get_prefix("zzz"), {})

    def test_keys(self):
        self.assertEqual(self.db.keys(), [])
        for key in ("b.x", "a.b", "a", "a.a.z", "ab"):
            self.db.put(key, 0)
        self.assertEqual(self.db.keys(), ["a", "a.a.z", "a.b", "ab", "b.x"])
        self.assertEqual(self.db.keys("a.*"), ["a.a.z", "a.b"])
        self.assertEqual(self.db.keys("*"), ["a", "a.a.z", "a.b", "ab", "b.x"])

    def test_delete(self):
        put_rev = self.db.put("d.k", "v")
        del_rev = self.db.delete("d.k")
        self.assertGreater(del_rev, put_rev)
        with self.assertRaises(nkv.NotFound):
            self.db.get("d.k")
        with self.assertRaises(nkv.NotFound) as caught:
            self.db.delete("d.k")
        self.assertEqual(caught.exception.code, "not_found")

    def test_delete_prefix(self):
        for key in ("p", "p.a", "p.b.c", "pq.a"):
            self.db.put(key, 1)
        self.assertEqual(self.db.delete_prefix("p"), 2)
        self.assertEqual(self.db.keys(), ["p", "pq.a"])
        self.assertEqual(self.db.delete_prefix("p.*"), 0)
        self.assertEqual(self.db.delete_prefix("*"), 2)
        self.assertEqual(self.db.keys(), [])

    def test_health_version_stats(self):
        self.assertEqual(self.db.health(), "ok")
        self.assertIsInstance(self.db.version(), str)
        self.assertTrue(self.db.version())
        self.db.put("s.k", 1)
        stats = self.db.stats()
        for field in ("connections", "subscribers", "keys", "rev", "events", "coalesced"):
            self.assertIsInstance(stats.get(field), int, field)
        self.assertEqual(stats["keys"], 1)
        self.assertGreaterEqual(stats["connections"], 1)

    def test_request_id_is_echoed(self):
        response = self.db.request("health")
        self.assertEqual(response.get("ok"), True)
        self.assertIsInstance(response.get("id"), int)
        with self.assertRaises(nkv.NkvError):
            self.db.request("put", key="a..b", value=1)

    def test_persists_across_restart(self):
        rev = self.db.put("keep.me", {"v": [1, "two"]})
        self.db.close()
        data_dir = self.server.data_dir
        self.stop_server(self.server)
        server = self.start_server(data_dir=data_dir)
        with server.client() as db:
            self.assertEqual(db.get("keep.me"), {"v": [1, "two"]})
            self.assertGreater(db.put("keep.other", 1), rev)


class ErrorTest(ServerTestCase):
    server_args = ("--max-value-bytes", "1024")

    def assertCode(self, code, func, *args, **kwargs):
        with self.assertRaises(nkv.NkvError) as caught:
            func(*args, **kwargs)
        self.assertEqual(caught.exception.code, code, caught.exception)
        self.assertTrue(caught.exception.message)
        return caught.exception

    def test_invalid_keys(self):
        for key in ("a..b", ".a", "a.", "a/b", "../x", "a b", "a.*.b", "*a", "x" * 201):
            self.assertCode("invalid_key", self.db.put, key, 1)
        self.assertCode("invalid_key", self.db.get, "a..b")
        self.assertCode("invalid_key", self.db.delete, "a/b")
        self.assertCode("invalid_key", self.db.keys, "a*")
        # A pattern only where the request takes one.
        self.assertCode("invalid_key", self.db.put, "a.*", 1)
        # The connection stays usable after errors.
        self.assertEqual(self.db.health(), "ok")
        self.assertEqual(self.db.keys(), [])

    def test_valid_key_characters(self):
        for key in ("service.topicA.key1", "dev:1.temp@room#2", "a_b-c+d", "x" * 200):
            self.db.put(key, 1)
            self.assertEqual(self.db.get(key), 1)

    def test_too_large_value(self):
        self.assertCode("too_large", self.db.put, "big", "x" * 2048)
        self.assertEqual(self.db.get("big", default=None), None)
        self.db.put("small", "x" * 100)
        self.assertEqual(self.db.get("small"), "x" * 100)

    def test_bad_request(self):
        self.assertCode("bad_request", self.db.request, "frobnicate")
        self.assertCode("bad_request", self.db.request, "get", key="a", extra=1)
        self.assertCode("bad_request", self.db.request, "get", key=5)
        self.assertEqual(self.db.health(), "ok")

    def test_subscribe_invalid_key_raises_at_once(self):
        err = self.assertCode("invalid_key", self.db.subscribe, "a..b")
        self.assertNotIsInstance(err, nkv.NotFound)

    def test_nan_is_refused_before_sending(self):
        with self.assertRaises(ValueError):
            self.db.put("f", float("nan"))
        self.assertEqual(self.db.health(), "ok")


class ConnectionLimitTest(ServerTestCase):
    server_args = ("--max-connections", "2")

    def test_too_many_connections_raises_in_constructor(self):
        clients = [self.db]
        try:
            with self.assertRaises(nkv.NkvError) as caught:
                for _ in range(3):
                    clients.append(self.server.client())
            self.assertEqual(caught.exception.code, "too_many_connections")
            self.assertLessEqual(len(clients), 2)
        finally:
            for client in clients[1:]:
                client.close()
        self.assertEqual(self.db.health(), "ok")


class LifetimeTest(ServerTestCase):
    def test_named_client(self):
        with nkv.Client(self.server.socket_path, timeout=DEADLINE, name="py-named") as db:
            self.assertEqual(db.health(), "ok")
        with self.assertRaises(nkv.NkvError) as caught:
            nkv.Client(self.server.socket_path, timeout=DEADLINE, name="bad name with spaces")
        self.assertEqual(caught.exception.code, "bad_request")

    def test_close_and_context_manager(self):
        with self.server.client() as db:
            db.put("c.k", 1)
        with self.assertRaises(nkv.NkvError) as caught:
            db.get("c.k")
        self.assertEqual(caught.exception.code, "closed")
        db.close()  # closing twice is fine
        self.assertEqual(self.db.get("c.k"), 1)

    def test_connect_to_missing_socket(self):
        with self.assertRaises(nkv.NkvError) as caught:
            nkv.Client(os.path.join(self.tmp, "absent.sock"))
        self.assertEqual(caught.exception.code, "closed")

    def test_connect_errors_are_nkv_errors(self):
        # A path too long for a socket address is an OSError, not a missing file.
        with self.assertRaises(nkv.NkvError) as caught:
            nkv.Client(os.path.join(self.tmp, "x" * 200, "nkv.sock"))
        self.assertEqual(caught.exception.code, "closed")
        # Permission denied, as a user who may not enter the socket's directory.
        server = self.server
        probe = (
            "import nkv, sys\n"
            "try:\n"
            "    nkv.Client(sys.argv[1])\n"
            "except nkv.NkvError as e:\n"
            "    print(e.code, e.message)\n"
        )
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", probe, server.socket_path],
            cwd=os.path.dirname(os.path.abspath(nkv.__file__)),
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(nkv.__file__))},
            capture_output=True, text=True, timeout=DEADLINE,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("closed", out.stdout)
        self.assertIn("Permission denied", out.stdout)

    def test_sd_notify_ready_and_stopping(self):
        # wait_ready() returns once the socket accepts; READY=1 must have been
        # sent by then or come right after.
        self.assertTrue(
            self.server.wait_notification("READY=1"),
            "no READY=1 in %r\n%s" % (self.server.notifications, self.server.describe()),
        )
        self.db.close()
        self.stop_server(self.server)
        self.assertTrue(
            any("STOPPING=1" in n.splitlines() for n in self.server.notifications),
            "no STOPPING=1 in %r\n%s" % (self.server.notifications, self.server.describe()),
        )

    def test_socket_removed_on_sigterm(self):
        self.db.close()
        self.stop_server(self.server)
        self.assertFalse(os.path.exists(self.server.socket_path))


class SocketActivationTest(unittest.TestCase):
    def test_inherited_listener(self):
        if not os.access(SERVER_BIN, os.X_OK):
            self.fail("server binary %s not found: run `cargo build` or set NKV_SERVER_BIN" % SERVER_BIN)
        with tempfile.TemporaryDirectory(prefix="nkv-py-") as tmp:
            path = os.path.join(tmp, "nkv.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(16)
            inode = os.stat(path).st_ino
            server = Server(tmp, listener=listener)
            try:
                # Connections succeed at once (the listener is already there);
                # the first request is answered once the server runs.
                with nkv.Client(path, timeout=DEADLINE) as db:
                    db.put("act.k", "v")
                    self.assertEqual(db.get("act.k"), "v")
                self.assertEqual(os.stat(path).st_ino, inode, "the server re-created the socket")
            finally:
                code = server.stop()
            self.assertEqual(code, 0, "server exit code after SIGTERM\n" + server.describe())
            self.assertTrue(os.path.exists(path), "the server unlinked the inherited socket\n" + server.describe())
            self.assertEqual(os.stat(path).st_ino, inode)
            listener.close()


class SubscribeTest(ServerTestCase):
    def test_snapshot_ready_and_live_events(self):
        rev_b = self.db.put("a.b", {"x": 1})
        rev_c = self.db.put("a.c", "on")
        self.db.put("ab.c", "not covered")
        with self.db.subscribe("a") as events:
            self.assertIsInstance(events, nkv.Subscription)
            init = [self.next_event(events), self.next_event(events)]
            self.assertEqual(
                sorted(init, key=lambda e: e["key"]),
                [
                    {"event": "init", "key": "a.b", "value": {"x": 1}, "rev": rev_b},
                    {"event": "init", "key": "a.c", "value": "on", "rev": rev_c},
                ],
            )
            self.assertEqual(self.next_event(events), {"event": "ready", "sub": "a", "count": 2, "rev": 3, "epoch": self.epoch()})

            self.db.put("ab.d", "not covered either")
            rev = self.db.put("a.b", {"x": 2, "text": "multi\nline"})
            self.assertEqual(
                self.next_event(events), {"event": "put", "key": "a.b", "value": {"x": 2, "text": "multi\nline"}, "rev": rev}
            )
            rev = self.db.put("a", "the prefix key itself")
            self.assertEqual(self.next_event(events), {"event": "put", "key": "a", "value": "the prefix key itself", "rev": rev})
            rev = self.db.delete("a.c")
            self.assertEqual(self.next_event(events), {"event": "del", "key": "a.c", "rev": rev})

    def test_empty_snapshot_and_patterns(self):
        with self.db.subscribe("x.*") as events:
            self.assertEqual(self.next_event(events), {"event": "ready", "sub": "x.*", "count": 0, "rev": 0, "epoch": self.epoch()})
            self.db.put("x", "not below x")
            rev = self.db.put("x.y", 1)
            self.assertEqual(self.next_event(events), {"event": "put", "key": "x.y", "value": 1, "rev": rev})
        with self.db.subscribe("*") as events:
            ready = [self.next_event(events) for _ in range(3)]
            self.assertEqual(ready[-1], {"event": "ready", "sub": "*", "count": 2, "rev": 2, "epoch": self.epoch()})

    def test_pattern_delete_sends_one_event_per_key(self):
        self.db.put("p.a", 1)
        self.db.put("p.b", 2)
        with self.db.subscribe("p") as events:
            for _ in range(3):
                self.next_event(events)
            self.assertEqual(self.db.delete_prefix("p"), 2)
            deleted = [self.next_event(events), self.next_event(events)]
            self.assertEqual(sorted(e["key"] for e in deleted), ["p.a", "p.b"])
            self.assertTrue(all(e["event"] == "del" and isinstance(e["rev"], int) for e in deleted), deleted)

    def test_named_subscriber_shows_in_trace(self):
        with self.db.subscribe("t", name="py-test") as events:
            self.assertEqual(self.next_event(events)["event"], "ready")
            trace = self.db.request("trace", key="t.k")
            names = [s.get("name") for s in trace["subscribers"]]
            self.assertIn("py-test", names)
            self.assertEqual(self.db.stats()["subscribers"], 1)

    def test_shutdown_event_ends_the_generator(self):
        events = self.db.subscribe("s")
        self.assertEqual(self.next_event(events), {"event": "ready", "sub": "s", "count": 0, "rev": 0, "epoch": self.epoch()})
        self.db.close()
        self.stop_server(self.server)
        self.assertEqual(next(events), {"event": "shutdown"})
        with self.assertRaises(StopIteration):
            next(events)

    def test_close_before_first_event(self):
        events = self.db.subscribe("c")
        events.close()
        with self.assertRaises(StopIteration):
            next(events)
        # The server notices the closed connection; the store stays usable.
        self.assertEqual(self.db.health(), "ok")

    def test_generator_protocol(self):
        import collections.abc

        events = self.db.subscribe("g")
        self.assertIsInstance(events, collections.abc.Generator)
        self.assertEqual(events.send(None)["event"], "ready")
        with self.assertRaises(KeyError):
            events.throw(KeyError("stop"))
        with self.assertRaises(StopIteration):
            next(events)

    def test_separate_subscribers_are_independent(self):
        first = self.db.subscribe("i")
        second = self.db.subscribe("i")
        try:
            self.next_event(first)
            self.next_event(second)
            first.close()
            rev = self.db.put("i.k", json.loads('{"n": 1}'))
            self.assertEqual(self.next_event(second), {"event": "put", "key": "i.k", "value": {"n": 1}, "rev": rev})
        finally:
            second.close()


class CompareAndSetTest(ServerTestCase):
    def test_put_and_delete_if_rev(self):
        rev = self.db.put("lock", "a", if_rev=0)
        with self.assertRaises(nkv.Conflict) as caught:
            self.db.put("lock", "b", if_rev=0)
        self.assertEqual((caught.exception.code, caught.exception.rev), ("conflict", rev))
        self.assertEqual(self.db.get("lock"), "a")
        rev2 = self.db.put("lock", "b", if_rev=rev)
        with self.assertRaises(nkv.Conflict):
            self.db.delete("lock", if_rev=rev)
        self.assertGreater(self.db.delete("lock", if_rev=rev2), rev2)
        with self.assertRaises(nkv.Conflict) as caught:
            self.db.put("lock", "c", if_rev=rev2)
        self.assertEqual(caught.exception.rev, 0)


class SessionTest(ServerTestCase):
    def test_session_key_goes_with_its_client(self):
        owner = self.server.client()
        with self.db.subscribe("svc") as events:
            self.assertEqual(self.next_event(events)["event"], "ready")
            owner.put("svc.me", {"pid": 1}, session=True)
            self.assertEqual(self.next_event(events)["event"], "put")
            self.assertEqual(self.db.get_entry("svc.me")[2], "memory")
            owner.close()
            event = self.next_event(events)
            self.assertEqual((event["event"], event["key"]), ("del", "svc.me"))
        self.assertIsNone(self.db.get("svc.me", default=None))


class WatchTest(ServerTestCase):
    def test_watch_resumes_across_a_restart_and_reports_reset(self):
        self.db.put("w.a", 1)
        self.db.put("w.b", 1)
        watch = self.db.watch("w", reconnect_wait=DEADLINE)
        self.addCleanup(watch.close)
        view = {}

        def apply(event):
            if event["event"] in ("init", "put"):
                view[event["key"]] = event["value"]
            elif event["event"] == "del":
                view.pop(event["key"], None)
            elif event["event"] == "reset":
                view.clear()

        def until_ready():
            while True:
                event = self.next_event(watch)
                apply(event)
                if event["event"] == "ready":
                    return event

        until_ready()
        self.assertEqual(view, {"w.a": 1, "w.b": 1})
        self.db.put("w.a", 2)
        apply(self.next_event(watch))
        # A clean restart keeps the delete history: the watch resumes, no reset.
        self.db.close()
        self.stop_server(self.server)
        offline = Server(self.tmp)
        offline.wait_ready()
        with offline.client() as db:
            db.delete("w.b")
            db.put("w.c", 3)
        self.assertEqual(offline.stop(), 0)
        self.server = self.start_server()
        until_ready()
        self.assertEqual(watch.resets, 0)
        self.assertEqual(view, {"w.a": 2, "w.c": 3})
        # A crash keeps the history of persistent keys (the delete log), even
        # after a memory key, which the crash loses, moved the revisions on:
        # the watch resumes without a reset, in the same history, and
        # converges. (A replaced history gets a reset: the next test.)
        with self.server.client() as db:
            db.put("runtime.x", 1)
        self.server.proc.kill()
        self.server.proc.wait()
        self.server.stopped = True
        self.server.notify.close()
        self.server.log.close()
        self.server = self.start_server()
        self.server.client().put("w.d", 4)
        epoch = watch.epoch
        ready = until_ready()
        self.assertEqual(watch.resets, 0)
        self.assertEqual(watch.epoch, epoch)
        while view.get("w.d") != 4:
            apply(self.next_event(watch))
        self.assertEqual(view, {"w.a": 2, "w.c": 3, "w.d": 4})
        self.assertGreaterEqual(watch.rev, ready["rev"])

    def test_watch_keeps_reconnecting_when_a_server_goes_while_it_subscribes(self):
        # Found by the issue-12 adversary: a server that closed the connection
        # during the watch's SUB (killed as it started) ended the watch with
        # NkvError('closed') instead of one more retry.
        self.db.put("w.a", 1)
        watch = self.db.watch("w", reconnect_wait=DEADLINE)
        self.addCleanup(watch.close)
        while self.next_event(watch)["event"] != "ready":
            pass
        self.db.close()
        self.server.proc.kill()
        self.server.proc.wait()
        self.server.stopped = True
        self.server.notify.close()
        self.server.log.close()
        # A "server" that takes the watch's request and closes, as one dying would.
        os.unlink(self.server.socket_path)
        dying = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dying.bind(self.server.socket_path)
        dying.listen(4)
        events = queue.Queue()

        def consume():
            try:
                while True:
                    events.put(next(watch))
            except BaseException as exc:  # handed to the test thread
                events.put(exc)

        threading.Thread(target=consume, daemon=True).start()
        dying.settimeout(DEADLINE)
        conn, _ = dying.accept()
        conn.settimeout(DEADLINE)
        request = b""
        while not request.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            request += chunk
        self.assertIn(b'"op": "sub"', request.replace(b'":"', b'": "'))
        conn.close()
        dying.close()
        os.unlink(self.server.socket_path)
        self.server = self.start_server()
        with self.server.client() as db:
            db.put("w.b", 2)
        deadline = time.monotonic() + DEADLINE
        while True:
            event = events.get(timeout=max(deadline - time.monotonic(), 0.01))
            if isinstance(event, BaseException):
                self.fail("the watch ended: %r" % event)
            if event.get("key") == "w.b":
                self.assertEqual(event["value"], 2)
                break

    def test_watch_resets_when_the_data_directory_is_replaced_at_the_same_revision(self):
        self.db.put("w.a", 1)
        self.db.put("w.b", 1)
        watch = self.db.watch("w", reconnect_wait=DEADLINE)
        self.addCleanup(watch.close)
        view = {}
        while True:
            event = self.next_event(watch)
            if event["event"] == "init":
                view[event["key"]] = event["value"]
            if event["event"] == "ready":
                break
        rev, epoch = watch.rev, watch.epoch
        self.assertEqual((rev, epoch), (2, self.epoch()))
        # Another history on the same socket: the data directory wiped, and the new
        # server's revisions reach the watch's (which reads nothing meanwhile).
        self.db.close()
        self.stop_server(self.server)
        shutil.rmtree(self.server.data_dir)
        self.server = self.start_server()
        with self.server.client() as db:
            db.put("w.c", 3)
            db.put("other", 1)
        seen = []
        while True:
            event = self.next_event(watch)
            seen.append(event["event"])
            if event["event"] == "reset":
                view.clear()
            elif event["event"] in ("init", "put"):
                view[event["key"]] = event["value"]
            elif event["event"] == "del":
                view.pop(event["key"], None)
            if event["event"] == "ready":
                break
        self.assertEqual(seen, ["reset", "init", "ready"])
        self.assertEqual(view, {"w.c": 3}, "no stale key")
        self.assertEqual(watch.resets, 1)
        self.assertEqual(watch.rev, rev)
        self.assertNotEqual(watch.epoch, epoch)
        self.assertEqual(watch.epoch, self.epoch())
        # A watch resumed from a kept point in the old history gets a reset too; in
        # the new one it resumes.
        with self.server.client().watch("w", from_rev=rev, epoch=epoch) as old:
            self.assertEqual(self.next_event(old)["event"], "reset")
        with self.server.client().watch("w", from_rev=rev, epoch=watch.epoch) as same:
            self.assertEqual(self.next_event(same), {"event": "ready", "sub": "w", "count": 0, "rev": rev, "epoch": self.epoch()})


if __name__ == "__main__":
    unittest.main()
