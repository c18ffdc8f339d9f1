package nkv

import "sort"

// Resuming a subscription after a reconnect.
//
// Today the server has no "changes since revision N" (the planned `SUB <target> FROM <rev>`),
// so a resumed subscription asks for the full snapshot again and the client works out the
// difference: a key whose revision is the one the consumer already has is not passed on, and
// a key the consumer has that the new snapshot lacks is reported deleted (revision 0). When the
// server learns FROM, subscribeRequest sends `from: lastRev` and the server's own del events
// replace `gone`; nothing else changes.

// resumeState is what one resumption tracks until its snapshot's ready marker.
type resumeState struct {
	fromRev uint64
	// present holds the keys the new snapshot included.
	present map[string]bool
}

func (s *subscription) resumeState() *resumeState {
	return &resumeState{fromRev: s.lastRev, present: map[string]bool{}}
}

// subscribeRequest is the SUB for a first subscription or a resumption. (A resumption would
// carry resume.fromRev once the server accepts it.)
func subscribeRequest(target string, resume *resumeState) request {
	_ = resume
	return request{Op: "sub", Key: target}
}

// gone reports, as Del events in key order, the keys the consumer had that the new snapshot
// lacks, and forgets them.
func (r *resumeState) gone(seen map[string]uint64) []Event {
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
