// Package nkv is a client for the nkv notify key-value store, speaking its line protocol
// (docs/PROTOCOL.md) over the server's Unix socket. It uses only the standard library.
//
// A Client holds one connection for requests (Get, Put, Delete, Keys, ...), used by one request
// at a time and redialled once if it broke. Subscribe opens a connection of its own per
// subscription and delivers typed events on a channel, reconnecting and resuming when the
// connection or the server goes away.
//
// PutIf and DeleteIf are compare-and-set (errors.Is(err, ErrConflict) when the key was at
// another revision; the *Error's Rev is the current one). PutSession stores a key owned by
// the Client's connection: the server deletes it when that connection closes.
package nkv

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// DefaultSocket is where the server listens unless told otherwise.
const DefaultSocket = "/tmp/nkv/nkv.sock"

// maxLine bounds one event line (the server's default value limit plus room).
const maxLine = 16<<20 + 64<<10

// maxReply bounds one response line: a pattern GET carries every value it matches, each up to
// the value limit, so its reply is bounded by the store, not by one value.
const maxReply = 1 << 30

// Error is an error response from the server: its machine-readable code and its message.
type Error struct {
	Code    string
	Message string
	// Rev is the key's current revision on a conflict (0 if it does not exist).
	Rev uint64
}

func (e *Error) Error() string { return fmt.Sprintf("nkv: %s: %s", e.Code, e.Message) }

// Is makes errors.Is(err, ErrNotFound) and friends work on server errors.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Code == e.Code
}

// Sentinels for errors.Is.
var (
	ErrNotFound   = &Error{Code: "not_found"}
	ErrInvalidKey = &Error{Code: "invalid_key"}
	ErrTooLarge   = &Error{Code: "too_large"}
	ErrBadRequest = &Error{Code: "bad_request"}
	ErrConflict   = &Error{Code: "conflict"}
)

// ErrClosed is returned by a Client used after Close.
var ErrClosed = errors.New("nkv: client is closed")

// Entry is one key's value and the revision of its last change.
type Entry struct {
	Key   string
	Value json.RawMessage
	Rev   uint64
}

// Option configures Connect.
type Option func(*options)

type options struct {
	timeout time.Duration
	name    string
}

// WithTimeout bounds each request (dial, write, read); zero means no bound.
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithName names the client's connections (HELLO), as TRACE and the server log show them.
func WithName(name string) Option { return func(o *options) { o.name = name } }

// Client is a connection to the server for requests. Safe for concurrent use; requests run
// one at a time.
type Client struct {
	path string
	opts options

	mu     sync.Mutex // guards conn and closed
	conn   *conn
	closed bool
}

// Connect dials the server at path (DefaultSocket if empty) and checks it answers.
func Connect(path string, opts ...Option) (*Client, error) {
	if path == "" {
		path = DefaultSocket
	}
	c := &Client{path: path}
	for _, o := range opts {
		o(&c.opts)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	cn, err := c.dial()
	if err != nil {
		return nil, err
	}
	c.conn = cn
	return c, nil
}

func (c *Client) dial() (*conn, error) {
	cn, err := dial(c.path, c.opts.timeout)
	if err != nil {
		return nil, err
	}
	if c.opts.name != "" {
		if _, err := cn.exchange(request{Op: "hello", Name: c.opts.name}, c.opts.timeout); err != nil {
			cn.close()
			return nil, err
		}
	}
	return cn, nil
}

// Close closes the connection; the client cannot be used afterwards.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.conn != nil {
		err := c.conn.close()
		c.conn = nil
		return err
	}
	return nil
}

