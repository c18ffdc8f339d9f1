package nkv

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// EventKind says what an Event reports.
type EventKind int

const (
	// Init is a key's value when the subscription (or its resumption) started.
	Init EventKind = iota
	// Put is a change of a key's value.
	Put
	// Del is a key's deletion. Rev is 0 for a key found gone on resuming (deleted while the
	// subscription was disconnected; the server no longer knows the delete's revision).
	Del
	// Ready ends a snapshot: the events before it were the state when it was taken; Count is
	// the number of Init events the server sent for it.
	Ready
)

func (k EventKind) String() string {
	switch k {
	case Init:
		return "init"
	case Put:
		return "put"
	case Del:
		return "del"
	case Ready:
		return "ready"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one thing a subscription tells: a key's value, change or deletion, or the end of a
// snapshot.
type Event struct {
	Kind  EventKind
	Key   string          // Init, Put, Del
	Value json.RawMessage // Init, Put
	Rev   uint64          // Init, Put, Del
	Count int             // Ready
	// Epoch is the history Rev numbers belong to (Ready; empty from a server before it): a
	// resumption names it, so a server whose data directory was wiped or replaced answers
	// with a reset however far its revisions have gone.
	Epoch string
	// Skipped is how many earlier changes of the key this Put or Del stands for (the server
	// coalesced them because the consumer was behind).
	Skipped uint64
}

// wireEvent is an event line as the server sends it.
type wireEvent struct {
	Event   string          `json:"event"`
	Key     string          `json:"key"`
	Value   json.RawMessage `json:"value"`
	Rev     uint64          `json:"rev"`
	Count   int             `json:"count"`
	Skipped uint64          `json:"skipped"`
	Epoch   string          `json:"epoch"`
	OK      *bool           `json:"ok"`
	Error   string          `json:"error"`
	Msg     string          `json:"message"`
}

// Subscribe subscribes to target (a key, covering itself and everything below it; "a.*" for
// only what is below a; "*" for everything) on a connection of its own. The channel gets the
// snapshot (Init events, then Ready), then every change. If the connection or the server goes
// away, the subscription reconnects (backing off up to a second) and resumes: the consumer sees
// only what changed meanwhile, keys deleted meanwhile as Del, then Ready. The channel is
// closed when ctx is done. A consumer that does not keep up holds back its own connection only;
// the server then keeps the latest state of each key for it.
//
// The first connection is made before Subscribe returns, so a wrong path or target is an error
// here rather than a silent retry loop.
func (c *Client) Subscribe(ctx context.Context, target string) (<-chan Event, error) {
	s := &subscription{path: c.path, target: target, name: c.opts.name, seen: map[string]uint64{}}
	cn, err := s.start(nil)
	if err != nil {
		return nil, err
	}
	events := make(chan Event, 64)
	go s.run(ctx, cn, events)
	return events, nil
}

type subscription struct {
	path, target, name string
	// seen is the revision of every key the consumer has been given and not told deleted:
	// what resuming compares the new snapshot with. Touched only by the subscription's
	// goroutine (and start, before it runs).
	seen map[string]uint64
	// lastRev is the highest revision delivered.
	lastRev uint64
	// resumeRev is where a resumption starts: see resume.go.
	resumeRev uint64
	// resumeEpoch is the history resumeRev belongs to: the epoch of the last ready.
	resumeEpoch string
}

// start dials, names the connection, and subscribes (resuming when resume is non-nil).
func (s *subscription) start(resume *resumeState) (*conn, error) {
	cn, err := dial(s.path, 5*time.Second)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*conn, error) {
		cn.close()
		return nil, err
	}
	if s.name != "" {
		if _, err := cn.exchange(request{Op: "hello", Name: s.name}, 5*time.Second); err != nil {
			return fail(err)
		}
	}
	if _, err := cn.exchange(subscribeRequest(s.target, resume), 5*time.Second); err != nil {
		return fail(fmt.Errorf("nkv: subscribe to %s: %w", s.target, err))
	}
	return cn, nil
}

func (s *subscription) run(ctx context.Context, cn *conn, events chan<- Event) {
	defer close(events)
	var resume *resumeState
	backoff := 10 * time.Millisecond
	for {
		if cn != nil {
			// Cancelling ctx closes the connection, which ends a blocked read.
			done := make(chan struct{})
			go func(cn *conn) {
				select {
				case <-ctx.Done():
					cn.close()
				case <-done:
				}
			}(cn)
			delivered := s.pump(ctx, cn, resume, events)
			close(done)
			cn.close()
			if delivered {
				backoff = 10 * time.Millisecond
			}
		}
		if ctx.Err() != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		if backoff < time.Second {
			backoff *= 2
		}
		resume = s.resumeState()
		var err error
		cn, err = s.start(resume)
		if err != nil {
			cn = nil
		}
	}
}

// pump reads one connection's events until it fails; false if it delivered nothing.
func (s *subscription) pump(ctx context.Context, cn *conn, resume *resumeState, events chan<- Event) bool {
	delivered := false
	for {
		line, err := cn.readLine(maxLine)
		if err != nil {
			return delivered
		}
		var ev wireEvent
		if json.Unmarshal(line, &ev) != nil {
			return delivered
		}
		out, ok := s.translate(ev, resume)
		for _, e := range out {
			select {
			case events <- e:
				delivered = true
			case <-ctx.Done():
				return delivered
			}
		}
		if !ok {
			return delivered
		}
		if ev.Event == "ready" {
			resume = nil
		}
	}
}

// translate turns a wire event into what the consumer gets; false when the connection is
// ending (the server is stopping).
func (s *subscription) translate(ev wireEvent, resume *resumeState) ([]Event, bool) {
	switch ev.Event {
	case "reset":
		if resume != nil {
			resume.reset = true
		}
		return nil, true
	case "init":
		if resume != nil {
			// Passed on even at a revision the consumer has: after a reset the server's
			// revisions may have started again (a replaced or wiped data directory), so an
			// equal revision does not prove an equal value.
			resume.present[ev.Key] = true
		}
		s.note(ev.Key, ev.Rev)
		return []Event{{Kind: Init, Key: ev.Key, Value: ev.Value, Rev: ev.Rev}}, true
	case "put":
		s.note(ev.Key, ev.Rev)
		s.live(ev, resume)
		return []Event{{Kind: Put, Key: ev.Key, Value: ev.Value, Rev: ev.Rev, Skipped: ev.Skipped}}, true
	case "del":
		delete(s.seen, ev.Key)
		s.bump(ev.Rev)
		s.live(ev, resume)
		return []Event{{Kind: Del, Key: ev.Key, Rev: ev.Rev, Skipped: ev.Skipped}}, true
	case "ready":
		var out []Event
		if resume != nil {
			out = resume.gone(s.seen)
		}
		s.resumeRev = ev.Rev
		s.resumeEpoch = ev.Epoch
		return append(out, Event{Kind: Ready, Count: ev.Count, Epoch: ev.Epoch}), true
	case "shutdown":
		return nil, false
	}
	return nil, true
}

// live moves the resume point past a live event that skipped nothing.
func (s *subscription) live(ev wireEvent, resume *resumeState) {
	if resume == nil && ev.Skipped == 0 && ev.Rev > s.resumeRev {
		s.resumeRev = ev.Rev
	}
}

func (s *subscription) note(key string, rev uint64) {
	s.seen[key] = rev
	s.bump(rev)
}

func (s *subscription) bump(rev uint64) {
	if rev > s.lastRev {
		s.lastRev = rev
	}
}
