package qcow2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/snapfs/snapfs/objstore"
)

// A well-laid-out image must turn one 4 MiB read into one store read, for
// uncompressed and for compressed clusters.
func TestReadCoalescing(t *testing.T) {
	needQemu(t)
	for _, compressed := range []bool{false, true} {
		name := "data"
		if compressed {
			name = "compressed"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			src := make([]byte, 16<<20)
			for i := 0; i < len(src); i += 64 {
				copy(src[i:], []byte("well laid out clusters read with one GET per four MiB.....\n"))
				src[i] = byte(i >> 12)
			}
			if !compressed {
				rand.New(rand.NewSource(1)).Read(src[:8<<20])
			}
			if err := os.WriteFile(dir+"/src.raw", src, 0o644); err != nil {
				t.Fatal(err)
			}
			args := []string{"convert", "-f", "raw", "-O", "qcow2"}
			if compressed {
				args = append(args, "-c")
			}
			run(t, dir, "qemu-img", append(args, "src.raw", "img.qcow2")...)
			st := newDirStore(dir)
			im, err := Open(context.Background(), st, "img.qcow2", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			buf := make([]byte, 4<<20)
			for off := int64(0); off < im.Size(); off += int64(len(buf)) {
				if _, err := im.ReadAt(buf, off); err != nil { // warms the L2 cache
					t.Fatal(err)
				}
				st.resetLog()
				if _, err := im.ReadAt(buf, off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, src[off:off+int64(len(buf))]) {
					t.Fatalf("content differs at %d", off)
				}
				if log := st.resetLog(); len(log) != 1 {
					t.Fatalf("4 MiB read at %d took %d store reads: %+v", off, len(log), log)
				}
			}
		})
	}
}

func TestConcurrentReaders(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	writeRaw(t, dir+"/src.raw", 8<<20, 11)
	run(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=16k", "src.raw", "base.qcow2")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2", "8M")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 1 1M 1M", "write -z 3M 512k", "write -P 2 6M 12k")
	_, want := rawSHA(t, dir, "img.qcow2")
	// A small L2 cache forces evictions while readers race.
	im, err := Open(context.Background(), newDirStore(dir), "img.qcow2", &Options{L2CacheBytes: 8 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 100; i++ {
				off := rng.Int63n(im.Size())
				buf := make([]byte, rng.Intn(200<<10)+1)
				n, err := im.ReadAt(buf, off)
				if err != nil && err != io.EOF {
					errs <- err
					return
				}
				if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
					errs <- errors.New("content differs")
					return
				}
			}
		}(int64(w))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := im.l2.len(); n > 2 {
		t.Fatalf("L2 cache holds %d tables, bound is 2", n)
	}
}

// Concurrent misses of one L2 table share a single fetch.
func TestL2Singleflight(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 7 0 4M")
	st := newDirStore(dir)
	im, err := Open(context.Background(), st, "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	l2off, err := decodeL1Entry(be64(im.l1[0:]), &im.geo)
	if err != nil || l2off == 0 {
		t.Fatal(l2off, err)
	}
	st.delay = 20 * time.Millisecond
	st.resetLog()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			buf := make([]byte, 512)
			if _, err := im.ReadAt(buf, int64(i)*65536); err != nil || buf[0] != 7 {
				t.Error(err, buf[0])
			}
		}(i)
	}
	wg.Wait()
	n := 0
	for _, r := range st.resetLog() {
		if r.off == l2off {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("L2 table fetched %d times by 16 concurrent readers", n)
	}
}

// TestOpenOneRead: for an image laid out by qemu-img, Open reads the
// header and the L1 table with one read.
func TestOpenOneRead(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "64G")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 9 63G 64k")
	st := newDirStore(dir)
	im, err := Open(context.Background(), st, "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if log := st.resetLog(); len(log) != 1 {
		t.Fatalf("Open took %d reads: %+v", len(log), log)
	}
	buf := make([]byte, 4096)
	if _, err := im.ReadAt(buf, 63<<30); err != nil || buf[0] != 9 {
		t.Fatalf("read at 63 GiB: %v, %d", err, buf[0])
	}
}

// TestMapPrefetchesL2: a walk of many L2 tables reads them in parallel,
// one round trip per batch, and still agrees with qemu-img map.
func TestMapPrefetchesL2(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	// 4 KiB clusters: one L2 table per 2 MiB; 48 tables.
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "96M")
	var cmds []string
	for i := 0; i < 48; i++ {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 4k", i+1, int64(i)<<21+int64(i)<<12))
	}
	qio(t, dir, "img.qcow2", "qcow2", cmds...)
	st := newDirStore(dir)
	im, err := Open(context.Background(), st, "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	st.delay = 5 * time.Millisecond
	st.resetLog()
	compareMap(t, dir, "img.qcow2", im)
	if n := len(st.resetLog()); n != 48 {
		t.Fatalf("Map read %d times, want the 48 L2 tables once each", n)
	}
	if m := st.maxInflight.Load(); m < ioParallelism {
		t.Fatalf("at most %d L2 reads in flight, want %d", m, ioParallelism)
	}

	// A store that fails while the tables are prefetched: Map says so,
	// naming the image.
	im2, err := Open(context.Background(), st, "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im2.Close()
	if err := os.Remove(filepath.Join(dir, "img.qcow2")); err != nil {
		t.Fatal(err)
	}
	var qe *Error
	if _, err := im2.Map(context.Background(), 0, im2.Size()); !errors.As(err, &qe) || qe.URL != im2.URL() || !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("Map of a vanished object: %v", err)
	}
}

func TestReadAtEOFAndBounds(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1000k")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 9 960k 40k")
	im, err := Open(context.Background(), newDirStore(dir), "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	n, err := im.ReadAt(buf, im.Size()-100)
	if n != 100 || err != io.EOF || buf[99] != 9 {
		t.Fatalf("ReadAt across the end = %d, %v", n, err)
	}
	if n, err := im.ReadAt(buf, im.Size()); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at the end = %d, %v", n, err)
	}
	if _, err := im.ReadAt(buf, -1); err == nil {
		t.Fatal("negative offset accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	im.l2.clear()
	if _, err := im.ReadAtContext(ctx, buf, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled read: %v", err)
	}
	im.Close()
	if _, err := im.ReadAt(buf, 0); err == nil {
		t.Fatal("read after Close succeeded")
	}
}