// do sends one request and returns its successful response. A broken connection is redialled
// once, but only before anything was sent on it: a request is never sent twice.
func (c *Client) do(req request) (*response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if c.conn == nil {
		cn, err := c.dial()
		if err != nil {
			return nil, err
		}
		c.conn = cn
	}
	resp, err := c.conn.exchange(req, c.opts.timeout)
	var unsent *sendError
	if errors.As(err, &unsent) {
		// Nothing reached the server (it restarted, say): dial once more and send again.
		c.conn.close()
		c.conn = nil
		cn, dialErr := c.dial()
		if dialErr != nil {
			return nil, dialErr
		}
		c.conn = cn
		resp, err = c.conn.exchange(req, c.opts.timeout)
	}
	var serverErr *Error
	if err != nil && !errors.As(err, &serverErr) {
		// The connection is unusable; the next request dials again.
		c.conn.close()
		c.conn = nil
	}
	return resp, err
}

// Get returns key's value; errors.Is(err, ErrNotFound) when there is no such key.
func (c *Client) Get(key string) (Entry, error) {
	resp, err := c.do(request{Op: "get", Key: key})
	if err != nil {
		return Entry{}, err
	}
	return Entry{Key: resp.Key, Value: resp.Value, Rev: resp.Rev}, nil
}

// GetPrefix returns every key the pattern matches ("a.*" for the keys below a, "*" for all).
func (c *Client) GetPrefix(pattern string) (map[string]json.RawMessage, error) {
	resp, err := c.do(request{Op: "get", Key: pattern})
	if err != nil {
		return nil, err
	}
	if resp.Values == nil {
		return map[string]json.RawMessage{}, nil
	}
	return resp.Values, nil
}

// Put stores value (encoded with encoding/json) under key; returns the change's revision.
func (c *Client) Put(key string, value interface{}) (uint64, error) {
	raw, err := json.Marshal(value)
	if err != nil {
		return 0, fmt.Errorf("nkv: put %s: encoding the value: %w", key, err)
	}
	return c.PutRaw(key, raw)
}

// PutRaw stores JSON text as it is; the server refuses text that is not JSON.
func (c *Client) PutRaw(key string, value json.RawMessage) (uint64, error) {
	resp, err := c.do(request{Op: "put", Key: key, Value: value})
	if err != nil {
		return 0, err
	}
	return resp.Rev, nil
}

// PutIf stores value only if key is at revision rev (0: only if it does not exist); returns
// the new revision, or an error that errors.Is ErrConflict (its Rev is the key's revision).
func (c *Client) PutIf(key string, value interface{}, rev uint64) (uint64, error) {
	raw, err := json.Marshal(value)
	if err != nil {
		return 0, fmt.Errorf("nkv: put %s: encoding the value: %w", key, err)
	}
	resp, err := c.do(request{Op: "put", Key: key, Value: raw, IfRev: &rev})
	if err != nil {
		return 0, err
	}
	return resp.Rev, nil
}

// PutSession stores value as a session key of this Client's connection: kept in memory only,
// deleted (subscribers get a Del) when the connection closes — Close, a crash, a lost socket.
// If the connection breaks and is redialled, earlier session keys are already gone: put them
// again.
func (c *Client) PutSession(key string, value interface{}) (uint64, error) {
	raw, err := json.Marshal(value)
	if err != nil {
		return 0, fmt.Errorf("nkv: put %s: encoding the value: %w", key, err)
	}
	resp, err := c.do(request{Op: "put", Key: key, Value: raw, Session: true})
	if err != nil {
		return 0, err
	}
	return resp.Rev, nil
}

// DeleteIf deletes key only at revision rev; ErrConflict otherwise.
func (c *Client) DeleteIf(key string, rev uint64) (uint64, error) {
	resp, err := c.do(request{Op: "del", Key: key, IfRev: &rev})
	if err != nil {
		return 0, err
	}
	return resp.Rev, nil
}

// Delete deletes key; returns the delete's revision (ErrNotFound when there was no key).
func (c *Client) Delete(key string) (uint64, error) {
	resp, err := c.do(request{Op: "del", Key: key})
	if err != nil {
		return 0, err
	}
	return resp.Rev, nil
}

// DeletePrefix deletes every key the pattern matches; returns how many.
func (c *Client) DeletePrefix(pattern string) (int, error) {
	resp, err := c.do(request{Op: "del", Key: pattern})
	if err != nil {
		return 0, err
	}
	return resp.Deleted, nil
}

