package qcow2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/snapfs/snapfs/objstore"
)

// dirStore is a minimal objstore.Store over a local directory, for tests.
// It counts reads and can record their ranges.
type dirStore struct {
	dir   string
	reads atomic.Int64
	delay time.Duration
	// inflight and maxInflight count concurrent ReadAt calls.
	inflight, maxInflight atomic.Int64

	mu  sync.Mutex
	log []readRec
}

type readRec struct {
	key string
	off int64
	n   int
}

var _ objstore.Store = (*dirStore)(nil)

func newDirStore(dir string) *dirStore { return &dirStore{dir: dir} }

func (s *dirStore) path(key string) string { return filepath.Join(s.dir, filepath.FromSlash(key)) }

func (s *dirStore) URL(key string) string { return "file://" + s.dir + "/" + key }

func (s *dirStore) Stat(ctx context.Context, key string) (objstore.ObjectInfo, error) {
	fi, err := os.Stat(s.path(key))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return objstore.ObjectInfo{}, &objstore.Error{Op: "stat", URL: s.URL(key), Err: objstore.ErrNotFound}
		}
		return objstore.ObjectInfo{}, &objstore.Error{Op: "stat", URL: s.URL(key), Err: err}
	}
	return objstore.ObjectInfo{Key: key, Size: fi.Size(), ETag: fmt.Sprint(fi.ModTime().UnixNano()), LastModified: fi.ModTime()}, nil
}

func (s *dirStore) ReadAt(ctx context.Context, key string, p []byte, off int64, _ objstore.ReadOptions) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.reads.Add(1)
	n := s.inflight.Add(1)
	defer s.inflight.Add(-1)
	for m := s.maxInflight.Load(); n > m && !s.maxInflight.CompareAndSwap(m, n); m = s.maxInflight.Load() {
	}
	s.mu.Lock()
	s.log = append(s.log, readRec{key, off, len(p)})
	s.mu.Unlock()
	if s.delay > 0 {
		time.Sleep(s.delay)
	}
	f, err := os.Open(s.path(key))
	if err != nil {
		return 0, &objstore.Error{Op: "read", URL: s.URL(key), Err: objstore.ErrNotFound}
	}
	defer f.Close()
	return f.ReadAt(p, off)
}

func (s *dirStore) resetLog() []readRec {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.log
	s.log = nil
	return l
}

func (s *dirStore) List(ctx context.Context, prefix string) ([]objstore.ObjectInfo, error) {
	return nil, objstore.ErrNotSupported
}
func (s *dirStore) Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	return objstore.ErrNotSupported
}
func (s *dirStore) Delete(ctx context.Context, key string) error { return objstore.ErrNotSupported }
func (s *dirStore) CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error) {
	return "", objstore.ErrNotSupported
}
func (s *dirStore) UploadPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64) (objstore.Part, error) {
	return objstore.Part{}, objstore.ErrNotSupported
}
func (s *dirStore) CompleteMultipart(ctx context.Context, key, uploadID string, parts []objstore.Part) error {
	return objstore.ErrNotSupported
}
func (s *dirStore) AbortMultipart(ctx context.Context, key, uploadID string) error {
	return objstore.ErrNotSupported
}

// needQemu skips the test when qemu-img or qemu-io is missing.
func needQemu(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found in PATH (install qemu-utils to run the QEMU image tests)", tool)
		}
	}
}

// run runs a command in dir and fails the test on error.
func run(t testing.TB, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// runFlaky is run for commands that may fail for reasons outside the test:
// qemu-img's LUKS key-slot calibration fails with "Unable to get accurate
// CPU usage" when the thread CPU clock reads 0 ms, which happens on a
// loaded machine. It retries a few times before failing the test.
func runFlaky(t testing.TB, dir string, name string, args ...string) string {
	t.Helper()
	var out []byte
	var err error
	for range 5 {
		cmd := exec.Command(name, args...)
		cmd.Dir = dir
		if out, err = cmd.CombinedOutput(); err == nil {
			return string(out)
		}
	}
	t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	return ""
}

// qio runs qemu-io commands on an image.
func qio(t testing.TB, dir, img string, fmtName string, cmds ...string) {
	t.Helper()
	args := []string{"-f", fmtName}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, img)
	run(t, dir, "qemu-io", args...)
}

// rawSHA converts img to raw with qemu-img and returns the sha256 and size.
func rawSHA(t testing.TB, dir, img string) (string, []byte) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, dir, "qemu-img", "convert", "-O", "raw", img, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), b
}

// readAll reads the whole image with ReadAt in chunks of chunk bytes.
func readAll(t testing.TB, im *Image, chunk int) []byte {
	t.Helper()
	out := make([]byte, im.Size())
	for off := 0; off < len(out); off += chunk {
		end := min(off+chunk, len(out))
		n, err := im.ReadAt(out[off:end], int64(off))
		if err != nil || n != end-off {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", off, end-off, n, err)
		}
	}
	return out
}

