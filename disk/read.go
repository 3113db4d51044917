package disk

// The read path: cache lookups, holes, demand fetches rounded up to
// MinFetch or to a sequential stream's window, fetches shared by
// concurrent readers, read-ahead, and Prefetch.

import (
	"context"
	"io"
	"slices"
	"sync/atomic"

	"github.com/snapfs/snapfs/internal/bufpool"
	"github.com/snapfs/snapfs/qcow2"
)

// flight is one fetch of the blocks [start, start+n) with a single image
// read into a pooled buffer. Readers needing one of its blocks wait for
// done and copy from buf. refs counts those readers and the fetch
// goroutine; the last to leave returns buf to its pool.
type flight struct {
	start, n int64        // blocks
	off, len int64        // guest bytes
	ahead    bool         // read ahead: nobody asked for it yet
	keep     bool         // a stream's: kept once done until its blocks are read (Disk.kept)
	kept     bool         // in Disk.kept; under Disk.mu
	used     atomic.Int64 // bytes readers copied out of it
	done     chan struct{}
	buf      *[]byte // set before done is closed, when err is nil
	err      error   // set before done is closed
	refs     atomic.Int32
}

func (d *Disk) release(f *flight) {
	if f.refs.Add(-1) == 0 && f.buf != nil {
		bufpool.Put(f.buf)
		f.buf = nil
	}
}

func (d *Disk) blockLen(b int64) int64 { return min(d.bs, d.size-b<<d.shift) }

// copyCached copies into p (guest offset off) the part of block b that
// overlaps it, from the memory tier; false when the block is not there.
func (d *Disk) copyCached(p []byte, off int64, b int64) bool {
	if d.cache == nil {
		return false
	}
	bs0 := b << d.shift
	lo, hi := max(off, bs0), min(off+int64(len(p)), bs0+d.blockLen(b))
	if lo >= hi {
		return false
	}
	return d.cache.Read(d.keyBase|uint64(b), d.id, p[lo-off:hi-off], int(lo-bs0))
}

// cached reports whether block b is in the memory tier, without counting.
func (d *Disk) cached(b int64) bool {
	return d.cache != nil && d.cache.Has(d.keyBase|uint64(b))
}

// overlapCopy copies into p (guest offset off) the part of src (guest
// offset srcOff) that overlaps it, and returns its length.
func overlapCopy(p []byte, off int64, src []byte, srcOff int64) int64 {
	lo, hi := max(off, srcOff), min(off+int64(len(p)), srcOff+int64(len(src)))
	if lo >= hi {
		return 0
	}
	copy(p[lo-off:hi-off], src[lo-srcOff:hi-srcOff])
	return hi - lo
}

// ReadAt fills p from offset off. Cached blocks are copied, zero and
// unallocated blocks are cleared, and the other blocks are fetched (or
// taken from a fetch under way). A failed fetch fails the read with the
// image's error; the next read of the range fetches again.
func (d *Disk) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n := int64(len(p))
	if err := d.checkRange("read", off, n); err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, nil
	}
	if d.closed.Load() {
		return 0, errClosed
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	end := off + n
	b0, b1 := off>>d.shift, (end-1)>>d.shift+1
	var h hint
	if d.cache != nil {
		h = d.streams.note(off, end, d.bs)
		// Read ahead before serving the request, which may wait for a
		// fetch: the next window's GETs overlap with that wait.
		if lo, hi, ok := d.streams.readahead(h, end, d.bs, d.regionBlocks()<<d.shift, d.size, d.maxWin, d.keepAhead); ok {
			d.readahead(ctx, lo, hi)
		}
	}
	var stack [16]int64
	missing := stack[:0]
	for b := b0; b < b1; b++ {
		if d.copyCached(p, off, b) {
			continue
		}
		missing = append(missing, b)
	}
	if hits := b1 - b0 - int64(len(missing)); hits > 0 {
		d.stats.Hits.Add(hits)
	}
	if len(missing) > 0 {
		if err := d.load(ctx, p, off, missing, h); err != nil {
			return 0, err
		}
	}
	return int(n), nil
}

