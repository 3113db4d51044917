package disk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

func needQemu(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not in PATH (scripts/test-deps installs qemu-utils)", tool)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// randomRaw writes a raw file of size bytes holding random data in the
// ranges of data ([start, end) pairs) and zeros elsewhere.
func randomRaw(t testing.TB, path string, size int64, seed int64, data ...[2]int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(seed))
	for _, r := range data {
		b := make([]byte, r[1]-r[0])
		rng.Read(b)
		if _, err := f.WriteAt(b, r[0]); err != nil {
			t.Fatal(err)
		}
	}
}

// image describes a test image: its path and the raw bytes qemu reads.
type image struct {
	path string
	raw  []byte
}

// qemuRaw converts img to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, img string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-O", "raw", img, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mixedImage makes a QCOW2 image with the given cluster size (bytes) of
// 32 MiB + 1536 bytes (so the last block is partial) holding random data
// ranges, unallocated ranges, zero clusters and compressed clusters.
func mixedImage(t testing.TB, cluster int) image {
	t.Helper()
	needQemu(t)
	dir := t.TempDir()
	size := int64(32*mib + 1536)
	raw := filepath.Join(dir, "src.raw")
	randomRaw(t, raw, size, int64(cluster),
		[2]int64{0, 3*mib + 4096},
		[2]int64{5*mib + 777, 6 * mib},
		[2]int64{9 * mib, 17*mib + 100},
		[2]int64{20 * mib, 20*mib + 64*1024},
		[2]int64{31 * mib, size},
	)
	img := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size="+strconv.Itoa(cluster), raw, img)
	// Compressed writes must cover whole unallocated clusters.
	c1, c2 := max(256<<10, cluster), max(128<<10, cluster)
	run(t, "qemu-io", "-f", "qcow2",
		"-c", "write -z 1M 512k", // zero clusters over data
		"-c", "write -z 24M 1M", // zero clusters over a hole
		"-c", fmt.Sprintf("write -c -P 0x5a %d %d", 8*mib-c1, c1), // compressed, ending at 8M
		"-c", fmt.Sprintf("write -c -P 0xa5 %d %d", 26*mib, c2),
		"-c", "write -P 0x11 28M 4k",
		img)
	return image{path: img, raw: qemuRaw(t, img)}
}

// faultStore wraps a Store: while fail is set, ReadAt fails with it;
// delay slows every ReadAt.
type faultStore struct {
	objstore.Store
	fail  atomic.Pointer[error]
	delay time.Duration
}

var errInjected = errors.New("injected store failure")

func (s *faultStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts objstore.ReadOptions) (int, error) {
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	if e := s.fail.Load(); e != nil {
		return 0, &objstore.Error{Op: "read", URL: s.URL(key), Err: *e}
	}
	return s.Store.ReadAt(ctx, key, p, off, opts)
}

// testDisk is a Disk over a file store, with the store's metrics.
type testDisk struct {
	*Disk
	m     *objstore.Metrics
	fault *faultStore
	im    *qcow2.Image
}

// open serves img through WithMetrics(faultStore(file store)); a
// non-negative cacheBytes gives it a memory tier of that size (0 means
// 64 MiB).
func open(t testing.TB, img string, cacheBytes int64, opts Options) *testDisk {
	t.Helper()
	ctx := context.Background()
	st, key, err := objstore.Open(ctx, img, objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	fs := &faultStore{Store: st}
	m := new(objstore.Metrics)
	im, err := qcow2.Open(ctx, objstore.WithMetrics(fs, m), key, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cacheBytes >= 0 {
		if cacheBytes == 0 {
			cacheBytes = 64 << 20
		}
		c, err := cache.NewMemory(cacheBytes)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		opts.Cache = c
	}
	opts.Metrics = m
	d, err := New(im, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Close()
		im.Close()
	})
	return &testDisk{Disk: d, m: m, fault: fs, im: im}
}

// warm loads the image's metadata (L2 tables) so that later GET counts
// are data only.
func (d *testDisk) warm(t testing.TB) {
	t.Helper()
	if _, err := d.Extents(context.Background(), 0, d.Size()); err != nil {
		t.Fatal(err)
	}
}

func (d *testDisk) gets() int64 { return d.m.Gets.Load() }

// qemuMap returns qemu-img map's extents of img.
type qemuExtent struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
}

func qemuMap(t testing.TB, img string) []qemuExtent {
	t.Helper()
	var out []qemuExtent
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", img)), &out); err != nil {
		t.Fatal(err)
	}
	return out
}
