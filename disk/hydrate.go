package disk

// Hydration: the background pass that copies every allocated range of the
// image that is not yet in the local volume, then verifies the volume and
// records it complete.

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// Defaults of HydrateOptions.
const (
	DefaultHydrateChunk   = 8 << 20
	DefaultHydrateWorkers = 16
	// demandQuiet is how long after a demand fill hydration keeps to one
	// read in flight, so that a reader's next misses do not queue behind
	// Workers large reads.
	demandQuiet = 250 * time.Millisecond
	// maxHydrateBackoff caps the wait between attempts while the store fails.
	maxHydrateBackoff = 15 * time.Second
)

// ErrDigestMismatch is wrapped by Hydrate's error when the volume does not
// match the object's raw-content digest.
var ErrDigestMismatch = errors.New("volume does not match the image's raw sha256")

// HydrateOptions tune Local.Hydrate. The zero value is usable.
type HydrateOptions struct {
	// Image is the image of the Disk, whose map gives the host offsets
	// (reads are issued in host order). Required.
	Image Image
	// Chunk is the guest bytes of one read (default DefaultHydrateChunk).
	Chunk int64
	// Workers is the reads in flight (default DefaultHydrateWorkers).
	Workers int
	// Bandwidth caps the bytes read per second; 0 means no cap.
	Bandwidth int64
	// RawSHA256 is the lower-case hex sha256 of the whole raw disk; when
	// set, the complete volume is checked against it.
	RawSHA256 string
	// Progress, when set, is called after each read with the guest bytes
	// copied and the total to copy in this pass.
	Progress func(done, total int64)
	// Logger receives retries and the outcome; nil means slog.Default().
	Logger *slog.Logger
}

// hydrateJob is one read: granules [i, j).
type hydrateJob struct{ i, j int64 }

// Hydrate copies every allocated granule that is not present, in the
// image's host order, with Workers reads of Chunk bytes in flight (zero and
// unallocated granules are marked present as holes without a fetch), then
// verifies the volume against RawSHA256 when given and records it
// complete; from then on the Local serves it without the store. Demand
// fills go first: a read waits while any is under way, and for demandQuiet
// after one only one read is in flight. A store error is
// retried with backoff until the store answers again (or ctx ends);
// errors that cannot heal (object changed or gone, corrupt image, the
// volume's own write errors such as a full disk) end the pass. The state
// flushed so far lets a later pass resume.
func (l *Local) Hydrate(ctx context.Context, opts HydrateOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if l.local.Load() {
		return nil
	}
	if opts.Image == nil {
		return errors.New("disk: Hydrate needs the image")
	}
	chunk := max(opts.Chunk, 0)
	if chunk == 0 {
		chunk = DefaultHydrateChunk
	}
	chunkG := max(1, chunk/l.g)
	workers := opts.Workers
	if workers <= 0 {
		workers = DefaultHydrateWorkers
	}
	var lim *limiter
	if opts.Bandwidth > 0 {
		lim = newLimiter(opts.Bandwidth, chunkG*l.g)
	}

	var ext []qcow2.Extent
	err := l.retry(ctx, log, "map", func() error {
		var err error
		ext, err = opts.Image.Map(ctx, 0, l.vsize)
		return err
	})
	if err != nil {
		return err
	}
	jobs, holes, total := l.plan(ext, chunkG)

	// Holes first: no fetch, and they make the volume usable sooner.
	for _, h := range holes {
		if err := l.installHoles(h.i, h.j); err != nil {
			return err
		}
	}

	var done atomic.Int64
	work := make(chan hydrateJob)
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One buffer per worker for the whole pass, of huge pages
			// (hugeBuf): a pooled one is dropped at each GC, and
			// faulting 8 MiB of 4 KiB pages in costs more than the copy
			// into them.
			buf, free := hugeBuf(int(chunkG * l.g))
			defer free()
			for jb := range work {
				n, err := l.hydrateJob(wctx, log, opts.Image, w, jb, lim, &buf)
				if err != nil {
					errc <- err
					cancel()
					return
				}
				d := done.Add(n)
				if opts.Progress != nil {
					opts.Progress(d, total)
				}
			}
		}()
	}