// load fills the parts of p (at off) in the blocks missing (ascending,
// not cached): holes are cleared, the rest is fetched. With a memory tier
// the fetch is widened: to the MinFetch-aligned range around the blocks
// (unless the fetch slots are congested), or, for a sequential stream, to
// its (doubled) window.
func (d *Disk) load(ctx context.Context, p []byte, off int64, missing []int64, h hint) error {
	// Blocks being fetched need neither the map nor a claim: join their
	// fetches first (the common case of a reader right behind read-ahead).
	var early []*flight
	rest := missing[:0]
	d.mu.Lock()
	for _, b := range missing {
		if f := d.inflight[b]; f != nil {
			if k := len(early); k == 0 || early[k-1] != f {
				f.refs.Add(1)
				early = append(early, f)
			}
			continue
		}
		rest = append(rest, b)
	}
	d.mu.Unlock()
	if n := int64(len(missing) - len(rest)); n > 0 {
		d.stats.Misses.Add(n)
		d.stats.Shared.Add(n)
	}
	if len(rest) == 0 {
		return d.wait(ctx, p, off, early)
	}
	if err := d.fetchMissing(ctx, p, off, rest, h); err != nil {
		for _, f := range early {
			d.release(f)
		}
		return err
	}
	return d.wait(ctx, p, off, early)
}

// fetchMissing is load for blocks that were not being fetched.
func (d *Disk) fetchMissing(ctx context.Context, p []byte, off int64, missing []int64, h hint) error {
	lo, hi := missing[0], missing[len(missing)-1]+1
	extLo, extHi, win, piece := lo, hi, d.maxWin, d.maxWin
	if d.cache != nil {
		if h.stream() {
			win = min(2*d.streams.window(h), d.maxWin)
			piece = d.pieceOf(win)
			// Up to the end of the region: a parallel copier's
			// requests arrive out of order, and region-aligned fetches
			// do not leave slivers between them.
			extHi = roundUp(max(hi, lo+win>>d.shift), d.regionBlocks())
		} else {
			win, piece = d.minFetch, d.minFetch
			if !d.congested() {
				mf := d.minFetch >> d.shift
				extLo, extHi = lo/mf*mf, (hi+mf-1)/mf*mf
			}
		}
		extHi = min(extHi, d.nblocks)
	}
	alloc, err := d.allocated(ctx, extLo, extHi)
	if err != nil {
		return err
	}
	need := missing[:0]
	var zero int64
	end := off + int64(len(p))
	for _, b := range missing {
		if alloc[b-extLo] {
			need = append(need, b)
			continue
		}
		s := max(off, b<<d.shift)
		e := min(end, b<<d.shift+d.blockLen(b))
		clear(p[s-off : e-off])
		zero += e - s
	}
	if zero > 0 {
		d.stats.ZeroBytes.Add(zero)
	}
	if len(need) == 0 {
		return nil
	}
	if d.cache != nil {
		d.fetchDense(ctx, need[0])
	}
	d.mu.Lock()
	if d.closed.Load() {
		d.mu.Unlock()
		return errClosed
	}
	own, joined, late := d.claimLocked(p, off, need, alloc, extLo, extHi, piece>>d.shift, forRead, h.stream() && d.cache != nil)
	d.mu.Unlock()
	if late > 0 {
		d.stats.Hits.Add(late)
	}
	d.stats.Misses.Add(int64(len(need)) - late)
	if d.cache != nil && len(own) > 0 {
		// Only a new fetch widens the stream's window: readers joining
		// fetches under way do not.
		d.streams.fetched(h, win, min(extHi<<d.shift, d.size))
	}
	d.launch(own)
	return d.wait(ctx, p, off, own, joined)
}

