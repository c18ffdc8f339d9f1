"""A small client for nkv, the notify key-value store.

One file, standard library only: copy it next to your program. It speaks the
JSON request form of docs/PROTOCOL.md over the server's Unix socket, one
request line and one response line at a time, on one persistent connection::

    import nkv

    with nkv.Client() as db:                     # /tmp/nkv/nkv.sock
        rev = db.put("app.config.mode", {"fast": True})
        db.get("app.config.mode")                # {'fast': True}
        db.get("app.missing", default=None)      # None instead of NotFound
        db.get_prefix("app.*")                   # {'app.config.mode': {...}}
        db.keys()                                # ['app.config.mode']
        db.delete("app.config.mode")             # revision of the delete

    for event in nkv.Client().subscribe("app.config"):
        print(event)     # {'event': 'init', 'key': ..., 'value': ..., 'rev': ...}

    db.put("app.leader", "me", if_rev=0)         # compare-and-set: Conflict if it exists
    db.put("app.alive.me", {"pid": 1}, session=True)   # deleted when db closes

    for event in nkv.Client().watch("app"):      # reconnects and resumes on its own
        print(event)     # a 'reset' event says a full snapshot follows

Server errors raise NkvError (NotFound for a missing key) carrying the
protocol's error ``code`` and the server's ``message``. A Client may be shared
between threads: a lock keeps each request paired with its response.
"""

import collections.abc
import itertools
import json
import socket
import threading
import time

__all__ = ["Client", "Subscription", "Watch", "NkvError", "NotFound", "Conflict", "DEFAULT_SOCKET"]

DEFAULT_SOCKET = "/tmp/nkv/nkv.sock"

_MISSING = object()


class NkvError(Exception):
    """An error answered by the server, or a broken connection.

    ``code`` is the protocol's error code (``bad_request``, ``invalid_key``,
    ``not_found``, ``too_large``, ``wrong_mode``, ``too_many_connections``,
    ``timeout``, ``internal``) or, for failures on this side, ``closed``
    (the connection is gone) or ``protocol`` (the server's answer made no
    sense). ``message`` says what was wrong, for a person.
    """

    def __init__(self, code, message):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


class NotFound(NkvError):
    """The key does not exist (error code ``not_found``)."""


class Conflict(NkvError):
    """A compare-and-set found another revision (error code ``conflict``).

    ``rev`` is the key's current revision, 0 if it does not exist.
    """

    def __init__(self, code, message, rev=0):
        super().__init__(code, message)
        self.rev = rev


def _error(response):
    code = response.get("error", "protocol")
    message = response.get("message", "the server gave no reason")
    if code == "conflict":
        return Conflict(code, message, response.get("rev", 0))
    cls = NotFound if code == "not_found" else NkvError
    return cls(code, message)


