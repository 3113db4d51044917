package nbd

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/snapfs/snapfs/disk"
)

// fakeBlock is the allocation granularity of fakeDevice.
const fakeBlock = 4096

// fakeDevice is an in-memory disk.Device: a byte slice with a per-block
// hole map, optional latency and injected failures, and counters.
type fakeDevice struct {
	mu   sync.RWMutex
	data []byte
	hole []bool // block is unallocated (reads as zeros)
	zero []bool // block is allocated and known to be zeros
	ro   bool

	latency time.Duration
	// failRead, when set, is asked before every ReadAt and Extents.
	failRead  atomic.Pointer[func(off, n int64) error]
	failWrite atomic.Pointer[func(off, n int64) error]
	failFlush atomic.Bool
	panicRead atomic.Bool

	reads, readBytes, holeReadBytes          atomic.Int64
	writes, flushes, trims, zeroes, prefetch atomic.Int64
	extents                                  atomic.Int64
	active, maxActive                        atomic.Int64
	activeBytes, maxActiveBytes              atomic.Int64 // of ReadAt calls
}

var _ disk.Device = (*fakeDevice)(nil)

// newFakeDevice makes a device of size bytes: random data with holes in
// a fixed pattern, and some blocks filled with a constant byte
// (patternByte) for qemu-io's read -P.
func newFakeDevice(size int64, seed uint64) *fakeDevice {
	nb := int((size + fakeBlock - 1) / fakeBlock)
	d := &fakeDevice{
		data: make([]byte, size),
		hole: make([]bool, nb),
		zero: make([]bool, nb),
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := range nb {
		lo, hi := d.blockRange(i)
		switch {
		case i%7 == 3 || (i/16)%5 == 2:
			d.hole[i] = true
		case i%11 == 5:
			for j := lo; j < hi; j++ {
				d.data[j] = patternByte(i)
			}
		default:
			for j := lo; j < hi; j += 8 {
				v := rng.Uint64()
				for k := int64(0); k < 8 && j+k < hi; k++ {
					d.data[j+k] = byte(v >> (8 * k))
				}
			}
		}
	}
	return d
}

// patternByte is the constant filling pattern block i (i%11 == 5).
func patternByte(i int) byte { return byte(0x40 + i%64) }

func (d *fakeDevice) blockRange(i int) (lo, hi int64) {
	lo = int64(i) * fakeBlock
	return lo, min(lo+fakeBlock, int64(len(d.data)))
}

// raiseMax sets m to n if n is larger.
func raiseMax(m *atomic.Int64, n int64) {
	for {
		v := m.Load()
		if n <= v || m.CompareAndSwap(v, n) {
			return
		}
	}
}

func (d *fakeDevice) enter(ctx context.Context) func() {
	raiseMax(&d.maxActive, d.active.Add(1))
	if d.latency > 0 {
		select {
		case <-time.After(d.latency):
		case <-ctx.Done():
		}
	}
	return func() { d.active.Add(-1) }
}

func (d *fakeDevice) check(off, n int64) error {
	if off < 0 || n < 0 || off > int64(len(d.data)) || n > int64(len(d.data))-off {
		return fmt.Errorf("fake: [%d,+%d): %w", off, n, disk.ErrOutOfRange)
	}
	return nil
}

func (d *fakeDevice) Size() int64    { return int64(len(d.data)) }
func (d *fakeDevice) ReadOnly() bool { return d.ro }
func (d *fakeDevice) Close() error   { return nil }

func (d *fakeDevice) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	raiseMax(&d.maxActiveBytes, d.activeBytes.Add(int64(len(p))))
	defer d.activeBytes.Add(-int64(len(p)))
	defer d.enter(ctx)()
	if d.panicRead.Load() {
		panic("fake: injected panic")
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if f := d.failRead.Load(); f != nil {
		if err := (*f)(off, int64(len(p))); err != nil {
			return 0, err
		}
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	d.reads.Add(1)
	d.readBytes.Add(int64(len(p)))
	end := off + int64(len(p))
	for i := int(off / fakeBlock); i < len(d.hole) && int64(i)*fakeBlock < end; i++ {
		if d.hole[i] {
			lo, hi := d.blockRange(i)
			d.holeReadBytes.Add(min(hi, end) - max(lo, off))
		}
	}
	return copy(p, d.data[off:]), nil
}

func (d *fakeDevice) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	defer d.enter(ctx)()
	if d.ro {
		return 0, disk.ErrReadOnly
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if f := d.failWrite.Load(); f != nil {
		if err := (*f)(off, int64(len(p))); err != nil {
			return 0, err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.writes.Add(1)
	copy(d.data[off:], p)
	end := off + int64(len(p))
	for i := int(off / fakeBlock); i < len(d.hole) && int64(i)*fakeBlock < end; i++ {
		d.hole[i], d.zero[i] = false, false
	}
	return len(p), nil
}

func (d *fakeDevice) Flush(ctx context.Context) error {
	defer d.enter(ctx)()
	d.flushes.Add(1)
	if d.failFlush.Load() {
		return errors.New("fake: injected flush failure")
	}
	return nil
}

// zeroRange zeroes [off, off+n) and marks the blocks it covers fully with
// mark.
func (d *fakeDevice) zeroRange(off, n int64, mark func(i int)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.data[off : off+n])
	end := off + n
	for i := int(off / fakeBlock); i < len(d.hole) && int64(i)*fakeBlock < end; i++ {
		lo, hi := d.blockRange(i)
		if lo >= off && hi <= end {
			mark(i)
		}
	}
}

func (d *fakeDevice) Trim(ctx context.Context, off, n int64) error {
	defer d.enter(ctx)()
	if d.ro {
		return disk.ErrReadOnly
	}
	if err := d.check(off, n); err != nil {
		return err
	}
	d.trims.Add(1)
	d.zeroRange(off, n, func(i int) { d.hole[i], d.zero[i] = true, false })
	return nil
}

func (d *fakeDevice) WriteZeroes(ctx context.Context, off, n int64) error {
	defer d.enter(ctx)()
	if d.ro {
		return disk.ErrReadOnly
	}
	if err := d.check(off, n); err != nil {
		return err
	}
	d.zeroes.Add(1)
	d.zeroRange(off, n, func(i int) { d.hole[i], d.zero[i] = false, true })
	return nil
}

func (d *fakeDevice) Prefetch(ctx context.Context, off, n int64) error {
	defer d.enter(ctx)()
	if err := d.check(off, n); err != nil {
		return err
	}
	d.prefetch.Add(1)
	return nil
}

func (d *fakeDevice) Extents(ctx context.Context, off, n int64) ([]disk.Extent, error) {
	if err := d.check(off, n); err != nil {
		return nil, err
	}
	if f := d.failRead.Load(); f != nil {
		if err := (*f)(off, n); err != nil {
			return nil, err
		}
	}
	d.extents.Add(1)
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.extentsLocked(off, n), nil
}

func (d *fakeDevice) extentsLocked(off, n int64) []disk.Extent {
	var out []disk.Extent
	end := off + n
	for pos := off; pos < end; {
		i := int(pos / fakeBlock)
		h, z := d.hole[i], d.zero[i]
		stop := pos
		for j := i; j < len(d.hole) && int64(j)*fakeBlock < end && d.hole[j] == h && d.zero[j] == z; j++ {
			_, hi := d.blockRange(j)
			stop = min(hi, end)
		}
		out = append(out, disk.Extent{Offset: pos, Length: stop - pos, Hole: h, Zero: h || z})
		pos = stop
	}
	return out
}

// snapshot returns a copy of the bytes.
func (d *fakeDevice) snapshot() []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return append([]byte(nil), d.data...)
}

// allExtents describes the whole device.
func (d *fakeDevice) allExtents() []disk.Extent {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.extentsLocked(0, int64(len(d.data)))
}
