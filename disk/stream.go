package disk

import "sync"

// nStreams is how many interleaved sequential readers a disk tells apart.
const nStreams = 8

// stream is one reader's sequential run as the detector sees it.
type stream struct {
	gen    uint64 // identifies the stream holding the slot (0: free)
	next   int64  // end of the stream's requests so far
	ahead  int64  // end of what was fetched for it, or is being fetched
	window int64  // current fetch window
	used   uint64 // clock of the last request, for replacement
	joined bool   // a request other than the first has come within reach
}

// streamTable detects sequential readers: a request that starts at (or
// within a block of) where a recent stream ended continues that stream.
// It keeps the nStreams most recently used streams.
type streamTable struct {
	mu       sync.Mutex
	s        [nStreams]stream
	clock    uint64
	gens     uint64
	minFetch int64
}

// hint identifies the stream of a request.
type hint struct {
	slot int
	gen  uint64
	seq  bool // the request continues a stream
	near bool // the request falls behind a stream's end, within reach
}

// stream reports whether the request belongs to a stream: its misses are
// fetched in the stream's window, not in MinFetch.
func (h hint) stream() bool { return h.seq || h.near }

func (t *streamTable) init(minFetch int64) { t.minFetch = minFetch }

// note records a request [off, end) and says which stream it belongs to.
// A request starting within reach of a stream's end belongs to it: reach
// is the stream's window, at least tol and MinFetch, so that the
// requests of a parallel copier, which arrive a few apart and out of
// order, stay in their stream. The second request of a stream only
// confirms it (no hint): random readers often land near an earlier
// request by chance. A request
// ending past the stream's end continues it (seq) and moves the end; one
// behind it is near. Any other request starts a new stream in the least
// recently used slot.
func (t *streamTable) note(off, end, tol int64) hint {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.clock++
	best, bestDist := -1, int64(-1)
	for i := range t.s {
		s := &t.s[i]
		if s.gen == 0 {
			continue
		}
		reach := max(tol, t.minFetch, s.window)
		dist := off - s.next
		if dist < 0 {
			dist = -dist
		}
		if dist <= reach && (best < 0 || dist < bestDist) {
			best, bestDist = i, dist
		}
	}
	if best >= 0 {
		s := &t.s[best]
		s.used = t.clock
		if !s.joined {
			// One request near another is as likely a random reader's
			// chance as a stream: a stream is taken as one, with windows
			// and read-ahead of whole regions, from its third request.
			s.joined = true
			s.next = max(s.next, end)
			return hint{slot: best, gen: s.gen}
		}
		if end <= s.next {
			return hint{slot: best, gen: s.gen, near: true}
		}
		s.next = end
		return hint{slot: best, gen: s.gen, seq: true}
	}
	victim := 0
	for i := range t.s {
		if t.s[i].gen == 0 {
			victim = i
			break
		}
		if t.s[i].used < t.s[victim].used {
			victim = i
		}
	}
	t.gens++
	t.s[victim] = stream{gen: t.gens, next: end, window: t.minFetch, used: t.clock}
	return hint{slot: victim, gen: t.gens}
}

// window returns the current fetch window of the request's stream.
func (t *streamTable) window(h hint) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := &t.s[h.slot]; s.gen == h.gen {
		return s.window
	}
	return t.minFetch
}

// fetched records that a fetch with window w, reaching end, was started
// for the stream.
func (t *streamTable) fetched(h hint, w, end int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := &t.s[h.slot]; s.gen == h.gen {
		s.window = max(s.window, w)
		s.ahead = max(s.ahead, end)
	}
}

// readahead decides whether a sequential stream whose request ended at
// end should fetch ahead, and what. While its window grows, a stream
// fetches the next (doubled) window when less than one window is ahead of
// the reader; at full size (maxWin) it keeps up to keep bytes ahead, so
// that the GETs of two windows overlap instead of the reader draining one
// before the next starts. It returns the range to fetch, [lo, hi), block
// aligned (bs), ending on a multiple of region, and clipped to size.
func (t *streamTable) readahead(h hint, end, bs, region, size, maxWin, keep int64) (lo, hi int64, ok bool) {
	if !h.seq {
		return 0, 0, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	s := &t.s[h.slot]
	if s.gen != h.gen || s.ahead == 0 || s.ahead >= size {
		return 0, 0, false
	}
	dist := s.window
	if s.window >= maxWin {
		dist = max(maxWin, keep)
	}
	if s.ahead-end >= dist {
		return 0, 0, false
	}
	w := min(2*s.window, maxWin)
	lo = max(s.ahead, (end+bs-1)/bs*bs)
	hi = min((lo+w+region-1)/region*region, size)
	if lo >= hi {
		return 0, 0, false
	}
	s.window, s.ahead = w, hi
	return lo, hi, true
}

// Dense regions. nbdcopy and other parallel copiers keep dozens of
// requests in flight per connection, spread over several MiB, and they
// reach the disk out of order and around holes: the stream detector sees
// jumps, keeps restarting at MinFetch, and the store gets many small GETs.
// A region of the disk where several misses land close together in time
// is being copied, whatever the order: it is then fetched whole, in
// large pieces. Random readers rarely miss in the same region that often.
const (
	// denseRegion is the size of a region, in bytes.
	denseRegion = 4 << 20
	// denseRing is how many recent misses are remembered.
	denseRing = 32
	// denseMisses is how many of those, in one region, make it dense.
	denseMisses = 4
)

// denseTable remembers the regions of the most recent misses.
type denseTable struct {
	mu   sync.Mutex
	ring [denseRing]int64 // region+1 of each recent miss; 0: none
	pos  int
}

// miss records a miss in region r and reports whether the region now has
// denseMisses of the recent misses. The region's entries are then
// cleared, so that it triggers again only after as many new misses.
func (t *denseTable) miss(r int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ring[t.pos] = r + 1
	t.pos = (t.pos + 1) % denseRing
	n := 0
	for _, v := range t.ring {
		if v == r+1 {
			n++
		}
	}
	if n < denseMisses {
		return false
	}
	for i, v := range t.ring {
		if v == r+1 {
			t.ring[i] = 0
		}
	}
	return true
}