// Keys lists keys, sorted: all of them for "", else those target covers ("a" is a and
// everything below it, "a.*" only what is below).
func (c *Client) Keys(target string) ([]string, error) {
	resp, err := c.do(request{Op: "keys", Key: target})
	if err != nil {
		return nil, err
	}
	if resp.Keys == nil {
		return []string{}, nil
	}
	return resp.Keys, nil
}

// Health checks the server answers.
func (c *Client) Health() error {
	_, err := c.do(request{Op: "health"})
	return err
}

// Version is the server's version.
func (c *Client) Version() (string, error) {
	resp, err := c.do(request{Op: "version"})
	if err != nil {
		return "", err
	}
	return resp.Version, nil
}

// request is a JSON-form request line: it carries any value and key exactly.
type request struct {
	Op    string          `json:"op"`
	Key   string          `json:"key,omitempty"`
	Value json.RawMessage `json:"value,omitempty"`
	Name  string          `json:"name,omitempty"`
	// IfRev is a compare-and-set revision (put, del); FromRev resumes a sub.
	IfRev   *uint64 `json:"if_rev,omitempty"`
	FromRev *uint64 `json:"from_rev,omitempty"`
	// Epoch names the history FromRev belongs to (the epoch of the ready it came from).
	Epoch   string `json:"epoch,omitempty"`
	Session bool   `json:"session,omitempty"`
}

// response is any response line; fields absent from a response stay zero.
type response struct {
	OK      bool                       `json:"ok"`
	Error   string                     `json:"error"`
	Message string                     `json:"message"`
	Rev     uint64                     `json:"rev"`
	Key     string                     `json:"key"`
	Value   json.RawMessage            `json:"value"`
	Values  map[string]json.RawMessage `json:"values"`
	Keys    []string                   `json:"keys"`
	Deleted int                        `json:"deleted"`
	Version string                     `json:"version"`
	Status  string                     `json:"status"`
}

// conn is one socket and its reader.
type conn struct {
	c net.Conn
	r *bufio.Reader
}

func dial(path string, timeout time.Duration) (*conn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.Dial("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nkv: connect to %s: %w", path, err)
	}
	return &conn{c: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
}

func (cn *conn) close() error { return cn.c.Close() }

func (cn *conn) send(req request) error {
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("nkv: encoding the request: %w", err)
	}
	if n, err := cn.c.Write(append(line, '\n')); err != nil {
		if n == 0 {
			return &sendError{op: req.Op, err: err}
		}
		return fmt.Errorf("nkv: sending %s: %w", req.Op, err)
	}
	return nil
}

// sendError is a request that failed before any of it was written.
type sendError struct {
	op  string
	err error
}

func (e *sendError) Error() string { return fmt.Sprintf("nkv: sending %s: %v", e.op, e.err) }
func (e *sendError) Unwrap() error { return e.err }

// readLine reads one line without its "\n", refusing lines over limit bytes.
func (cn *conn) readLine(limit int) ([]byte, error) {
	var line []byte
	for {
		part, isPrefix, err := cn.r.ReadLine()
		if err != nil {
			return nil, err
		}
		line = append(line, part...)
		if len(line) > limit {
			return nil, fmt.Errorf("nkv: a line from the server is over %d bytes", limit)
		}
		if !isPrefix {
			return line, nil
		}
	}
}

func (cn *conn) exchange(req request, timeout time.Duration) (*response, error) {
	if timeout > 0 {
		_ = cn.c.SetDeadline(time.Now().Add(timeout))
		defer func() { _ = cn.c.SetDeadline(time.Time{}) }()
	}
	if err := cn.send(req); err != nil {
		return nil, err
	}
	line, err := cn.readLine(maxReply)
	if err != nil {
		return nil, fmt.Errorf("nkv: reading the %s response: %w", req.Op, err)
	}
	var resp response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("nkv: %s response is not JSON (%v): %q", req.Op, err, line)
	}
	if !resp.OK {
		return nil, &Error{Code: resp.Error, Message: resp.Message, Rev: resp.Rev}
	}
	return &resp, nil
}
