package disk

// Local: a writable Device that copies an image into a local volume as it
// is read (copy-on-read), takes writes (copy-on-write of partial
// granules), and, once the volume is complete, serves it alone.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/internal/bufpool"
)

// lockStripes is the number of granule locks; granule i uses lock
// i % lockStripes.
const lockStripes = 1024

// Local is a Device over a local volume filled from a lazy Disk. Reads of
// present granules come from the volume; others are fetched through the
// Disk (demand fetches go before hydration), written to the volume, marked
// present and answered. Zero parts stay holes in a file target. A write
// that covers part of a missing granule first fills the rest of it from
// the image. Demand fills, hydration and writes lock the granule they
// change, and a fill never overwrites a present granule.
type Local struct {
	d        *Disk
	vol      *cache.Volume
	vsize    int64 // the image's virtual size; the volume may be larger
	g        int64 // granularity
	writable bool

	locks  [lockStripes]sync.Mutex
	demand atomic.Int32 // demand fills under way; hydration yields to them
	// lastDemand is when the last demand fill ended (UnixNano): while
	// demand is recent, hydration keeps one read in flight, not Workers.
	lastDemand atomic.Int64
	local      atomic.Bool // complete: no store access any more
	closed     atomic.Bool
}

var _ Device = (*Local)(nil)

// NewLocal serves d through vol. The volume must have been opened for d's
// image (same virtual size). Local owns both: Close closes them. A
// complete volume may be served with d nil: the store is then never used.
func NewLocal(d *Disk, vol *cache.Volume, writable bool) (*Local, error) {
	vsize := vol.VirtualSize()
	if d == nil {
		if !vol.Complete() {
			return nil, fmt.Errorf("disk: volume %s is not complete: it needs its image", vol.Target())
		}
	} else if vsize = d.Size(); vol.Size() < vsize {
		return nil, fmt.Errorf("disk: volume %s of %d bytes for a %d-byte image", vol.Target(), vol.Size(), d.Size())
	}
	l := &Local{d: d, vol: vol, vsize: vsize, g: vol.Granularity(), writable: writable}
	l.local.Store(vol.Complete())
	return l, nil
}

// Volume returns the local volume.
func (l *Local) Volume() *cache.Volume { return l.vol }

// Disk returns the lazy device that fills the volume (nil for a complete
// volume served alone).
func (l *Local) Disk() *Disk { return l.d }

// Size returns the volume size (at least the image's virtual size; the
// extra reads as zeros).
func (l *Local) Size() int64 { return l.vol.Size() }

// ReadOnly reports whether writes are refused.
func (l *Local) ReadOnly() bool { return !l.writable }

// IsLocal reports whether the volume is complete and served without the store.
func (l *Local) IsLocal() bool { return l.local.Load() }

func (l *Local) checkRange(op string, off, n int64) error {
	if l.closed.Load() {
		return errClosed
	}
	if size := l.vol.Size(); off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("disk: %s of %d bytes at %d on a %d-byte volume: %w", op, n, off, size, ErrOutOfRange)
	}
	return nil
}

func (l *Local) lock(i int64) *sync.Mutex {
	m := &l.locks[i%lockStripes]
	m.Lock()
	return m
}

// granules returns the granules [i, j) that [off, off+n) touches.
func (l *Local) granules(off, n int64) (int64, int64) {
	return off / l.g, (off + n + l.g - 1) / l.g
}

// ReadAt fills p from off: present granules from the volume, the others
// fetched, stored and answered.
func (l *Local) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n := int64(len(p))
	if err := l.checkRange("read", off, n); err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, nil
	}
	if l.local.Load() {
		return l.vol.ReadAt(p, off)
	}
	i, end := l.granules(off, n)
	for i < end {
		j := min(l.vol.NextMissing(i), end)
		if j > i { // present run [i, j)
			s, e := max(off, i*l.g), min(off+n, j*l.g)
			if _, err := l.vol.ReadAt(p[s-off:e-off], s); err != nil {
				return 0, err
			}
			i = j
			continue
		}
		j = min(l.vol.NextPresent(i), end)
		if err := l.demandFill(ctx, i, j, p, off); err != nil {
			return 0, err
		}
		i = j
	}
	return int(n), nil
}

// demandFill fills the granules [i, j) for a reader, and copies into p (at
// guest offset off) what overlaps it.
func (l *Local) demandFill(ctx context.Context, i, j int64, p []byte, off int64) error {
	l.demandStart()
	defer l.demandEnd()
	bp, lo, err := l.fetch(ctx, i, j)
	if err != nil {
		return err
	}
	defer bufpool.Put(bp)
	if err := l.install(i, j, *bp, lo, true); err != nil {
		return err
	}
	overlapCopy(p, off, *bp, lo)
	return nil
}

func (l *Local) demandStart() { l.demand.Add(1) }

func (l *Local) demandEnd() {
	l.lastDemand.Store(time.Now().UnixNano())
	l.demand.Add(-1)
}

