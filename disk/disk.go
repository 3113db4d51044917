package disk

// The lazy read-only Device over a QCOW2 image: options, construction and
// the methods other than ReadAt (read.go).

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// Image is what a Disk needs of an image; *qcow2.Image implements it.
type Image interface {
	Size() int64
	ClusterSize() int64
	// ReadAtContext fills p with the guest bytes at off; it reads only
	// allocated clusters from the store.
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
	// Map describes [off, off+length) without reading data.
	Map(ctx context.Context, off, length int64) ([]qcow2.Extent, error)
}

var _ Image = (*qcow2.Image)(nil)

// Defaults of Options.
const (
	// DefaultMinFetch is the least a demand fetch reads, chosen with
	// BenchmarkRandomRead and BenchmarkSequential (bench_test.go): a
	// 256 MiB random-data image in loopback MinIO, as is and with a
	// 20 ms + 100 MB/s per-GET model of S3, on 2 cores shared with other
	// work (load 10-16), ranges over 2-3 runs. Cold random 4 KiB read,
	// p50, for MinFetch 64K / 256K / 1M / 4M:
	//
	//	MinIO, 1 reader:    2.0 / 2.2-3.4 / 3.3-4.1 / 9.5-10.8 ms
	//	MinIO, 16 readers:  17-28 / 24-86 / 62-85 / 122-279 ms
	//	S3 model, 1 reader: 24 / 26-27 / 36-39 / 71-75 ms
	//
	// Sequential scans (4 KiB or 128 KiB requests) showed no trend with
	// MinFetch, since windows double to MaxWindow anyway: 170-370 MB/s
	// and 64-88 GETs per 256 MiB, against 440-660 MB/s for 16 parallel
	// 8 MiB GETs. 256 KiB costs a random read about what 64 KiB does
	// (+8% on the S3 model) and brings 4 times the neighbouring data;
	// 1 MiB already adds half.
	DefaultMinFetch = 256 << 10
	// DefaultMaxWindow caps the fetch window of a sequential stream.
	DefaultMaxWindow = 16 << 20
	// DefaultMaxInFlight bounds the fetches under way per disk: as many
	// as the requests a QD32 random reader keeps in flight, each of which
	// may miss (with 16, such a reader waited for GET slots at 10 ms of
	// store latency). At most a quarter of them may be larger than
	// MinFetch.
	DefaultMaxInFlight = 32
	// maxKeep caps DefaultKeep: nbdcopy's 4 connections with 64
	// requests of 256 KiB each span 64 MiB (TestCopierLargeFetches).
	maxKeep = 64 << 20
	// minBlockSize is the least default block size.
	minBlockSize = 64 << 10
	// maxBlocks bounds the block count so that a block index fits in the
	// 40 low bits of a cache key.
	maxBlocks = 1 << 40
)

// DefaultKeep is the size of the default Options.Keep for a memory tier
// of capacity bytes: a quarter of it, at most 64 MiB, the span of the
// requests a parallel copier keeps in flight.
func DefaultKeep(capacity int64) int64 { return min(capacity/4, maxKeep) }

// KeepBudget bounds the bytes that disks hold in finished fetches until
// read. It is safe for concurrent use.
type KeepBudget struct {
	max  int64
	used atomic.Int64
}

// NewKeepBudget returns a budget of max bytes (none when max <= 0).
func NewKeepBudget(max int64) *KeepBudget { return &KeepBudget{max: max} }

