package nkv

// The tests start the real nkv-server (NKV_SERVER_BIN; a missing one fails, it is never
// skipped) on a socket and data directory of their own, and wait with deadlines, never sleeps.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

const deadline = 20 * time.Second

type server struct {
	t      *testing.T
	dir    string
	socket string
	data   string
	cmd    *exec.Cmd
}

func startServer(t *testing.T) *server {
	t.Helper()
	dir := t.TempDir()
	s := &server{t: t, dir: dir, socket: filepath.Join(dir, "nkv.sock"), data: filepath.Join(dir, "data")}
	s.start()
	t.Cleanup(func() {
		if s.cmd != nil {
			_ = s.cmd.Process.Kill()
			_ = s.cmd.Wait()
		}
	})
	return s
}

func (s *server) start() {
	s.t.Helper()
	bin := os.Getenv("NKV_SERVER_BIN")
	if bin == "" {
		s.t.Fatal("NKV_SERVER_BIN is not set: point it at a built nkv-server")
	}
	if _, err := os.Stat(bin); err != nil {
		s.t.Fatalf("NKV_SERVER_BIN: %v", err)
	}
	log, err := os.OpenFile(filepath.Join(s.dir, "server.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	defer log.Close()
	s.cmd = exec.Command(bin, "--socket", s.socket, "--data-dir", s.data)
	s.cmd.Stderr = log
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("start %s: %v", bin, err)
	}
	waitFor(s.t, "the server to accept", func() bool {
		c, err := Connect(s.socket)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// stop sends SIGTERM and waits for a clean exit.
func (s *server) stop() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		s.t.Fatal(err)
	}
	if err := s.cmd.Wait(); err != nil {
		s.t.Fatalf("server exit: %v", err)
	}
	s.cmd = nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func next(t *testing.T, events <-chan Event) Event {
	t.Helper()
	select {
	case ev, ok := <-events:
		if !ok {
			t.Fatal("subscription channel closed")
		}
		return ev
	case <-time.After(deadline):
		t.Fatal("no event before the deadline")
	}
	return Event{}
}

func connect(t *testing.T, s *server) *Client {
	t.Helper()
	c, err := Connect(s.socket, WithTimeout(deadline), WithName("go-test"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestGetPutDeleteKeys(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	rev, err := c.Put("svc.a.on", map[string]bool{"on": true})
	if err != nil || rev == 0 {
		t.Fatalf("put: %d %v", rev, err)
	}
	if _, err := c.Put("svc.a.name", "text with spaces\nand a newline"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutRaw("svc.b", json.RawMessage(`[1,2]`)); err != nil {
		t.Fatal(err)
	}
	got, err := c.Get("svc.a.on")
	if err != nil || string(got.Value) != `{"on":true}` || got.Rev != rev || got.Key != "svc.a.on" {
		t.Fatalf("get: %+v %v", got, err)
	}
	name, _ := c.Get("svc.a.name")
	var text string
	if err := json.Unmarshal(name.Value, &text); err != nil || text != "text with spaces\nand a newline" {
		t.Fatalf("string value: %q %v", name.Value, err)
	}
	values, err := c.GetPrefix("svc.a.*")
	if err != nil || len(values) != 2 {
		t.Fatalf("get prefix: %v %v", values, err)
	}
	keys, err := c.Keys("")
	if want := []string{"svc.a.name", "svc.a.on", "svc.b"}; err != nil || !reflect.DeepEqual(keys, want) {
		t.Fatalf("keys: %v %v", keys, err)
	}
	keys, _ = c.Keys("svc.a")
	if want := []string{"svc.a.name", "svc.a.on"}; !reflect.DeepEqual(keys, want) {
		t.Fatalf("keys svc.a: %v", keys)
	}
	if _, err := c.Delete("svc.b"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get("svc.b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
	if _, err := c.Delete("svc.b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete deleted: %v", err)
	}
	if _, err := c.Put("bad..key", 1); !errors.Is(err, ErrInvalidKey) {
		t.Fatalf("invalid key: %v", err)
	}
	if _, err := c.PutRaw("k", json.RawMessage(`{broken`)); err == nil {
		t.Fatal("broken JSON accepted")
	}
	if n, err := c.DeletePrefix("svc.*"); err != nil || n != 2 {
		t.Fatalf("delete prefix: %d %v", n, err)
	}
	if v, err := c.Version(); err != nil || v == "" {
		t.Fatalf("version: %q %v", v, err)
	}
	if err := c.Health(); err != nil {
		t.Fatal(err)
	}
}

// A pattern GET's reply may be far larger than one value: 20 values of 1 MiB each.
func TestGetPrefixReadsARepliesLargerThanOneValue(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	big := strings.Repeat("x", 1<<20)
	for i := 0; i < 20; i++ {
		if _, err := c.Put(fmt.Sprintf("big.k%02d", i), big); err != nil {
			t.Fatal(err)
		}
	}
	got, err := c.GetPrefix("big.*")
	if err != nil || len(got) != 20 {
		t.Fatalf("GetPrefix: %d values, %v", len(got), err)
	}
}

func TestRequestsRedialAfterARestart(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	if _, err := c.Put("k", 1); err != nil {
		t.Fatal(err)
	}
	s.stop()
	s.start()
	got, err := c.Get("k")
	if err != nil || string(got.Value) != "1" {
		t.Fatalf("after restart: %+v %v", got, err)
	}
	c.Close()
	if _, err := c.Get("k"); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func TestSubscribeSnapshotThenChanges(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	c.Put("a", 0)
	c.Put("a.x", map[string]int{"x": 1})
	c.Put("ab", 9)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := c.Subscribe(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if ev := next(t, events); ev.Kind != Init || ev.Key != "a" || string(ev.Value) != "0" {
		t.Fatalf("first init: %+v", ev)
	}
	if ev := next(t, events); ev.Kind != Init || ev.Key != "a.x" || string(ev.Value) != `{"x":1}` {
		t.Fatalf("second init: %+v", ev)
	}
	if ev := next(t, events); ev.Kind != Ready || ev.Count != 2 {
		t.Fatalf("ready: %+v", ev)
	}
	rev, _ := c.Put("a.y", "new")
	if ev := next(t, events); ev.Kind != Put || ev.Key != "a.y" || ev.Rev != rev || string(ev.Value) != `"new"` {
		t.Fatalf("put: %+v", ev)
	}
	c.Put("ab", 10) // not covered
	rev, _ = c.Delete("a.x")
	if ev := next(t, events); ev.Kind != Del || ev.Key != "a.x" || ev.Rev != rev {
		t.Fatalf("del: %+v", ev)
	}
	cancel()
	for range events {
	}
	if _, err := c.Subscribe(context.Background(), "bad..key"); !errors.Is(err, ErrInvalidKey) {
		t.Fatalf("bad target: %v", err)
	}
}

func TestSubscribeResumesAcrossAServerRestart(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	c.Put("r.keep", 1)
	c.Put("r.gone", 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := c.Subscribe(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		next(t, events) // init r.gone, init r.keep, ready
	}
	s.stop()
	// While the server is down, r.gone disappears from the data directory and r.keep gets
	// another value at the same revision (as a replaced data directory would have it).
	if err := os.Remove(filepath.Join(s.data, "r.gone.json")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.data, "r.keep.json"), []byte(`{"rev":1,"value":5}`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.start()
	// The edit made while the server was down costs a reset: the snapshot again (its key
	// passed on even at a known revision), then the deletion, then the marker.
	if ev := next(t, events); ev.Kind != Init || ev.Key != "r.keep" || string(ev.Value) != "5" {
		t.Fatalf("after resume: %+v", ev)
	}
	if ev := next(t, events); ev.Kind != Del || ev.Key != "r.gone" || ev.Rev != 0 {
		t.Fatalf("after resume: %+v", ev)
	}
	if ev := next(t, events); ev.Kind != Ready || ev.Count != 1 {
		t.Fatalf("resumed ready: %+v", ev)
	}
	rev, err := c.Put("r.keep", 3)
	if err != nil {
		t.Fatal(err)
	}
	if ev := next(t, events); ev.Kind != Put || ev.Key != "r.keep" || ev.Rev != rev {
		t.Fatalf("live after resume: %+v", ev)
	}
	cancel()
	waitFor(t, "the channel to close", func() bool {
		select {
		case _, ok := <-events:
			return !ok
		default:
			return false
		}
	})
}

func TestSubscribeResetsWhenTheDataDirectoryIsReplacedAtTheSameRevision(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	c.Put("r.keep", 1)
	c.Put("r.gone", 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := c.Subscribe(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	next(t, events) // init r.gone
	next(t, events) // init r.keep
	ready := next(t, events)
	if ready.Kind != Ready || len(ready.Epoch) != 32 {
		t.Fatalf("first ready: %+v", ready)
	}
	s.stop()
	// Another history in the same place: the data directory wiped and filled by another
	// server (on a socket of its own, so the subscription cannot resume before it is done)
	// up to the subscription's revision, with other keys.
	if err := os.RemoveAll(s.data); err != nil {
		t.Fatal(err)
	}
	otherDir := t.TempDir()
	other := &server{t: t, dir: otherDir, socket: filepath.Join(otherDir, "nkv.sock"), data: s.data}
	other.start()
	oc, err := Connect(other.socket, WithTimeout(deadline))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Put("r.new", 3); err != nil {
		t.Fatal(err)
	}
	if rev, err := oc.Put("elsewhere", 0); err != nil || rev != 2 {
		t.Fatalf("other history at rev %d: %v", rev, err)
	}
	oc.Close()
	other.stop()
	s.start()
	// The same revision in another history: a reset, so no stale key stays.
	want := []Event{
		{Kind: Init, Key: "r.new", Value: json.RawMessage("3"), Rev: 1},
		{Kind: Del, Key: "r.gone"},
		{Kind: Del, Key: "r.keep"},
	}
	for _, w := range want {
		ev := next(t, events)
		if ev.Kind != w.Kind || ev.Key != w.Key || ev.Rev != w.Rev || string(ev.Value) != string(w.Value) {
			t.Fatalf("after resume: got %+v, want %+v", ev, w)
		}
	}
	again := next(t, events)
	if again.Kind != Ready || again.Count != 1 || len(again.Epoch) != 32 || again.Epoch == ready.Epoch {
		t.Fatalf("resumed ready: %+v (before: %+v)", again, ready)
	}
}

func TestCompareAndSetAndSessions(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	rev, err := c.PutIf("lock", "me", 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.PutIf("lock", "you", 0)
	var e *Error
	if !errors.Is(err, ErrConflict) || !errors.As(err, &e) || e.Rev != rev {
		t.Fatalf("second PutIf: %v", err)
	}
	if _, err := c.DeleteIf("lock", rev+100); !errors.Is(err, ErrConflict) {
		t.Fatalf("DeleteIf at a wrong rev: %v", err)
	}
	if _, err := c.DeleteIf("lock", rev); err != nil {
		t.Fatal(err)
	}
	owner := connect(t, s)
	if _, err := owner.PutSession("svc.me", map[string]int{"pid": 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get("svc.me"); err != nil {
		t.Fatal(err)
	}
	owner.Close()
	waitFor(t, "the session key to go with its connection", func() bool {
		_, err := c.Get("svc.me")
		return errors.Is(err, ErrNotFound)
	})
}

func TestSubscribeResumesFromARevisionAfterACleanRestart(t *testing.T) {
	s := startServer(t)
	c := connect(t, s)
	c.Put("q.a", 1)
	c.Put("q.b", 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := c.Subscribe(ctx, "q")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		next(t, events)
	}
	s.stop()
	s.start()
	// Changes the subscription missed while it reconnects: the server's own events.
	c2 := connect(t, s)
	rev, _ := c2.Delete("q.b")
	var got Event
	waitFor(t, "the delete", func() bool {
		got = next(t, events)
		return got.Kind == Del
	})
	if got.Key != "q.b" || got.Rev != rev {
		t.Fatalf("resumed delete: %+v (want rev %d)", got, rev)
	}
}