feed:
	for _, jb := range jobs {
		select {
		case work <- jb:
		case <-wctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return errors.Join(err, l.syncErr())
	}
	if err := ctx.Err(); err != nil {
		return errors.Join(err, l.syncErr())
	}
	if err := l.vol.Sync(); err != nil {
		return &TargetError{Err: err}
	}
	if !l.vol.AllPresent() {
		return fmt.Errorf("disk: volume %s: granules still missing after hydration", l.vol.Target())
	}
	return l.finish(ctx, log, opts.RawSHA256)
}

// hugeBuf returns an n-byte buffer of anonymous memory that asks for
// transparent huge pages (MADV_HUGEPAGE), and the function that frees it;
// it falls back to the Go heap. Faulting 2 MiB pages in instead of 4 KiB
// ones is most of the difference between a copy into the buffer and the
// cost of reading the socket alone, most of all in a VM where each fault
// is a trap.
func hugeBuf(n int) ([]byte, func()) {
	const huge = 2 << 20
	size := (n + huge - 1) / huge * huge
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n), func() {}
	}
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE) // advice: without it the buffer still works
	return b[:n], func() { _ = unix.Munmap(b) }
}

// syncErr flushes what was copied, so that a later pass resumes from it.
func (l *Local) syncErr() error {
	if err := l.vol.Sync(); err != nil {
		return &TargetError{Err: err}
	}
	return nil
}

// finish verifies the volume and records it complete.
func (l *Local) finish(ctx context.Context, log *slog.Logger, want string) error {
	want = strings.ToLower(strings.TrimSpace(want))
	switch {
	case want == "":
		log.Info("volume hydrated; the object has no snapfs-raw-sha256, not verified", "volume", l.vol.Target())
	case l.vol.Modified():
		log.Info("volume hydrated; clients wrote to it, so it is not verified against snapfs-raw-sha256", "volume", l.vol.Target())
	default:
		got, err := l.digest(ctx)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("disk: volume %s: %w: sha256 %s, the object's snapfs-raw-sha256 is %s; it is not recorded complete", l.vol.Target(), ErrDigestMismatch, got, want)
		}
		log.Info("volume hydrated and verified", "volume", l.vol.Target(), "sha256", got)
	}
	if err := l.vol.SetComplete(); err != nil {
		return &TargetError{Err: err}
	}
	l.local.Store(true)
	return nil
}

