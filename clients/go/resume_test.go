package nkv

import (
	"reflect"
	"testing"
)

// Resuming without server help (a reset): the whole snapshot reaches the consumer, even a key
// at a revision it has (the server's revisions may have started again), and what is gone is
// reported deleted.
func TestAResetPassesTheWholeSnapshotOnAndReportsWhatIsGone(t *testing.T) {
	s := &subscription{seen: map[string]uint64{}}
	for _, ev := range []wireEvent{
		{Event: "init", Key: "a", Rev: 1}, {Event: "init", Key: "b", Rev: 2},
		{Event: "init", Key: "c", Rev: 3}, {Event: "ready", Count: 3, Rev: 3},
	} {
		s.translate(ev, nil)
	}
	resume := s.resumeState()
	if resume.fromRev != 3 {
		t.Fatalf("fromRev %d", resume.fromRev)
	}
	if req := subscribeRequest("x", resume); req.FromRev == nil || *req.FromRev != 3 {
		t.Fatalf("resumption request %+v", req)
	}
	var got []Event
	for _, ev := range []wireEvent{
		{Event: "reset"},                  // the server cannot resume: full snapshot
		{Event: "init", Key: "a", Rev: 1}, // the same revision: passed on all the same
		{Event: "init", Key: "c", Rev: 7}, // changed: passed on
		{Event: "init", Key: "d", Rev: 8}, // new: passed on
		{Event: "ready", Count: 3},        // b is gone
	} {
		out, ok := s.translate(ev, resume)
		if !ok {
			t.Fatal("translate stopped")
		}
		got = append(got, out...)
	}
	want := []Event{
		{Kind: Init, Key: "a", Rev: 1},
		{Kind: Init, Key: "c", Rev: 7},
		{Kind: Init, Key: "d", Rev: 8},
		{Kind: Del, Key: "b"},
		{Kind: Ready, Count: 3},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	if want := map[string]uint64{"a": 1, "c": 7, "d": 8}; !reflect.DeepEqual(s.seen, want) {
		t.Fatalf("seen %v", s.seen)
	}
	if _, ok := s.translate(wireEvent{Event: "shutdown"}, nil); ok {
		t.Fatal("shutdown must end the connection")
	}
}

// Resuming with server help: the put and del events pass through, nothing is diffed, and the
// resume point follows ready and the live events that skipped nothing.
func TestResumeFromARevisionPassesTheServersChangesOn(t *testing.T) {
	s := &subscription{seen: map[string]uint64{"a": 1, "b": 2}, resumeRev: 2}
	resume := s.resumeState()
	var got []Event
	for _, ev := range []wireEvent{
		{Event: "put", Key: "a", Rev: 5}, {Event: "del", Key: "c", Rev: 6},
		{Event: "ready", Count: 2, Rev: 6},
	} {
		out, _ := s.translate(ev, resume)
		got = append(got, out...)
	}
	want := []Event{{Kind: Put, Key: "a", Rev: 5}, {Kind: Del, Key: "c", Rev: 6}, {Kind: Ready, Count: 2}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	s.translate(wireEvent{Event: "put", Key: "b", Rev: 9, Skipped: 2}, nil)
	if s.resumeRev != 6 {
		t.Fatalf("a skipped event moved the resume point to %d", s.resumeRev)
	}
	s.translate(wireEvent{Event: "put", Key: "a", Rev: 8}, nil)
	if s.resumeRev != 8 {
		t.Fatalf("resume point %d", s.resumeRev)
	}
}