// take reserves n bytes; false when they do not fit.
func (b *KeepBudget) take(n int64) bool {
	for {
		u := b.used.Load()
		if u+n > b.max {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

// give returns n bytes.
func (b *KeepBudget) give(n int64) { b.used.Add(-n) }

// Options tune a Disk. The zero value is usable.
type Options struct {
	// Cache is the memory tier, which may be shared by several disks; nil
	// means none (then every read is fetched, and nothing is read ahead).
	Cache *cache.Memory
	// BlockSize is the cache granularity in guest bytes, a power of two
	// of at least 512. Zero means max(cluster size, 64 KiB).
	BlockSize int64
	// MinFetch is the least a demand fetch reads (aligned to itself and
	// rounded up to whole blocks) when there is a memory tier to keep the
	// rest in. Zero means DefaultMinFetch.
	MinFetch int64
	// MaxWindow caps the window of a sequential stream, which doubles on
	// each fetch from MinFetch up to MaxWindow. Zero means DefaultMaxWindow.
	MaxWindow int64
	// MaxInFlight bounds the fetches under way, a quarter of them (at
	// least one) larger than MinFetch. Zero means DefaultMaxInFlight.
	MaxInFlight int
	// Keep bounds the bytes of finished sequential fetches held, outside
	// the memory tier, until readers have read them (see Disk.kept); it
	// may be shared by several disks. Nil means a private budget of
	// DefaultKeep(Cache.Capacity()). The CLI takes it out of
	// --cache-size, so that the two together stay within that budget.
	Keep *KeepBudget
	// Stats receives the counters; it may be shared by several disks.
	// Nil means a private one.
	Stats *Stats
	// Metrics, when given, are the counters of the store under the image
	// (objstore.WithMetrics); Disk.Stats then reports its GETs.
	Metrics *objstore.Metrics
}

// Disk is a read-only Device that serves an Image lazily: blocks are
// fetched on demand, kept in the memory tier, and fetched once however
// many readers want them at the same time. Zero and unallocated ranges
// are never fetched.
type Disk struct {
	im      Image
	closeIm func() error // set by Open, which owns the image

	size     int64
	bs       int64 // block size
	shift    uint  // log2(bs)
	nblocks  int64
	minFetch int64
	maxWin   int64
	// keepAhead is how far a full-speed sequential stream is read ahead:
	// two windows, at most 1/16 of the memory tier.
	keepAhead int64

	cache   *cache.Memory
	id      uint64 // the tag of this disk's cache entries: a key reused by a later disk (ids wrap after 2^24) misses
	keyBase uint64

	stats   *Stats
	metrics *objstore.Metrics
	sem     chan struct{}
	// bigSem bounds the fetches larger than MinFetch to a quarter of
	// sem: their buffers are most of the memory a disk holds besides the
	// cache, and a few large GETs already reach the store's rate, while
	// random readers need as many small GETs as requests in flight.
	bigSem  chan struct{}
	streams streamTable
	dense   denseTable

	ctx    context.Context // cancelled by Close; fetches run under it
	cancel context.CancelFunc
	wg     sync.WaitGroup // fetch and read-ahead goroutines

	mu       sync.Mutex
	closed   atomic.Bool       // set under mu
	inflight map[int64]*flight // block index -> the fetch bringing it; under mu
	// kept holds finished stream fetches whose blocks have not all been
	// read yet, oldest first, keptBytes their size, within keep. They
	// stay in inflight, so readers copy from them: the memory tier's
	// admission policy refuses new blocks when it is full of blocks read
	// before (a scan does not displace them), and a stream's read-ahead
	// would then be fetched again, piece by piece, by the readers.
	kept        []*flight
	keptBytes   int64
	keepPending int64 // bytes of stream fetches under way, kept once done
	keep        *KeepBudget
}

var _ Device = (*Disk)(nil)

// diskIDs numbers disks, for their cache keys and tags.
var diskIDs atomic.Uint64

// errClosed is returned by the methods of a closed Disk.
var errClosed = fmt.Errorf("disk: %w", os.ErrClosed)

// New serves im. The Disk does not close im.
func New(im Image, opts Options) (*Disk, error) {
	size := im.Size()
	if size < 0 {
		return nil, errors.New("disk: negative image size")
	}
	bs := opts.BlockSize
	if bs == 0 {
		bs = max(im.ClusterSize(), minBlockSize)
	}
	if bs < 512 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("disk: block size %d is not a power of two of at least 512", bs)
	}
	nblocks := (size + bs - 1) / bs
	if nblocks > maxBlocks {
		return nil, fmt.Errorf("disk: %d-byte blocks are too small for a %d-byte disk", bs, size)
	}
	roundUp := func(v int64) int64 { return max(bs, (v+bs-1)/bs*bs) }
	minFetch := opts.MinFetch
	if minFetch <= 0 {
		minFetch = DefaultMinFetch
	}
	minFetch = roundUp(minFetch)
	maxWin := opts.MaxWindow
	if maxWin <= 0 {
		maxWin = DefaultMaxWindow
	}
	maxWin = max(roundUp(maxWin), minFetch)
	inFlight := opts.MaxInFlight
	if inFlight <= 0 {
		inFlight = DefaultMaxInFlight
	}
	stats := opts.Stats
	if stats == nil {
		stats = new(Stats)
	}
	id := diskIDs.Add(1)
	ctx, cancel := context.WithCancel(context.Background())
	d := &Disk{
		im:       im,
		size:     size,
		bs:       bs,
		shift:    uint(bits.TrailingZeros64(uint64(bs))),
		nblocks:  nblocks,
		minFetch: minFetch,
		maxWin:   maxWin,
		cache:    opts.Cache,
		id:       id,
		keyBase:  (id & (1<<24 - 1)) << 40,
		stats:    stats,
		metrics:  opts.Metrics,
		sem:      make(chan struct{}, inFlight),
		bigSem:   make(chan struct{}, max(inFlight/4, 1)),
		ctx:      ctx,
		cancel:   cancel,
		inflight: make(map[int64]*flight),
	}
	if d.cache != nil {
		d.keepAhead = min(2*maxWin, max(d.cache.Capacity()/16, maxWin))
		d.keep = opts.Keep
		if d.keep == nil {
			d.keep = NewKeepBudget(DefaultKeep(d.cache.Capacity()))
		}
	}
	d.streams.init(minFetch)
	return d, nil
}

// Open opens the QCOW2 image key of st (see qcow2.Open; qopts may be nil)
// and serves it. Close closes the image too.
func Open(ctx context.Context, st objstore.Store, key string, qopts *qcow2.Options, opts Options) (*Disk, error) {
	im, err := qcow2.Open(ctx, st, key, qopts)
	if err != nil {
		return nil, err
	}
	d, err := New(im, opts)
	if err != nil {
		im.Close()
		return nil, err
	}
	d.closeIm = im.Close
	return d, nil
}

// Size returns the virtual size in bytes.
func (d *Disk) Size() int64 { return d.size }

// BlockSize returns the cache granularity in bytes.
func (d *Disk) BlockSize() int64 { return d.bs }

// MinFetch returns the least bytes a demand fetch reads.
func (d *Disk) MinFetch() int64 { return d.minFetch }

// ReadOnly reports true.
func (d *Disk) ReadOnly() bool { return true }

// WriteAt fails with ErrReadOnly.
func (d *Disk) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("disk: write of %d bytes at %d: %w", len(p), off, ErrReadOnly)
}

// Trim fails with ErrReadOnly.
func (d *Disk) Trim(ctx context.Context, off, n int64) error {
	return fmt.Errorf("disk: trim of %d bytes at %d: %w", n, off, ErrReadOnly)
}

// WriteZeroes fails with ErrReadOnly.
func (d *Disk) WriteZeroes(ctx context.Context, off, n int64) error {
	return fmt.Errorf("disk: write zeroes of %d bytes at %d: %w", n, off, ErrReadOnly)
}

// Flush does nothing: there are no writes.
func (d *Disk) Flush(ctx context.Context) error { return nil }

// Close cancels the fetches under way, waits for them, and closes the
// image when Open opened it. Methods called after Close fail.
func (d *Disk) Close() error {
	d.mu.Lock()
	if d.closed.Load() {
		d.mu.Unlock()
		return nil
	}
	d.closed.Store(true)
	d.mu.Unlock()
	d.cancel()
	d.wg.Wait()
	d.mu.Lock()
	kept := d.kept
	if d.keep != nil {
		d.keep.give(d.keptBytes)
	}
	d.kept, d.keptBytes = nil, 0
	for _, f := range kept {
		f.kept = false
		d.unregisterLocked(f)
	}
	d.mu.Unlock()
	for _, f := range kept {
		d.release(f)
	}
	if d.closeIm != nil {
		return d.closeIm()
	}
	return nil
}

// checkRange fails with ErrOutOfRange unless [off, off+n) lies in the disk.
func (d *Disk) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("disk: %s of %d bytes at %d on a %d-byte disk: %w", op, n, off, d.size, ErrOutOfRange)
	}
	return nil
}