def _encode(request):
    # allow_nan=False: NaN and Infinity are not JSON, and the server would
    # reject the line; fail here with a ValueError that names the cause.
    # json.dumps escapes newlines inside strings, so a request is always one
    # line.
    text = json.dumps(request, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"


def _connect(path, timeout, wait):
    """Connect to the server, retrying for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise NkvError("closed", "cannot connect to %s: %s" % (path, exc.strerror)) from exc
            # A client started together with the server (docker compose, boot)
            # waits for the socket to appear; back off up to 0.5 s.
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)
        except OSError as exc:
            # Permission denied, a path too long for a socket address, a timeout:
            # still a failure to connect, reported as one.
            sock.close()
            reason = exc.strerror or str(exc)
            raise NkvError("closed", "cannot connect to %s: %s" % (path, reason)) from exc


class _Connection:
    """One socket with a buffered reader: write a line, read a line."""

    def __init__(self, path, timeout, wait):
        self.path = path
        self.sock = _connect(path, timeout, wait)
        # A buffered binary file: readline() gathers partial reads into whole
        # lines, and keeps bytes past the newline for the next call.
        self.reader = self.sock.makefile("rb")

    def send(self, request):
        """Send one request (a dict, or a line already encoded by _encode)."""
        line = request if isinstance(request, bytes) else _encode(request)
        try:
            self.sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise NkvError("closed", "the server closed the connection") from exc

    def exchange(self, request):
        """Send one request and return the next line read (its response)."""
        try:
            self.send(request)
        except NkvError as send_error:
            # The server may have said why before closing (e.g.
            # too_many_connections, timeout): report that if it did.
            try:
                return self.receive()
            except NkvError:
                raise send_error from None
        return self.receive()

    def receive(self):
        """Read one response or event line; raise NkvError('closed') at EOF."""
        try:
            line = self.reader.readline()
        except ConnectionResetError as exc:
            raise NkvError("closed", "the server reset the connection") from exc
        if not line:
            raise NkvError("closed", "the server closed the connection")
        if not line.endswith(b"\n"):
            raise NkvError("closed", "the server closed the connection mid-line")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise NkvError("protocol", "the server sent a line that is not JSON: %r" % line[:200]) from exc
        if not isinstance(message, dict):
            raise NkvError("protocol", "the server sent JSON that is not an object: %r" % line[:200])
        return message

    def close(self):
        try:
            self.reader.close()
        finally:
            self.sock.close()


class Client:
    """A connection to an nkv server.

    ``socket_path`` is the server's Unix socket. ``timeout`` (seconds, None =
    wait forever) bounds each socket operation; when it expires the call
    raises ``TimeoutError`` and the connection is closed (a late response
    would otherwise answer the next request). ``wait`` (seconds) keeps
    retrying to connect while the socket does not exist or refuses
    connections, for clients that start together with the server. ``name``
    names the connection (HELLO) in the server's log, TRACE and STATS.

    The constructor makes one round trip (HELLO, or HEALTH without a name):
    it proves the server answers, reports ``too_many_connections`` at once,
    and keeps the server from closing a connection that stays silent after
    connecting for longer than its --idle-timeout.

    Raises NkvError with code ``closed`` if it cannot connect.
    """

    def __init__(self, socket_path=DEFAULT_SOCKET, timeout=None, wait=0.0, name=None):
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn = _Connection(socket_path, timeout, wait)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        try:
            if name is None:
                self.request("health")
            else:
                self.request("hello", name=name)
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------

    def request(self, op, **fields):
        """Send one request and return the server's response as a dict.

        ``fields`` become the request's fields (``key``, ``value``, ``name``);
        the ``id`` is added here. Raises NkvError if the server answers with
        an error. Use it for ops without a method here (``trace``, ``hello``).
        """
        request = {"op": op}
        request.update(fields)
        with self._lock:
            if self._conn is None:
                raise NkvError("closed", "the connection is closed")
            request_id = next(self._ids)
            request["id"] = request_id
            # Encode before sending: a value json cannot encode (NaN, a set)
            # raises here and leaves the connection usable.
            line = _encode(request)
            try:
                response = self._conn.exchange(line)
            except BaseException:
                # A failed or timed-out exchange leaves the stream out of
                # step (a late response would answer the next request): drop
                # the connection.
                self._conn.close()
                self._conn = None
                raise
        if "id" in response and response["id"] != request_id:
            raise NkvError("protocol", "response id %r does not match request id %r" % (response["id"], request_id))
        if response.get("ok") is not True:
            raise _error(response)
        return response

    @staticmethod
    def _field(response, name):
        try:
            return response[name]
        except KeyError:
            raise NkvError("protocol", "the response lacks %r: %r" % (name, response)) from None

    # -- data ---------------------------------------------------------------

    def get(self, key, default=_MISSING):
        """Return the value stored under ``key`` (decoded JSON).

        Raises NotFound if the key does not exist, unless ``default`` is
        given, which is then returned instead.
        """
        try:
            return self._field(self.request("get", key=key), "value")
        except NotFound:
            if default is _MISSING:
                raise
            return default

    def get_prefix(self, pattern):
        """Return ``{key: value}`` for every key matching ``pattern``.

        ``pattern`` is ``"*"`` (every key), ``"a.*"`` (every key strictly
        below ``a``), or a key ``"a"``, which is taken as ``"a.*"``.
        """
        return self._field(self.request("get", key=_pattern(pattern)), "values")

    def put(self, key, value, if_rev=None, session=False):
        """Store ``value`` (anything json.dumps accepts) and return its revision.

        ``if_rev``: store only if the key is at that revision (0: only if it
        does not exist); otherwise raise Conflict (its ``rev`` is the key's).
        ``session=True``: the key belongs to this Client's connection, is kept
        in memory only, and is deleted when the connection closes (close(), a
        crash, a lost socket) — a liveness signal others can watch.
        """
        fields = {"key": key, "value": value}
        if if_rev is not None:
            fields["if_rev"] = if_rev
        if session:
            fields["session"] = True
        return self._field(self.request("put", **fields), "rev")

    def delete(self, key, if_rev=None):
        """Delete ``key`` and return the revision of the delete.

        Raises NotFound if the key does not exist; with ``if_rev``, Conflict
        unless the key is at that revision.
        """
        fields = {"key": key}
        if if_rev is not None:
            fields["if_rev"] = if_rev
        return self._field(self.request("del", **fields), "rev")

    def get_entry(self, key):
        """Return ``(value, rev, storage_class)`` of ``key``; NotFound if absent."""
        response = self.request("get", key=key)
        return self._field(response, "value"), self._field(response, "rev"), response.get("class")

    def delete_prefix(self, pattern):
        """Delete every key matching ``pattern`` (as in get_prefix); return how many."""
        return self._field(self.request("del", key=_pattern(pattern)), "deleted")

    def keys(self, pattern=None):
        """Return the sorted list of keys, all of them or those matching ``pattern``."""
        fields = {} if pattern is None else {"key": pattern}
        return self._field(self.request("keys", **fields), "keys")

    # -- server -------------------------------------------------------------

    def health(self):
        """Return the server's status string, ``"ok"`` when it is healthy."""
        return self._field(self.request("health"), "status")

    def version(self):
        """Return the server's version string."""
        return self._field(self.request("version"), "version")

    def stats(self):
        """Return the server's counters (connections, subscribers, keys, rev, ...)."""
        response = self.request("stats")
        response.pop("ok", None)
        response.pop("id", None)
        return response

    # -- subscriptions ------------------------------------------------------

    def subscribe(self, prefix, name=None, from_rev=None, epoch=None):
        """Subscribe to ``prefix`` on a new connection; return a Subscription, a generator of events.

        ``prefix`` is a key (it and every key below it), ``"a.*"`` (only the
        keys below ``a``) or ``"*"``. ``name``, if given, names the connection
        (HELLO) for the server's TRACE and STATS.

        The generator yields each event dict exactly as the server sends it:
        an ``init`` event per current key, one ``ready`` marker, then live
        ``put`` and ``del`` events. It ends after yielding a ``shutdown``
        event, or when the server closes the connection. ``.close()`` (or a
        ``with`` block) closes the connection. This Client's timeout applies
        to the subscription's socket too: a wait longer than that raises
        ``TimeoutError``.

        ``from_rev`` resumes instead: only what changed after that revision
        (``put`` and ``del`` events) comes before ``ready``, or a ``reset``
        event and the full snapshot when the server's history does not reach
        back. ``epoch`` (with ``from_rev``) names the history the revision
        belongs to: the ``epoch`` of the ``ready`` it came from. A server
        whose data directory was wiped or replaced since then answers with
        ``reset`` however far its revisions have gone; without ``epoch`` a
        resume cannot tell. watch() does this on every reconnect.

        Raises NkvError at once if the server refuses the subscription
        (e.g. code ``invalid_key``).
        """
        return Subscription(_subscribe(self.socket_path, self.timeout, 0.0, prefix, name, from_rev, epoch))

    def watch(self, prefix, name=None, from_rev=None, reconnect_wait=30.0, epoch=None):
        """Like subscribe(), but survives the server: return a Watch.

        When the connection is lost (server restart, socket replaced, a
        shutdown event) the Watch reconnects — retrying for up to
        ``reconnect_wait`` seconds — and resumes from the last revision it
        delivered, in the history (``epoch``) of the last ``ready`` it saw,
        so no change is missed and no deleted key is left stale — even when
        the server's data directory was replaced. To resume a watch kept
        across a restart of your program, pass its ``rev`` as ``from_rev``
        and its ``epoch`` as ``epoch``.
        It yields every event except ``shutdown``; a ``reset`` event means
        the server could not resume and the ``init`` events that follow are
        the whole state (forget the keys they do not restate).
        """
        return Watch(self.socket_path, self.timeout, prefix, name, from_rev, reconnect_wait, epoch)

    # -- lifetime -----------------------------------------------------------

    def close(self):
        """Close the connection; later calls raise NkvError('closed')."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self._conn is None else "open"
        return "<nkv.Client %s %s>" % (self.socket_path, state)


def _subscribe(path, timeout, wait, prefix, name, from_rev, epoch=None):
    """A new connection subscribed to ``prefix`` (acknowledged)."""
    conn = _Connection(path, timeout, wait)
    try:
        if name is not None:
            response = conn.exchange({"op": "hello", "name": name})
            if response.get("ok") is not True:
                raise _error(response)
        request = {"op": "sub", "key": prefix}
        if from_rev is not None:
            request["from_rev"] = from_rev
            if epoch is not None:
                request["epoch"] = epoch
        response = conn.exchange(request)
        if response.get("ok") is not True:
            raise _error(response)
    except BaseException:
        conn.close()
        raise
    return conn


def _pattern(pattern):
    if pattern == "*" or pattern.endswith(".*"):
        return pattern
    return pattern + ".*"


class Subscription(collections.abc.Generator):
    """The events of one subscription connection; what Client.subscribe returns.

    A generator (it implements the generator protocol) that also works as a
    context manager. Unlike a plain generator function, closing it before the
    first event still closes its connection.
    """

    def __init__(self, conn):
        self._conn = conn
        self._done = False

    def send(self, value):
        """Return the next event (``value`` is ignored); StopIteration at the end."""
        if self._done:
            raise StopIteration
        try:
            event = self._conn.receive()
        except NkvError as exc:
            self.close()
            if exc.code == "closed":
                raise StopIteration from None
            raise
        except BaseException:
            self.close()
            raise
        if event.get("event") == "shutdown":
            # Yield the shutdown event itself, then end: the server closes the
            # connection right after it.
            self._finish()
        return event

    def throw(self, typ=None, value=None, traceback=None):
        """Close the connection and raise the given exception (generator protocol)."""
        self.close()
        if value is None:
            value = typ() if isinstance(typ, type) else typ
        if traceback is not None:
            value = value.with_traceback(traceback)
        raise value

    def close(self):
        """Close the subscription's connection; iteration then stops."""
        self._finish()

    def _finish(self):
        if not self._done:
            self._done = True
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class Watch(collections.abc.Generator):
    """A subscription that reconnects and resumes; what Client.watch returns.

    ``rev`` is the revision it would resume from: the last ``ready``'s,
    raised by every later event without ``skipped`` (an event that stands for
    skipped changes may have overtaken older changes of other keys, so it
    does not move the resume point). ``resets`` counts the resumes the server
    answered with a full snapshot. ``epoch`` is the history ``rev`` belongs
    to (the last ``ready``'s ``epoch``; None before one): every resume names
    it, so a server with another history answers with ``reset``.
    """

    def __init__(self, path, timeout, prefix, name, from_rev, reconnect_wait, epoch=None):
        self._path = path
        self._timeout = timeout
        self._prefix = prefix
        self._name = name
        self._wait = reconnect_wait
        self.rev = from_rev
        self.epoch = epoch if from_rev is not None else None
        self.resets = 0
        self._in_snapshot = True
        self._done = False
        self._lost_at = time.monotonic()
        self._conn = _subscribe(path, timeout, 0.0, prefix, name, from_rev, self.epoch)

    def send(self, value):
        """Return the next event (``value`` is ignored); StopIteration once closed."""
        while True:
            if self._done:
                raise StopIteration
            if self._conn is None:
                # A server can go again while the watch subscribes (a restart loop, a
                # server killed as it starts): that is one more lost connection, retried
                # until ``reconnect_wait`` has passed since the connection was lost.
                left = self._lost_at + self._wait - time.monotonic()
                try:
                    self._conn = _subscribe(self._path, self._timeout, max(left, 0.0), self._prefix, self._name, self.rev, self.epoch)
                except (NkvError, ConnectionError) as exc:
                    closed = not isinstance(exc, NkvError) or exc.code == "closed"
                    if closed and time.monotonic() < self._lost_at + self._wait:
                        time.sleep(0.05)
                        continue
                    self.close()
                    if isinstance(exc, NkvError):
                        raise
                    raise NkvError("closed", "the server closed the connection") from exc
                self._in_snapshot = True
            try:
                event = self._conn.receive()
            except (NkvError, ConnectionError) as exc:
                if isinstance(exc, NkvError) and exc.code != "closed":
                    self.close()
                    raise
                self._drop()
                continue
            except BaseException:
                self.close()
                raise
            kind = event.get("event")
            if kind == "shutdown":
                self._drop()
                continue
            if kind == "reset":
                self.resets += 1
            elif kind == "ready":
                self._in_snapshot = False
                self.rev = event.get("rev", self.rev)
                self.epoch = event.get("epoch")
            elif not self._in_snapshot and "skipped" not in event and "rev" in event:
                self.rev = max(self.rev or 0, event["rev"])
            return event

    def _drop(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._lost_at = time.monotonic()

    def throw(self, typ=None, value=None, traceback=None):
        """Close the connection and raise the given exception (generator protocol)."""
        self.close()
        if value is None:
            value = typ() if isinstance(typ, type) else typ
        if traceback is not None:
            value = value.with_traceback(traceback)
        raise value

    def close(self):
        """Close the connection; iteration then stops."""
        self._done = True
        self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
