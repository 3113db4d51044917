package disk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/internal/bufpool"
	"github.com/snapfs/snapfs/internal/zeros"
)

// openLocal serves img through a Local over a new (or existing) volume
// at target, without a memory tier.
func openLocal(t *testing.T, img string, target string, writable bool, vopts cache.VolumeOptions) (*Local, *testDisk) {
	t.Helper()
	td := open(t, img, -1, Options{})
	g := max(td.im.ClusterSize(), 64<<10)
	vol, err := cache.OpenVolume(target, cache.VolumeSource{URL: td.im.URL(), ETag: "e1", VirtualSize: td.Size(), Granularity: g}, vopts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewLocal(td.Disk, vol, writable)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, td
}

func readLocal(t *testing.T, d Device) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(context.Background(), b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func allocated(t *testing.T, path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// Demand reads answer the image's bytes, fetch each granule once, and
// leave the image's holes as holes; hydration then completes the volume,
// which is verified and served with the store gone.
func TestLocalCopyOnReadAndHydrate(t *testing.T) {
	for _, cluster := range []int{4096, 65536, 1 << 20} {
		img := mixedImage(t, cluster)
		target := filepath.Join(t.TempDir(), "vol.raw")
		l, td := openLocal(t, img.path, target, false, cache.VolumeOptions{})
		ctx := context.Background()
		rng := rand.New(rand.NewSource(1))
		for range 200 {
			off := rng.Int63n(l.Size())
			n := min(rng.Int63n(300<<10)+1, l.Size()-off)
			p := make([]byte, n)
			if _, err := l.ReadAt(ctx, p, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, img.raw[off:off+n]) {
				t.Fatalf("cluster %d: read %d at %d differs from qemu-img", cluster, n, off)
			}
		}
		before := td.Stats().BytesFetched
		readLocal(t, l) // partly present now
		afterFull := td.Stats().BytesFetched
		readLocal(t, l)
		if again := td.Stats().BytesFetched; again != afterFull {
			t.Fatalf("cluster %d: a second full read fetched %d bytes", cluster, again-afterFull)
		}
		if afterFull < before {
			t.Fatal("counter went back")
		}
		var last [2]int64
		err := l.Hydrate(ctx, HydrateOptions{Image: td.im, RawSHA256: sha(img.raw), Progress: func(d, tot int64) { last = [2]int64{d, tot} }})
		if err != nil {
			t.Fatal(err)
		}
		if last[0] != last[1] {
			t.Fatalf("progress ended at %v", last)
		}
		if !l.IsLocal() || !l.Volume().Complete() {
			t.Fatal("not complete after Hydrate")
		}
		got, _ := os.ReadFile(target)
		if !bytes.Equal(got, img.raw) {
			t.Fatalf("cluster %d: volume differs from qemu-img convert", cluster)
		}
		// Sparse where the image is: at most the non-zero 4 KiB blocks of the raw disk.
		var nz int64
		for off := 0; off < len(img.raw); off += 4096 {
			if !zeros.Is(img.raw[off:min(off+4096, len(img.raw))]) {
				nz += 4096
			}
		}
		if a := allocated(t, target); a > nz+64<<10 {
			t.Fatalf("cluster %d: volume allocates %d bytes, the raw disk has %d bytes of non-zero blocks", cluster, a, nz)
		}
		// Complete: no store access.
		td.fault.fail.Store(&errInjected)
		if got := readLocal(t, l); !bytes.Equal(got, img.raw) {
			t.Fatal("complete volume read differs")
		}
		if _, err := l.Extents(ctx, 0, l.Size()); err != nil {
			t.Fatalf("extents of a complete volume touched the store: %v", err)
		}
	}
}

// Writes during hydration survive it: partial granules are filled from the
// image first, hydration never overwrites them, and the rest equals the image.
func TestLocalWritesSurviveHydration(t *testing.T) {
	img := mixedImage(t, 65536)
	target := filepath.Join(t.TempDir(), "vol.raw")
	l, td := openLocal(t, img.path, target, true, cache.VolumeOptions{})
	ctx := context.Background()
	want := bytes.Clone(img.raw)
	write := func(off int64, n int, b byte) {
		p := bytes.Repeat([]byte{b}, n)
		if _, err := l.WriteAt(ctx, p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	zero := func(off, n int64, trim bool) {
		var err error
		if trim {
			err = l.Trim(ctx, off, n)
		} else {
			err = l.WriteZeroes(ctx, off, n)
		}
		if err != nil {
			t.Fatal(err)
		}
		clear(want[off : off+n])
	}
	td.fault.delay = 2 * time.Millisecond
	var wg sync.WaitGroup
	var herr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		herr = l.Hydrate(ctx, HydrateOptions{Image: td.im, Chunk: 1 << 20, Workers: 2, RawSHA256: sha(img.raw)})
	}()
	write(100, 10, 0xab)               // inside data, partial granule
	write(9*mib+65536-7, 70000, 0xcd)  // across granules
	write(24*mib+1000, 5, 0xef)        // in a zero range
	write(31*mib, 128<<10, 0x42)       // whole granules
	zero(2*mib+300, 1000, false)       // partial zeroing
	zero(10*mib, 256<<10, true)        // whole granules trimmed
	write(int64(len(want))-3, 3, 0x77) // the partial last granule
	wg.Wait()
	if herr != nil {
		t.Fatal(herr)
	}
	if !l.Volume().Modified() {
		t.Fatal("writes did not mark the volume modified")
	}
	if got := readLocal(t, l); !bytes.Equal(got, want) {
		t.Fatal("volume after hydration differs from image + writes")
	}
	if err := l.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, want) {
		t.Fatal("target file differs from image + writes")
	}
}

// Hydration interrupted, then resumed on a reopened volume, fetches only
// what the first pass had not flushed; the store failing makes it wait and
// retry, and demand reads fail meanwhile.
func TestLocalResumeAndStoreOutage(t *testing.T) {
	img := mixedImage(t, 65536)
	target := filepath.Join(t.TempDir(), "vol.raw")
	l, td := openLocal(t, img.path, target, false, cache.VolumeOptions{FlushBytes: 1 << 20})
	td.fault.delay = 5 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	err := l.Hydrate(ctx, HydrateOptions{Image: td.im, Chunk: 256 << 10, Workers: 1, Progress: func(d, tot int64) {
		if d > tot/3 {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted hydration: %v", err)
	}
	first := td.Stats().StoreBytes
	present := l.Volume().PresentBytes()
	l.Close()

	l2, td2 := openLocal(t, img.path, target, false, cache.VolumeOptions{})
	if got := l2.Volume().PresentBytes(); got != present {
		t.Fatalf("reopened volume has %d bytes present, the first had %d", got, present)
	}
	td2.fault.fail.Store(&errInjected)
	done := make(chan error, 1)
	go func() {
		done <- l2.Hydrate(context.Background(), HydrateOptions{Image: td2.im, Chunk: 1 << 20, RawSHA256: sha(img.raw)})
	}()
	time.Sleep(300 * time.Millisecond)
	p := make([]byte, 4096)
	if _, err := l2.ReadAt(context.Background(), p, 31*mib); !errors.Is(err, errInjected) {
		t.Fatalf("demand read during the outage: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("hydration ended during the outage: %v", err)
	default:
	}
	td2.fault.fail.Store(nil)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("hydration did not resume after the outage")
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img.raw) {
		t.Fatal("resumed volume differs")
	}
	var alloc int64
	for _, e := range qemuMap(t, img.path) {
		if e.Data {
			alloc += e.Length
		}
	}
	second := td2.Stats().StoreBytes
	t.Logf("allocated %d, fetched %d + %d", alloc, first, second)
	if first+second > alloc+alloc/20+2<<20 {
		t.Fatalf("fetched %d + %d bytes for %d allocated", first, second, alloc)
	}
}

// A volume whose content does not match the object's digest is not
// recorded complete.
func TestLocalDigestMismatch(t *testing.T) {
	img := mixedImage(t, 65536)
	target := filepath.Join(t.TempDir(), "vol.raw")
	l, td := openLocal(t, img.path, target, false, cache.VolumeOptions{})
	err := l.Hydrate(context.Background(), HydrateOptions{Image: td.im, RawSHA256: sha([]byte("other"))})
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("got %v", err)
	}
	if l.Volume().Complete() || l.IsLocal() {
		t.Fatal("recorded complete despite the mismatch")
	}
	if _, err := NewLocal(nil, l.Volume(), false); err == nil {
		t.Fatal("an incomplete volume served without its image")
	}
}

// A fill fetched before a client wrote its granule (the race of a
// hydration read or a demand fill with a write) does not overwrite the
// write when it is installed, and a reader of the fill gets the write.
func TestLocalFillNeverOverwritesWrite(t *testing.T) {
	img := mixedImage(t, 65536)
	target := filepath.Join(t.TempDir(), "vol.raw")
	l, _ := openLocal(t, img.path, target, true, cache.VolumeOptions{})
	ctx := context.Background()
	bp, lo, err := l.fetch(ctx, 0, 16) // granules [0, 16), as hydration would
	if err != nil {
		t.Fatal(err)
	}
	defer bufpool.Put(bp)
	buf := *bp
	w := bytes.Repeat([]byte{0x99}, 100)
	if _, err := l.WriteAt(ctx, w, 3*65536+10); err != nil {
		t.Fatal(err)
	}
	if err := l.install(0, 16, buf, lo, true); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(img.raw[:16*65536])
	copy(want[3*65536+10:], w)
	if !bytes.Equal(buf, want) {
		t.Fatal("the reader of the fill did not get the write")
	}
	got := make([]byte, 16*65536)
	if _, err := l.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the fill overwrote the write")
	}
}

// lockRange takes the stripes of ranges that wrap around the stripe table
// in one order, so range lockers and single-granule lockers never
// deadlock, and a range excludes a single lock of any of its granules.
func TestLocalLockRange(t *testing.T) {
	l := &Local{}
	done := make(chan struct{})
	var inside atomic.Int32
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewSource(int64(w)))
				for range 2000 {
					i := rng.Int63n(4 * lockStripes)
					if w%2 == 0 {
						unlock := l.lockRange(i, i+1+rng.Int63n(lockStripes+10))
						unlock()
						continue
					}
					m := l.lock(i)
					m.Unlock()
				}
			}()
		}
		wg.Wait()
		// Mutual exclusion: granule 5 is inside [lockStripes-2, lockStripes+6), which wraps.
		unlock := l.lockRange(lockStripes-2, lockStripes+6)
		got := make(chan struct{})
		go func() {
			m := l.lock(5)
			inside.Add(1)
			m.Unlock()
			close(got)
		}()
		time.Sleep(50 * time.Millisecond)
		if inside.Load() != 0 {
			t.Error("granule 5 locked while a wrapping range held it")
		}
		unlock()
		<-got
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("lockRange deadlocked")
	}
}