// Extents describes [off, off+n) from the image's map: data and
// compressed ranges are data; zero and unallocated ranges are holes that
// read as zeros (as qemu-nbd reports qcow2 zero clusters). Adjacent
// extents with the same flags are merged.
func (d *Disk) Extents(ctx context.Context, off, n int64) ([]Extent, error) {
	if err := d.checkRange("extents", off, n); err != nil {
		return nil, err
	}
	if d.closed.Load() {
		return nil, errClosed
	}
	if n == 0 {
		return nil, nil
	}
	ext, err := d.im.Map(ctx, off, n)
	if err != nil {
		return nil, err
	}
	out := make([]Extent, 0, len(ext))
	pos := off
	for _, e := range ext {
		if e.Start != pos || e.Length <= 0 {
			return nil, fmt.Errorf("disk: image map has a gap or overlap at %d", pos)
		}
		hole := e.Kind == qcow2.Zero || e.Kind == qcow2.Unallocated
		if k := len(out); k > 0 && out[k-1].Hole == hole {
			out[k-1].Length += e.Length
		} else {
			out = append(out, Extent{Offset: e.Start, Length: e.Length, Hole: hole, Zero: hole})
		}
		pos += e.Length
	}
	if pos != off+n {
		return nil, fmt.Errorf("disk: image map ends at %d, not %d", pos, off+n)
	}
	return out, nil
}