// congested reports whether at least half of the fetch slots are taken.
// A random miss then fetches only its own blocks, not the MinFetch range
// around them: with that many GETs under way, what bounds the GET rate is
// the CPU that each GET's bytes cost (the store's, a proxy's, the copy
// into the cache, decompression), and every waiting reader pays it for
// neighbouring blocks that are only a guess. The price is a memory tier
// that fills more slowly (cold random QD32 through 10 ms of latency, 20 s
// runs: the proxy's CPU per GET fell by a third, reads per second rose in
// most runs, but not all). An idle store (a lone or shallow reader) still
// gets MinFetch, which costs it little more than one block.
func (d *Disk) congested() bool { return 2*len(d.sem) >= cap(d.sem) }

// fetchDense notes a miss of block b and, when its region has become
// dense (see denseTable), starts fetching the region's blocks with data
// that are neither cached nor being fetched, in pieces of up to a region,
// so that the reader (and the next ones) join those fetches.
func (d *Disk) fetchDense(ctx context.Context, b int64) {
	rb := d.regionBlocks()
	r := b / rb
	if !d.dense.miss(r) {
		return
	}
	_ = d.fill(ctx, r*rb, min((r+1)*rb, d.nblocks), rb, true)
}

// allocated returns, for each block of [b0, b1), whether it holds data
// (data or compressed clusters anywhere in the chain).
func (d *Disk) allocated(ctx context.Context, b0, b1 int64) ([]bool, error) {
	alloc := make([]bool, b1-b0)
	start := b0 << d.shift
	ext, err := d.im.Map(ctx, start, min(b1<<d.shift, d.size)-start)
	if err != nil {
		return nil, err
	}
	for _, e := range ext {
		if e.Kind != qcow2.Data && e.Kind != qcow2.Compressed || e.Length <= 0 {
			continue
		}
		first := max(e.Start>>d.shift, b0)
		last := min((e.Start+e.Length-1)>>d.shift, b1-1)
		for b := first; b <= last; b++ {
			alloc[b-b0] = true
		}
	}
	return alloc, nil
}

// Who claims blocks.
type claimMode int

const (
	forRead     claimMode = iota // a reader: joins fetches, copies late cached blocks
	forPrefetch                  // Prefetch: joins fetches, skips cached blocks
	forAhead                     // read-ahead: skips cached blocks and fetches under way
)

// claimLocked, with d.mu held, sorts the blocks of need (ascending, with
// data) into fetches under way, which the caller joins unless forAhead;
// blocks cached since the caller looked (a fetch ended meanwhile), which
// forRead are copied into p (guest offset off) and counted in late, and
// otherwise skipped; and runs of free blocks, for which it creates and
// registers flights of at most pieceBlocks blocks. The first run is widened down to extLo and the last
// up to extHi over blocks that have data (alloc, indexed from extLo) and
// are neither cached nor being fetched. The caller must launch own and,
// unless forAhead, wait for own and joined. With keep, the new flights
// are kept once done until read (Disk.kept).
func (d *Disk) claimLocked(p []byte, off int64, need []int64, alloc []bool, extLo, extHi, pieceBlocks int64, mode claimMode, keep bool) (own, joined []*flight, late int64) {
	type run struct{ lo, hi int64 }
	var runs []run
	var shared int64
	for _, b := range need {
		if mode == forRead {
			if d.copyCached(p, off, b) {
				late++
				continue
			}
		} else if d.cached(b) {
			continue
		}
		if f := d.inflight[b]; f != nil {
			if mode != forAhead {
				shared++
				if k := len(joined); k == 0 || joined[k-1] != f {
					f.refs.Add(1)
					joined = append(joined, f)
				}
			}
			continue
		}
		if k := len(runs); k > 0 && runs[k-1].hi == b {
			runs[k-1].hi++
		} else {
			runs = append(runs, run{b, b + 1})
		}
	}
	if shared > 0 {
		d.stats.Shared.Add(shared)
	}
	if len(runs) == 0 {
		return nil, joined, late
	}
	free := func(b int64) bool {
		return alloc[b-extLo] && d.inflight[b] == nil && !d.cached(b)
	}
	for r := &runs[0]; r.lo > extLo && free(r.lo-1); {
		r.lo--
	}
	for r := &runs[len(runs)-1]; r.hi < extHi && free(r.hi); {
		r.hi++
	}
	refs := int32(2) // the fetch goroutine and the caller
	ahead := mode == forAhead
	if ahead {
		refs = 1
	}
	for _, r := range runs {
		// Pieces end on multiples of their size: fetches of neighbouring
		// runs then line up, without slivers between them.
		for s, e := r.lo, int64(0); s < r.hi; s = e {
			e = min((s/pieceBlocks+1)*pieceBlocks, r.hi)
			off := s << d.shift
			f := &flight{start: s, n: e - s, off: off, len: min(e<<d.shift, d.size) - off, ahead: ahead, keep: keep, done: make(chan struct{})}
			if keep {
				d.keepPending += f.len
			}
			f.refs.Store(refs)
			for b := s; b < e; b++ {
				d.inflight[b] = f
			}
			d.wg.Add(1)
			own = append(own, f)
		}
	}
	return own, joined, late
}