// digest hashes the volume's first virtual-size bytes.
func (l *Local) digest(ctx context.Context) (string, error) {
	h := sha256.New()
	buf := make([]byte, 8<<20)
	for off := int64(0); off < l.vsize; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := min(int64(len(buf)), l.vsize-off)
		if _, err := l.vol.ReadAt(buf[:n], off); err != nil {
			return "", err
		}
		h.Write(buf[:n])
		off += n
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// plan turns the image map into reads in host order (data extents sorted
// by file and host offset, then compressed extents in guest order) of at
// most chunkG granules each, and hole runs; present granules are left out.
// It returns the reads, the holes and the bytes the reads cover.
func (l *Local) plan(ext []qcow2.Extent, chunkG int64) (jobs, holes []hydrateJob, total int64) {
	nb := l.vol.Granules()
	data := make([]bool, nb) // granule holds some data
	for _, e := range ext {
		if e.Kind == qcow2.Data || e.Kind == qcow2.Compressed {
			i, j := l.granules(e.Start, e.Length)
			for k := i; k < j; k++ {
				data[k] = true
			}
		}
	}
	for i := int64(0); i < nb; {
		if data[i] || l.vol.Present(i) {
			i++
			continue
		}
		j := i + 1
		for j < nb && !data[j] && !l.vol.Present(j) {
			j++
		}
		holes = append(holes, hydrateJob{i, j})
		i = j
	}
	order := slices.Clone(ext)
	rank := func(e qcow2.Extent) int {
		if e.Kind == qcow2.Data {
			return 0
		}
		return 1
	}
	slices.SortStableFunc(order, func(a, b qcow2.Extent) int {
		if c := cmp.Compare(rank(a), rank(b)); c != 0 || rank(a) == 1 {
			return c
		}
		if c := strings.Compare(a.File, b.File); c != 0 {
			return c
		}
		return cmp.Compare(a.HostOffset, b.HostOffset)
	})
	for _, e := range order {
		if e.Kind != qcow2.Data && e.Kind != qcow2.Compressed {
			continue
		}
		i, j := l.granules(e.Start, e.Length)
		for k := i; k < j; {
			if !data[k] || l.vol.Present(k) {
				k++
				continue
			}
			s := k
			for k < j && k-s < chunkG && data[k] && !l.vol.Present(k) {
				data[k] = false // scheduled
				k++
			}
			jobs = append(jobs, hydrateJob{s, k})
			total += (min(k*l.g, l.vol.Size()) - s*l.g)
		}
	}
	return jobs, holes, total
}

// installHoles marks the hole granules [i, j) present, zeroing them in the
// volume (a punch on a file: an earlier run may have left bytes there),
// one Zero per run of missing granules, at most holeBatch granules locked
// at a time.
func (l *Local) installHoles(i, j int64) error {
	const holeBatch = 512
	for b := i; b < j; b += holeBatch {
		if err := l.installHoleBatch(b, min(b+holeBatch, j)); err != nil {
			return &TargetError{Err: err}
		}
	}
	return nil
}

func (l *Local) installHoleBatch(i, j int64) error {
	unlock := l.lockRange(i, j)
	defer unlock()
	for k := i; k < j; {
		if l.vol.Present(k) {
			k++
			continue
		}
		e := k + 1
		for e < j && !l.vol.Present(e) {
			e++
		}
		if err := l.vol.Zero(k*l.g, min(e*l.g, l.vol.Size())-k*l.g); err != nil {
			return err
		}
		if err := l.vol.MarkHoles(k, e); err != nil {
			return err
		}
		k = e
	}
	return nil
}

// hydrateJob copies one read's granules that are still missing and
// returns the bytes the job covers; *bp is the worker's buffer, grown as
// needed.
func (l *Local) hydrateJob(ctx context.Context, log *slog.Logger, im Image, worker int, jb hydrateJob, lim *limiter, bp *[]byte) (int64, error) {
	n := min(jb.j*l.g, l.vol.Size()) - jb.i*l.g
	// Skip what demand reads or writes brought meanwhile.
	i := l.vol.NextMissing(jb.i)
	if i >= jb.j {
		return n, nil
	}
	j := jb.j
	for j > i && l.vol.Present(j-1) {
		j--
	}
	err := l.retry(ctx, log, "hydrate", func() error {
		for l.demand.Load() > 0 || (worker > 0 && time.Since(time.Unix(0, l.lastDemand.Load())) < demandQuiet) {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Millisecond):
			}
		}
		if lim != nil {
			if err := lim.wait(ctx, (j-i)*l.g); err != nil {
				return err
			}
		}
		lo := i * l.g
		need := int(min(j*l.g, l.vol.Size()) - lo)
		if cap(*bp) < need {
			*bp = make([]byte, need)
		}
		// The image straight into the buffer: no copy through the Disk.
		buf, lo, err := l.fetchInto(ctx, im.ReadAtContext, (*bp)[:need], lo)
		if err != nil {
			return err
		}
		return l.install(i, j, buf, lo, false)
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// permanent reports errors that retrying cannot heal.
func permanent(err error) bool {
	var te *TargetError
	return errors.As(err, &te) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, objstore.ErrChanged) || errors.Is(err, objstore.ErrNotFound) ||
		errors.Is(err, objstore.ErrForbidden) || errors.Is(err, qcow2.ErrCorrupt) ||
		errors.Is(err, qcow2.ErrUnsupported) || errors.Is(err, os.ErrClosed)
}

// retry runs f until it succeeds or fails permanently, waiting between
// attempts (doubling from 250 ms to maxHydrateBackoff).
func (l *Local) retry(ctx context.Context, log *slog.Logger, what string, f func() error) error {
	wait := 250 * time.Millisecond
	for {
		err := f()
		if err == nil || permanent(err) {
			return err
		}
		log.Warn("hydration: store unavailable, retrying", "op", what, "volume", l.vol.Target(), "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(wait):
		}
		wait = min(2*wait, maxHydrateBackoff)
	}
}

// limiter is a token bucket of rate bytes per second; a wait may take the
// bucket into debt, which later waits pay back.
type limiter struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newLimiter(rate, burst int64) *limiter {
	return &limiter{rate: float64(rate), burst: float64(max(burst, 1)), last: time.Now()}
}

func (b *limiter) wait(ctx context.Context, n int64) error {
	b.mu.Lock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens -= float64(n)
	var d time.Duration
	if b.tokens < 0 {
		d = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	if d == 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