// fetch reads granules [i, j) from the image (zeros past its end) into a
// pooled buffer, which the caller gives back with bufpool.Put.
func (l *Local) fetch(ctx context.Context, i, j int64) (*[]byte, int64, error) {
	lo, hi := i*l.g, min(j*l.g, l.vol.Size())
	bp := bufpool.Get(int(hi - lo))
	if _, _, err := l.fetchInto(ctx, l.d.ReadAt, *bp, lo); err != nil {
		bufpool.Put(bp)
		return nil, 0, err
	}
	return bp, lo, nil
}

// fetchInto reads the granules of buf (at guest offset lo, granule-aligned)
// with read (the Disk's or the image's ReadAt); zeros past the image's end.
func (l *Local) fetchInto(ctx context.Context, read func(context.Context, []byte, int64) (int, error), buf []byte, lo int64) ([]byte, int64, error) {
	hi := lo + int64(len(buf))
	clear(buf[max(0, min(l.vsize-lo, int64(len(buf)))):])
	if vhi := min(hi, l.vsize); lo < vhi {
		n, err := read(ctx, buf[:vhi-lo], lo)
		if err == io.EOF && int64(n) == vhi-lo {
			err = nil
		}
		if err != nil {
			return nil, 0, err
		}
	}
	return buf, lo, nil
}

// install writes the granules of buf (guest offset lo, granule-aligned)
// that are still missing and marks them present. With reread, granules
// that became present meanwhile (a client wrote them) are read back into
// buf, so that a reader sees the volume's bytes. The granules are locked
// together and each run of missing ones is written with one WriteData and
// marked with one MarkPresent: a pwrite per granule costs the kernel more
// than the copy does.
func (l *Local) install(i, j int64, buf []byte, lo int64, reread bool) error {
	unlock := l.lockRange(i, j)
	defer unlock()
	for k := i; k < j; {
		s := k*l.g - lo
		if l.vol.Present(k) {
			e := k + 1
			for e < j && l.vol.Present(e) {
				e++
			}
			if reread {
				if _, err := l.vol.ReadAt(buf[s:min(e*l.g-lo, int64(len(buf)))], lo+s); err != nil {
					return &TargetError{Err: err}
				}
			}
			k = e
			continue
		}
		e := k + 1
		for e < j && !l.vol.Present(e) {
			e++
		}
		err := l.vol.WriteData(buf[s:min(e*l.g-lo, int64(len(buf)))], lo+s)
		if err == nil {
			err = l.vol.MarkPresent(k, e)
		}
		if err != nil {
			return &TargetError{Err: err}
		}
		k = e
	}
	return nil
}

// lockRange locks the granules [i, j) and returns the function that
// unlocks them. Stripes are taken in ascending order (each once), so two
// range lockers cannot deadlock; everyone else holds one stripe at a time.
func (l *Local) lockRange(i, j int64) func() {
	if j-i == 1 {
		m := l.lock(i)
		return m.Unlock
	}
	var ms []*sync.Mutex
	if j-i >= lockStripes {
		ms = make([]*sync.Mutex, lockStripes)
		for s := range ms {
			ms[s] = &l.locks[s]
		}
	} else {
		// The stripes of [i, j) are s0..lockStripes-1 then 0..e0-1 when
		// the range wraps, else s0..e0-1: in ascending order, the wrapped
		// part first.
		s0, e0 := i%lockStripes, j%lockStripes
		if e0 == 0 {
			e0 = lockStripes
		}
		if s0 < e0 {
			for s := s0; s < e0; s++ {
				ms = append(ms, &l.locks[s])
			}
		} else {
			for s := int64(0); s < e0; s++ {
				ms = append(ms, &l.locks[s])
			}
			for s := s0; s < lockStripes; s++ {
				ms = append(ms, &l.locks[s])
			}
		}
	}
	for _, m := range ms {
		m.Lock()
	}
	return func() {
		for _, m := range ms {
			m.Unlock()
		}
	}
}

// TargetError is a failure to write or sync the local volume (such as a
// full disk), as opposed to a failure to fetch.
type TargetError struct{ Err error }

func (e *TargetError) Error() string { return e.Err.Error() }

// Unwrap returns the cause.
func (e *TargetError) Unwrap() error { return e.Err }

// WriteAt writes p at off. A granule written in part and not yet present
// is first filled from the image.
func (l *Local) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	n := int64(len(p))
	if !l.writable {
		return 0, fmt.Errorf("disk: write of %d bytes at %d: %w", n, off, ErrReadOnly)
	}
	if err := l.checkRange("write", off, n); err != nil {
		return 0, err
	}
	err := l.modify(ctx, off, n, func(s, e int64) error { return l.vol.WriteAt(p[s-off:e-off], s) })
	if err != nil {
		return 0, err
	}
	return int(n), nil
}

// modify runs op on [off, off+n) granule by granule, each under its lock,
// after filling a missing granule that op changes only in part.
func (l *Local) modify(ctx context.Context, off, n int64, op func(s, e int64) error) error {
	if n == 0 {
		return nil
	}
	l.vol.SetModified()
	i, end := l.granules(off, n)
	for k := i; k < end; k++ {
		gs, ge := k*l.g, min((k+1)*l.g, l.vol.Size())
		s, e := max(off, gs), min(off+n, ge)
		m := l.lock(k)
		err := l.modifyLocked(ctx, k, gs, ge, s, e, op)
		m.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func (l *Local) modifyLocked(ctx context.Context, k, gs, ge, s, e int64, op func(s, e int64) error) error {
	if !l.vol.Present(k) && (s > gs || e < ge) {
		l.demandStart()
		bp, lo, err := l.fetch(ctx, k, k+1)
		l.demandEnd()
		if err != nil {
			return err
		}
		err = l.vol.WriteData(*bp, lo)
		bufpool.Put(bp)
		if err != nil {
			return err
		}
	}
	if err := op(s, e); err != nil {
		return err
	}
	return l.vol.MarkPresent(k, k+1)
}

// WriteZeroes makes [off, off+n) read as zeros: holes in a file target.
func (l *Local) WriteZeroes(ctx context.Context, off, n int64) error {
	if !l.writable {
		return fmt.Errorf("disk: write zeroes of %d bytes at %d: %w", n, off, ErrReadOnly)
	}
	if err := l.checkRange("write zeroes", off, n); err != nil {
		return err
	}
	return l.modify(ctx, off, n, func(s, e int64) error { return l.vol.Zero(s, e-s) })
}

// Trim discards [off, off+n); it then reads as zeros.
func (l *Local) Trim(ctx context.Context, off, n int64) error {
	if !l.writable {
		return fmt.Errorf("disk: trim of %d bytes at %d: %w", n, off, ErrReadOnly)
	}
	return l.WriteZeroes(ctx, off, n)
}

// Flush makes the volume's data and bitmap durable.
func (l *Local) Flush(ctx context.Context) error {
	if l.closed.Load() {
		return errClosed
	}
	return l.vol.Sync()
}

// Extents describes [off, off+n): present ranges from the volume's
// holes (SEEK_DATA/SEEK_HOLE on a file), the others from the image's map.
func (l *Local) Extents(ctx context.Context, off, n int64) ([]Extent, error) {
	if err := l.checkRange("extents", off, n); err != nil {
		return nil, err
	}
	var out []Extent
	add := func(e Extent) {
		if k := len(out); k > 0 && out[k-1].Hole == e.Hole && out[k-1].Zero == e.Zero && out[k-1].Offset+out[k-1].Length == e.Offset {
			out[k-1].Length += e.Length
			return
		}
		out = append(out, e)
	}
	local := func(s, e int64) error {
		for s < e {
			d, err := l.vol.SeekData(s)
			if err != nil {
				return err
			}
			d = min(d, e)
			if d > s {
				add(Extent{Offset: s, Length: d - s, Hole: true, Zero: true})
				s = d
				continue
			}
			h, err := l.vol.SeekHole(s)
			if err != nil {
				return err
			}
			h = min(max(h, s+1), e)
			add(Extent{Offset: s, Length: h - s})
			s = h
		}
		return nil
	}
	end := off + n
	if l.local.Load() {
		return out, local(off, end)
	}
	i, gend := l.granules(off, n)
	for i < gend {
		j := min(l.vol.NextMissing(i), gend)
		if j > i {
			if err := local(max(off, i*l.g), min(end, j*l.g)); err != nil {
				return nil, err
			}
			i = j
			continue
		}
		j = min(l.vol.NextPresent(i), gend)
		s, e := max(off, i*l.g), min(end, j*l.g)
		if vs, ve := s, min(e, l.vsize); vs < ve {
			ext, err := l.d.Extents(ctx, vs, ve-vs)
			if err != nil {
				return nil, err
			}
			for _, x := range ext {
				add(x)
			}
		}
		if s2 := max(s, l.vsize); s2 < e {
			add(Extent{Offset: s2, Length: e - s2, Hole: true, Zero: true})
		}
		i = j
	}
	return out, nil
}

// Prefetch fills the missing granules of [off, off+n).
func (l *Local) Prefetch(ctx context.Context, off, n int64) error {
	if err := l.checkRange("prefetch", off, n); err != nil {
		return err
	}
	if l.local.Load() || n == 0 {
		return nil
	}
	i, end := l.granules(off, n)
	step := max(1, (8<<20)/l.g)
	for i < end {
		i = l.vol.NextMissing(i)
		if i >= end {
			break
		}
		j := min(l.vol.NextPresent(i), end, i+step)
		l.demandStart()
		bp, lo, err := l.fetch(ctx, i, j)
		if err == nil {
			err = l.install(i, j, *bp, lo, false)
			bufpool.Put(bp)
		}
		l.demandEnd()
		if err != nil {
			return err
		}
		i = j
	}
	return nil
}

// Close flushes the volume and closes it and the Disk.
func (l *Local) Close() error {
	if l.closed.Swap(true) {
		return nil
	}
	var err error
	if l.d != nil {
		err = l.d.Close()
	}
	if verr := l.vol.Close(); verr != nil && !errors.Is(verr, os.ErrClosed) {
		err = verr
	}
	return err
}