// checkAgainstQemu opens key from dir and compares its contents with
// qemu-img convert -O raw, reading in several chunk sizes and at random
// unaligned ranges, then compares Map with qemu-img map.
func checkAgainstQemu(t *testing.T, dir, key string) *Image {
	t.Helper()
	im := checkContentAgainstQemu(t, dir, key)
	compareMap(t, dir, key, im)
	return im
}

// checkContentAgainstQemu is checkAgainstQemu without the Map comparison.
func checkContentAgainstQemu(t *testing.T, dir, key string) *Image {
	t.Helper()
	want, wantBytes := rawSHA(t, dir, key)
	st := newDirStore(dir)
	im, err := Open(context.Background(), st, key, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { im.Close() })
	if im.Size() != int64(len(wantBytes)) {
		t.Fatalf("Size = %d, qemu says %d", im.Size(), len(wantBytes))
	}
	for _, chunk := range []int{4 << 20, 65536 + 512, 4096} {
		got := readAll(t, im, chunk)
		sum := sha256.Sum256(got)
		if hex.EncodeToString(sum[:]) != want {
			i := firstDiff(got, wantBytes)
			t.Fatalf("chunk %d: content differs from qemu-img convert, first at byte %d", chunk, i)
		}
	}
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 200; i++ {
		off := rng.Int63n(im.Size())
		n := rng.Intn(300000) + 1
		buf := make([]byte, n)
		got, err := im.ReadAt(buf, off)
		end := min(off+int64(n), im.Size())
		if int64(got) != end-off || (err != nil && !(err == io.EOF && off+int64(n) > im.Size())) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", off, n, got, err)
		}
		if !bytes.Equal(buf[:got], wantBytes[off:end]) {
			t.Fatalf("ReadAt(%d, %d): content differs", off, n)
		}
	}
	return im
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

type qemuExtent struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Zero    bool   `json:"zero"`
	Present bool   `json:"present"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"`
}

// compareMap checks that Map agrees with qemu-img map on which ranges hold
// data, and that our extents tile the disk.
func compareMap(t *testing.T, dir, key string, im *Image) {
	t.Helper()
	out := run(t, dir, "qemu-img", "map", "--output=json", key)
	var qs []qemuExtent
	if err := json.Unmarshal([]byte(out), &qs); err != nil {
		t.Fatalf("parse qemu-img map: %v\n%s", err, out)
	}
	ours, err := im.Map(context.Background(), 0, im.Size())
	if err != nil {
		t.Fatalf("Map: %v", err)
	}
	pos := int64(0)
	for _, e := range ours {
		if e.Start != pos || e.Length <= 0 {
			t.Fatalf("Map extents do not tile: %+v at %d", e, pos)
		}
		pos += e.Length
	}
	if pos != im.Size() {
		t.Fatalf("Map covers %d bytes, want %d", pos, im.Size())
	}
	// AllocatedBytes is what qemu maps as data in the top layer.
	var qemuAlloc int64
	for _, q := range qs {
		if q.Data && q.Depth == 0 {
			qemuAlloc += q.Length
		}
	}
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if in.AllocatedBytes != qemuAlloc {
		t.Fatalf("AllocatedBytes = %d, qemu-img map has %d data bytes at depth 0", in.AllocatedBytes, qemuAlloc)
	}
	// Sweep both lists.
	isData := func(e Extent) bool { return e.Kind == Data || e.Kind == Compressed }
	i, j := 0, 0
	for pos := int64(0); pos < im.Size(); {
		for qs[i].Start+qs[i].Length <= pos {
			i++
		}
		for ours[j].Start+ours[j].Length <= pos {
			j++
		}
		if qs[i].Data != isData(ours[j]) {
			t.Fatalf("at %d: qemu-img map says data=%v (%+v), Map says %v depth %d (%+v)", pos, qs[i].Data, qs[i], ours[j].Kind, ours[j].Depth, ours[j])
		}
		if qs[i].Depth != ours[j].Depth {
			t.Fatalf("at %d: qemu depth %d (%+v), ours %d (%+v)", pos, qs[i].Depth, qs[i], ours[j].Depth, ours[j])
		}
		if !qs[i].Data && qs[i].Present != (ours[j].Kind == Zero) {
			t.Fatalf("at %d: qemu-img map says present=%v (%+v), Map says %v (%+v)", pos, qs[i].Present, qs[i], ours[j].Kind, ours[j])
		}
		pos = min(qs[i].Start+qs[i].Length, ours[j].Start+ours[j].Length)
	}
}

// writeRaw writes a size-byte raw file mixing zeros, text-like (compressible)
// and random (incompressible) 4 KiB blocks.
func writeRaw(t testing.TB, path string, size int, seed int64) []byte {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	b := make([]byte, size)
	words := []string{"qcow2 ", "cluster ", "snapfs ", "object ", "store ", "zero ", "\n"}
	for off := 0; off < size; off += 4096 {
		blk := b[off:min(off+4096, size)]
		switch rng.Intn(4) {
		case 0: // zeros
		case 1:
			rng.Read(blk)
		default:
			for k := 0; k < len(blk); {
				k += copy(blk[k:], words[rng.Intn(len(words))])
			}
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func be64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }
