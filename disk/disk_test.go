package disk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/snapfs/snapfs/qcow2"
)

const mib = 1 << 20

// readAll reads the whole disk with ReadAt in chunks of chunk bytes.
func readAll(t testing.TB, d Device, chunk int) []byte {
	t.Helper()
	out := make([]byte, d.Size())
	for off := 0; off < len(out); off += chunk {
		end := min(off+chunk, len(out))
		n, err := d.ReadAt(context.Background(), out[off:end], int64(off))
		if err != nil || n != end-off {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", end-off, off, n, err)
		}
	}
	return out
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func checkSame(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatalf("%s: differs from qemu-img convert -O raw, first at byte %d (%d vs %d bytes)", what, firstDiff(got, want), len(got), len(want))
	}
}

// A full read equals qemu-img convert -O raw, for several cluster sizes,
// with and without the memory tier, in aligned and odd chunks.
func TestFullReadMatchesQemu(t *testing.T) {
	for _, cluster := range []int{4096, 65536, 2 * mib} {
		img := mixedImage(t, cluster)
		for _, cacheBytes := range []int64{-1, 0} {
			t.Run(fmt.Sprintf("cluster=%d/cache=%v", cluster, cacheBytes >= 0), func(t *testing.T) {
				t.Parallel()
				d := open(t, img.path, cacheBytes, Options{})
				if d.Size() != int64(len(img.raw)) {
					t.Fatalf("Size %d, qemu says %d", d.Size(), len(img.raw))
				}
				for _, chunk := range []int{4 * mib, 4096 + 512, 200001} {
					checkSame(t, fmt.Sprintf("chunk %d", chunk), readAll(t, d, chunk), img.raw)
				}
			})
		}
	}
}

// A backing chain reads like qemu reads it.
func TestBackingChain(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	randomRaw(t, raw, 16*mib, 7, [2]int64{0, 6 * mib}, [2]int64{10 * mib, 12 * mib})
	base := filepath.Join(dir, "base.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
	top := filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 300k", "-c", "write -z 4M 1M", "-c", "write -c -P 0x33 11M 128k", top)
	want := qemuRaw(t, top)
	d := open(t, top, 0, Options{})
	checkSame(t, "chain", readAll(t, d, 128<<10), want)
	checkSame(t, "chain again (cached)", readAll(t, d, 1*mib), want)
}

// Random unaligned reads from 16 goroutines equal the raw bytes, with a
// roomy cache, a 1 MiB cache and none.
func TestRandomConcurrentReads(t *testing.T) {
	img := mixedImage(t, 65536)
	for _, tc := range []struct {
		name  string
		cache int64
	}{{"cache", 0}, {"tiny-cache", 1 * mib}, {"no-cache", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := open(t, img.path, tc.cache, Options{})
			size := d.Size()
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for g := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewSource(int64(g)))
					for range 150 {
						off := rng.Int63n(size)
						n := min(int64(1+rng.Intn(300000)), size-off)
						if g%4 == 0 {
							n = min(int64(1+rng.Intn(4096)), size-off)
						}
						p := make([]byte, n)
						if _, err := d.ReadAt(context.Background(), p, off); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(p, img.raw[off:off+n]) {
							errs <- fmt.Errorf("%d bytes at %d differ from raw at %d", n, off, off+int64(firstDiff(p, img.raw[off:off+n])))
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			checkSame(t, "full read after", readAll(t, d, 1*mib), img.raw)
		})
	}
}

// A 1 MiB cache holds 16 blocks: sequential scans and random reads from 16
// goroutines still return the right bytes (nothing depends on a hit).
func TestTinyCacheConcurrent(t *testing.T) {
	img := mixedImage(t, 4096)
	d := open(t, img.path, 1*mib, Options{})
	size := d.Size()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(100 + g)))
			p := make([]byte, 4096+int64(g))
			start := rng.Int63n(size / 2)
			for off := start; off < start+1*mib; off += int64(len(p)) {
				if g%2 == 1 {
					off = rng.Int63n(size - int64(len(p)))
				}
				if _, err := d.ReadAt(context.Background(), p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, img.raw[off:off+int64(len(p))]) {
					errs <- fmt.Errorf("goroutine %d: %d bytes at %d differ", g, len(p), off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if s := d.Stats(); s.Misses == 0 || s.Fetches == 0 {
		t.Fatalf("stats %+v: no fetches", s)
	}
}

// Holes and zero clusters are served without a single store read.
func TestHolesNotFetched(t *testing.T) {
	img := mixedImage(t, 65536)
	for _, cacheBytes := range []int64{-1, 0} {
		d := open(t, img.path, cacheBytes, Options{})
		d.warm(t)
		before := d.gets()
		ranges := [][2]int64{
			{1 * mib, 1*mib + 512<<10},     // zero clusters over data
			{3*mib + 64<<10, 5 * mib},      // unallocated
			{6 * mib, 7*mib + 768<<10},     // unallocated, then compressed up to 8M
			{17*mib + 64<<10, 20 * mib},    // unallocated
			{24 * mib, 25 * mib},           // zero clusters over a hole
			{20*mib + 64<<10, 24*mib + 10}, // unallocated then zero
		}
		for _, r := range ranges {
			for _, chunk := range []int64{4096, 1000 + r[0]%7, r[1] - r[0]} {
				for off := r[0]; off < r[1]; off += chunk {
					p := bytes.Repeat([]byte{0xee}, int(min(chunk, r[1]-off)))
					if _, err := d.ReadAt(context.Background(), p, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(p, img.raw[off:off+int64(len(p))]) || bytes.ContainsFunc(p, func(r rune) bool { return r != 0 }) {
						t.Fatalf("%d bytes at %d are not zeros", len(p), off)
					}
				}
			}
		}
		if got := d.gets() - before; got != 0 {
			t.Fatalf("cache %v: reading holes and zero clusters made %d store reads", cacheBytes >= 0, got)
		}
		if s := d.Stats(); s.ZeroBytes == 0 || s.Fetches != 0 {
			t.Fatalf("stats %+v: want zero bytes served and no fetch", s)
		}
	}
}

// Sixteen readers of the same block at once share one fetch.
func TestSingleflight(t *testing.T) {
	img := mixedImage(t, 65536)
	for _, cacheBytes := range []int64{-1, 0} {
		d := open(t, img.path, cacheBytes, Options{})
		d.warm(t)
		d.fault.delay = 300 * time.Millisecond // all 16 arrive while the fetch is under way
		before := d.gets()
		const off = 9*mib + 12345
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make(chan error, 16)
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, 4096)
				<-start
				if _, err := d.ReadAt(context.Background(), p, off); err != nil {
					errs <- err
				} else if !bytes.Equal(p, img.raw[off:off+4096]) {
					errs <- errors.New("wrong bytes")
				}
			}()
		}
		close(start)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		s := d.Stats()
		if got := d.gets() - before; got != 1 || s.Fetches != 1 {
			t.Fatalf("cache %v: 16 concurrent reads of one block made %d GETs, %d fetches; want 1", cacheBytes >= 0, got, s.Fetches)
		}
		if s.Shared != 15 {
			t.Errorf("Shared = %d, want 15", s.Shared)
		}
	}
}

// allDataImage makes a QCOW2 image of size bytes of random data.
func allDataImage(t testing.TB, size int64) image {
	t.Helper()
	needQemu(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "src.raw")
	randomRaw(t, raw, size, 42, [2]int64{0, size})
	img := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
	return image{path: img, raw: qemuRaw(t, img)}
}

// A sequential scan in 4 KiB reads fetches in windows that double up to
// MaxWindow, each split in windowPieces parallel fetches: a few dozen
// GETs for 1024 blocks, every byte fetched once.
func TestSequentialWindow(t *testing.T) {
	img := allDataImage(t, 64*mib)
	d := open(t, img.path, 128*mib, Options{}) // room for all: nothing is evicted and fetched again
	got := readAll(t, d, 4096)
	checkSame(t, "4 KiB scan", got, img.raw)
	settle(d.Disk)
	s := d.Stats()
	blocks := d.Size() / d.BlockSize()
	// Windows of 256K, 512K, ... 16M cover 31.75 MiB in 1+2+4+4+4+4+4
	// fetches, two more windows and a tail cover the rest; the other GETs
	// are the header, L1 and L2 tables.
	if s.Fetches > 36 || s.Gets > 40 {
		t.Fatalf("4 KiB scan of %d blocks: %d fetches, %d GETs (%+v)", blocks, s.Fetches, s.Gets, s)
	}
	if s.BytesFetched != d.Size() {
		t.Fatalf("fetched %d bytes for a %d-byte disk", s.BytesFetched, d.Size())
	}
	t.Logf("%d blocks: %d fetches, %d GETs, %d read ahead bytes, %d shared", blocks, s.Fetches, s.Gets, s.ReadaheadBytes, s.Shared)
}

// Two sequential readers interleaving their requests are both detected.
func TestInterleavedStreams(t *testing.T) {
	img := allDataImage(t, 32*mib)
	d := open(t, img.path, 0, Options{})
	half := d.Size() / 2
	p := make([]byte, 16<<10)
	for off := int64(0); off < half; off += int64(len(p)) {
		for _, base := range []int64{0, half} {
			if _, err := d.ReadAt(context.Background(), p, base+off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, img.raw[base+off:base+off+int64(len(p))]) {
				t.Fatalf("bytes at %d differ", base+off)
			}
		}
	}
	// Each stream alone takes 19 fetches for its 16 MiB.
	if s := d.Stats(); s.Fetches > 44 {
		t.Fatalf("two interleaved scans of %d blocks: %d fetches", d.Size()/d.BlockSize(), s.Fetches)
	}
}

// A failing store fails the read with its error; once it recovers the
// same read succeeds.
func TestStoreFailureThenRecovery(t *testing.T) {
	img := mixedImage(t, 65536)
	for _, cacheBytes := range []int64{-1, 0} {
		d := open(t, img.path, cacheBytes, Options{})
		d.warm(t)
		err := errInjected
		d.fault.fail.Store(&err)
		const off, n = 9*mib + 100, 200000
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, n)
				_, err := d.ReadAt(context.Background(), p, off)
				if !errors.Is(err, errInjected) {
					t.Errorf("read during the fault: %v, want the store's error", err)
				}
				var qe *qcow2.Error
				if !errors.As(err, &qe) {
					t.Errorf("read during the fault: %T %v, want a *qcow2.Error", err, err)
				}
			}()
		}
		wg.Wait()
		// Holes need no store.
		p := make([]byte, 4096)
		if _, err := d.ReadAt(context.Background(), p, 6*mib+512<<10); err != nil {
			t.Fatalf("hole during the fault: %v", err)
		}
		d.fault.fail.Store(nil)
		p = make([]byte, n)
		if _, err := d.ReadAt(context.Background(), p, off); err != nil {
			t.Fatalf("read after the fault: %v", err)
		}
		if !bytes.Equal(p, img.raw[off:off+n]) {
			t.Fatal("read after the fault returned wrong bytes")
		}
		if s := d.Stats(); s.FetchErrors == 0 {
			t.Fatalf("stats %+v: no fetch error counted", s)
		}
		checkSame(t, "full read after the fault", readAll(t, d, 1*mib), img.raw)
	}
}

// A read whose context ends returns at once; the disk stays usable.
func TestContextCancel(t *testing.T) {
	img := mixedImage(t, 65536)
	d := open(t, img.path, 0, Options{})
	d.warm(t)
	d.fault.delay = 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	p := make([]byte, 4096)
	if _, err := d.ReadAt(ctx, p, 10*mib); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt with an expiring context: %v", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("ReadAt returned after %v, not when its context ended", el)
	}
	if _, err := d.ReadAt(ctx, p, 10*mib); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt with an expired context: %v", err)
	}
	if _, err := d.ReadAt(context.Background(), p, 10*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, img.raw[10*mib:10*mib+4096]) {
		t.Fatal("wrong bytes after a cancelled read")
	}
}

// Extents agree with qemu-img map on data versus hole, and cover exactly
// the range asked.
func TestExtentsMatchQemuMap(t *testing.T) {
	for _, cluster := range []int{4096, 65536} {
		img := mixedImage(t, cluster)
		d := open(t, img.path, -1, Options{})
		type span struct {
			start, end int64
			data       bool
		}
		merge := func(out []span, s span) []span {
			if k := len(out); k > 0 && out[k-1].data == s.data && out[k-1].end == s.start {
				out[k-1].end = s.end
				return out
			}
			return append(out, s)
		}
		var want []span
		for _, e := range qemuMap(t, img.path) {
			want = merge(want, span{e.Start, e.Start + e.Length, e.Data})
		}
		ext, err := d.Extents(context.Background(), 0, d.Size())
		if err != nil {
			t.Fatal(err)
		}
		var got []span
		for _, e := range ext {
			if e.Hole != e.Zero {
				t.Fatalf("extent %+v: hole without zero or zero without hole", e)
			}
			got = merge(got, span{e.Offset, e.Offset + e.Length, !e.Hole})
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("cluster %d:\nExtents      %v\nqemu-img map %v", cluster, got, want)
		}
		if len(got) != len(ext) {
			t.Fatalf("Extents did not merge adjacent extents: %+v", ext)
		}
		// A sub-range is covered exactly.
		const off, n = 5*mib + 100, 3*mib + 7
		ext, err = d.Extents(context.Background(), off, n)
		if err != nil {
			t.Fatal(err)
		}
		pos := int64(off)
		for _, e := range ext {
			if e.Offset != pos || e.Length <= 0 {
				t.Fatalf("sub-range extents %+v: gap or overlap at %d", ext, pos)
			}
			pos += e.Length
		}
		if pos != off+n {
			t.Fatalf("sub-range extents end at %d, want %d", pos, off+n)
		}
	}
}

// Prefetch fills the cache: the reads that follow make no GET.
func TestPrefetch(t *testing.T) {
	img := mixedImage(t, 65536)
	d := open(t, img.path, 0, Options{})
	if err := d.Prefetch(context.Background(), 0, d.Size()); err != nil {
		t.Fatal(err)
	}
	before, s := d.gets(), d.Stats()
	checkSame(t, "after Prefetch", readAll(t, d, 64<<10), img.raw)
	if got := d.gets() - before; got != 0 {
		t.Fatalf("reads after Prefetch of the whole disk made %d GETs (%+v)", got, s)
	}
	// Without a memory tier Prefetch has nowhere to put data.
	nd := open(t, img.path, -1, Options{})
	nd.warm(t)
	before = nd.gets()
	if err := nd.Prefetch(context.Background(), 0, nd.Size()); err != nil {
		t.Fatal(err)
	}
	if got := nd.gets() - before; got != 0 {
		t.Fatalf("Prefetch without a cache made %d GETs", got)
	}
}

func TestReadOnlyAndRanges(t *testing.T) {
	img := mixedImage(t, 65536)
	d := open(t, img.path, 0, Options{})
	ctx := context.Background()
	if !d.ReadOnly() {
		t.Fatal("ReadOnly = false")
	}
	if _, err := d.WriteAt(ctx, []byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("WriteAt: %v", err)
	}
	if err := d.Trim(ctx, 0, 4096); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Trim: %v", err)
	}
	if err := d.WriteZeroes(ctx, 0, 4096); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("WriteZeroes: %v", err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	size := d.Size()
	for _, r := range [][2]int64{{-1, 1}, {size, 1}, {size - 10, 11}, {size + 1, 0}} {
		if _, err := d.ReadAt(ctx, make([]byte, r[1]), r[0]); !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("ReadAt(%d bytes at %d): %v, want ErrOutOfRange", r[1], r[0], err)
		}
		if _, err := d.Extents(ctx, r[0], r[1]); r[1] > 0 && !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("Extents(%d, %d): %v, want ErrOutOfRange", r[0], r[1], err)
		}
		if err := d.Prefetch(ctx, r[0], r[1]); r[1] > 0 && !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("Prefetch(%d, %d): %v, want ErrOutOfRange", r[0], r[1], err)
		}
	}
	if n, err := d.ReadAt(ctx, nil, size); n != 0 || err != nil {
		t.Fatalf("empty read at the end: %d, %v", n, err)
	}
	p := make([]byte, 10)
	if _, err := d.ReadAt(ctx, p, size-10); err != nil || !bytes.Equal(p, img.raw[size-10:]) {
		t.Fatalf("last 10 bytes: %v", err)
	}
}

// Close waits for the fetches under way; the disk then refuses reads.
func TestClose(t *testing.T) {
	img := mixedImage(t, 65536)
	d := open(t, img.path, 0, Options{})
	d.warm(t)
	d.fault.delay = 200 * time.Millisecond
	done := make(chan error, 1)
	go func() {
		_, err := d.ReadAt(context.Background(), make([]byte, 4096), 10*mib)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil {
		t.Log("the read under way finished before Close")
	}
	if _, err := d.ReadAt(context.Background(), make([]byte, 1), 0); err == nil {
		t.Fatal("ReadAt after Close succeeded")
	}
	if d.Close() != nil {
		t.Fatal("second Close failed")
	}
}