// launch starts the fetches of own.
func (d *Disk) launch(own []*flight) {
	for _, f := range own {
		go d.run(f)
	}
}

// wait waits for the flights, copies what overlaps p (at off) when p is
// not nil, and leaves them. It returns the first fetch error, or the
// context's error as soon as ctx is done (the fetches go on and fill the
// cache).
func (d *Disk) wait(ctx context.Context, p []byte, off int64, lists ...[]*flight) error {
	var first error
	for i, fs := range lists {
		for j, f := range fs {
			select {
			case <-f.done:
			case <-ctx.Done():
				for _, g := range fs[j:] {
					d.release(g)
				}
				for _, rest := range lists[i+1:] {
					for _, g := range rest {
						d.release(g)
					}
				}
				return ctx.Err()
			}
			if f.err != nil {
				if first == nil {
					first = f.err
				}
			} else if p != nil {
				if n := overlapCopy(p, off, *f.buf, f.off); f.keep && f.used.Add(n) >= f.len {
					d.unkeep(f)
				}
			}
			d.release(f)
		}
	}
	return first
}

// run performs the fetch of f, publishes its result to the waiting
// readers and the memory tier, and unregisters it.
func (d *Disk) run(f *flight) {
	defer d.wg.Done()
	if err := d.fetch(f); err != nil {
		d.stats.FetchErrors.Add(1)
		f.err = err
		// Unregister first: readers from now on fetch again.
		d.mu.Lock()
		if f.keep {
			d.keepPending -= f.len
		}
		d.unregisterLocked(f)
		d.mu.Unlock()
		close(f.done)
		d.release(f)
		return
	}
	close(f.done)
	if f.keep && d.keepDone(f) {
		return
	}
	d.retire(f)
}

// retire puts f's blocks in the memory tier, then unregisters f and
// leaves it. A stream's fetch that its readers copied all of is left out
// unless the whole disk fits in the tier and the tier has room for it
// without evicting. Its sequential reader has read those blocks once and
// most likely moves on: a scan of a disk larger than the tier would push
// its own head out with its tail, and the blocks other readers come back
// to with it. The copies cost too: into fresh tier pages they were a
// third of snapfs's CPU in a cold nbdcopy (29% page clearing alone, with
// a 512 MiB tier and a 1.4 GB object).
func (d *Disk) retire(f *flight) {
	readOnce := f.keep && f.used.Load() >= f.len
	if d.cache != nil && (!readOnce || d.size <= d.cache.Capacity() && d.cache.Room() >= f.len) {
		buf := *f.buf
		for i := range f.n {
			b := f.start + i
			s := i << d.shift
			d.cache.Put(d.keyBase|uint64(b), d.id, buf[s:s+d.blockLen(b)])
		}
		// Make the blocks visible to Read before the flight disappears, so
		// that a reader arriving now finds them (unless refused).
		d.cache.Wait()
	}
	d.unregister(f)
	d.release(f)
}

