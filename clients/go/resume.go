package nkv

import "sort"

// Resuming a subscription after a reconnect.
//
// The resumption sends `"from_rev"` and `"epoch"`: the revision and history of the last ready
// marker (the epoch makes a server whose data directory was wiped or replaced answer with a
// reset, however far its revisions have gone), the revision raised by every
// later put or del without "skipped" (an event standing for skipped changes may have
// overtaken older changes of other keys, so it does not move the point). The server answers
// with only what changed after it (put and del events) before ready. When its delete history
// does not reach back that far (a crash, too many deletes) it sends a reset line and the full
// snapshot: then every key of the snapshot is passed on as an init event (its revision may equal
// one the consumer has and still stand for another value, when the server's revisions started
// again with a replaced or wiped data directory), and a key the consumer has that the snapshot
// lacks is reported deleted (revision 0). Either way the consumer converges.

// resumeState is what one resumption tracks until its snapshot's ready marker.
type resumeState struct {
	fromRev uint64
	epoch   string
	// reset: the server sends the full snapshot (present then holds its keys).
	reset   bool
	present map[string]bool
}

func (s *subscription) resumeState() *resumeState {
	return &resumeState{fromRev: s.resumeRev, epoch: s.resumeEpoch, present: map[string]bool{}}
}

// subscribeRequest is the SUB for a first subscription or a resumption.
func subscribeRequest(target string, resume *resumeState) request {
	if resume == nil {
		return request{Op: "sub", Key: target}
	}
	from := resume.fromRev
	return request{Op: "sub", Key: target, FromRev: &from, Epoch: resume.epoch}
}

// gone reports, as Del events in key order, the keys the consumer had that the new snapshot
// lacks, and forgets them (after a reset only).
func (r *resumeState) gone(seen map[string]uint64) []Event {
	if !r.reset {
		return nil
	}
	var keys []string
	for key := range seen {
		if !r.present[key] {
			keys = append(keys, key)
		}
	}
	sort.Strings(keys)
	out := make([]Event, 0, len(keys))
	for _, key := range keys {
		delete(seen, key)
		out = append(out, Event{Kind: Del, Key: key})
	}
	return out
}