// keepDone adds the finished flight f to d.kept, with the fetch
// goroutine's reference, unless readers have copied all of it already;
// the oldest kept flights are retired to stay within d.keep. It reports
// whether f was kept. Kept flights go to the memory tier only when they
// leave: until then readers copy from them, which counts what they read.
func (d *Disk) keepDone(f *flight) bool {
	d.mu.Lock()
	d.keepPending -= f.len
	if d.closed.Load() || f.len > d.keep.max || f.used.Load() >= f.len {
		d.mu.Unlock()
		return false
	}
	var out []*flight
	kept := true
	for !d.keep.take(f.len) {
		if len(d.kept) == 0 {
			kept = false // other disks hold the budget
			break
		}
		g := d.kept[0]
		d.kept = d.kept[1:]
		d.keptBytes -= g.len
		d.keep.give(g.len)
		g.kept = false
		out = append(out, g)
	}
	if kept {
		f.kept = true
		d.kept = append(d.kept, f)
		d.keptBytes += f.len
	}
	d.mu.Unlock()
	for _, g := range out {
		d.retire(g)
	}
	return kept
}

// unkeep retires f, if kept, now that readers copied all of it.
func (d *Disk) unkeep(f *flight) {
	d.mu.Lock()
	if !f.kept {
		d.mu.Unlock()
		return
	}
	f.kept = false
	if i := slices.Index(d.kept, f); i >= 0 {
		d.kept = slices.Delete(d.kept, i, i+1)
		d.keptBytes -= f.len
		d.keep.give(f.len)
	}
	// The reader that copied the last bytes should not wait for the
	// copy into the memory tier: retire in the background (tracked by
	// d.wg, which Close waits for, unless Close is already under way).
	if !d.closed.Load() {
		d.wg.Add(1)
		d.mu.Unlock()
		go func() {
			defer d.wg.Done()
			d.retire(f)
		}()
		return
	}
	d.mu.Unlock()
	d.retire(f)
}

func (d *Disk) unregister(f *flight) {
	d.mu.Lock()
	d.unregisterLocked(f)
	d.mu.Unlock()
}

func (d *Disk) unregisterLocked(f *flight) {
	for b := f.start; b < f.start+f.n; b++ {
		if d.inflight[b] == f {
			delete(d.inflight, b)
		}
	}
}

// fetch reads f's range from the image, at most cap(d.sem) at a time, and
// of those at most cap(d.bigSem) larger than MinFetch.
func (d *Disk) fetch(f *flight) error {
	if f.len > d.minFetch {
		// Large fetches also take a slot of bigSem, before one of sem,
		// so that waiting for it never holds up small reads.
		select {
		case d.bigSem <- struct{}{}:
		case <-d.ctx.Done():
			return errClosed
		}
		defer func() { <-d.bigSem }()
	}
	select {
	case d.sem <- struct{}{}:
	case <-d.ctx.Done():
		return errClosed
	}
	defer func() { <-d.sem }()
	d.stats.InFlight.Add(1)
	defer d.stats.InFlight.Add(-1)
	d.stats.Fetches.Add(1)
	bp := bufpool.Get(int(f.len))
	n, err := d.im.ReadAtContext(d.ctx, *bp, f.off)
	if int64(n) == f.len && err == io.EOF {
		err = nil
	}
	if err == nil && int64(n) < f.len {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		bufpool.Put(bp)
		return err
	}
	f.buf = bp
	d.stats.BytesFetched.Add(f.len)
	if f.ahead {
		d.stats.ReadaheadBytes.Add(f.len)
	}
	return nil
}

// readahead starts fetching the blocks with data of [lo, hi) that are
// neither cached nor being fetched. The blocks are claimed before it
// returns, so that the reader's next requests join these fetches instead
// of starting their own. ctx (the reader's) bounds only the map lookup;
// a failure just skips the read-ahead.
func (d *Disk) readahead(ctx context.Context, lo, hi int64) {
	// Read-ahead that would push finished fetches out of d.kept before
	// their readers come would only be fetched again: wait until readers
	// have caught up (their own misses still fetch whole regions).
	d.mu.Lock()
	full := d.keep.used.Load()+d.keepPending >= d.keep.max
	d.mu.Unlock()
	if full {
		return
	}
	b0, b1 := lo>>d.shift, (hi-1)>>d.shift+1
	_ = d.fill(ctx, b0, b1, d.pieceOf(hi-lo)>>d.shift, true)
}

// windowPieces is how many parallel fetches a sequential window is split
// into: one connection's transfer rate is a fraction of what parallel
// GETs reach (see BenchmarkSequential).
const windowPieces = 4

// pieceOf returns the size of the fetches a window of w bytes is split
// into: w/windowPieces in whole blocks, at least a dense region and
// MinFetch. Small GETs cost the store about as much CPU as large ones.
func (d *Disk) pieceOf(w int64) int64 {
	return max(d.minFetch, d.regionBlocks()<<d.shift, (w/windowPieces+d.bs-1)>>d.shift<<d.shift)
}

// regionBlocks returns the blocks per dense region (at least one).
func (d *Disk) regionBlocks() int64 { return max(int64(denseRegion)>>d.shift, 1) }

// roundUp rounds v up to a multiple of m.
func roundUp(v, m int64) int64 { return (v + m - 1) / m * m }

// fill fetches the blocks with data of [b0, b1) that are not cached, in
// pieces of at most pieceBlocks, and with ahead unset waits for them
// (joining fetches under way). The fetches themselves run until done or
// Close, whatever happens to ctx.
func (d *Disk) fill(ctx context.Context, b0, b1, pieceBlocks int64, ahead bool) error {
	alloc, err := d.allocated(ctx, b0, b1)
	if err != nil {
		return err
	}
	var need []int64
	for b := b0; b < b1; b++ {
		if alloc[b-b0] && !d.cached(b) {
			need = append(need, b)
		}
	}
	if len(need) == 0 {
		return nil
	}
	d.mu.Lock()
	if d.closed.Load() {
		d.mu.Unlock()
		return errClosed
	}
	mode := forPrefetch
	if ahead {
		mode = forAhead
	}
	own, joined, _ := d.claimLocked(nil, 0, need, alloc, b0, b1, pieceBlocks, mode, ahead)
	d.mu.Unlock()
	d.launch(own)
	if ahead {
		return nil
	}
	return d.wait(ctx, nil, 0, own, joined)
}

// Prefetch brings the blocks with data of [off, off+n) into the memory
// tier and returns when they are there (or were refused by it). Without a
// memory tier it does nothing.
func (d *Disk) Prefetch(ctx context.Context, off, n int64) error {
	if err := d.checkRange("prefetch", off, n); err != nil {
		return err
	}
	if d.closed.Load() {
		return errClosed
	}
	if n == 0 || d.cache == nil {
		return nil
	}
	b0, b1 := off>>d.shift, (off+n-1)>>d.shift+1
	piece := d.pieceOf(d.maxWin) >> d.shift
	// Claim a bounded number of blocks at a time.
	chunk := piece * int64(cap(d.sem))
	for c0 := b0; c0 < b1; c0 += chunk {
		if err := d.fill(ctx, c0, min(c0+chunk, b1), piece, false); err != nil {
			return err
		}
	}
	return nil
}
