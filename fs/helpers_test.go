package fs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
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

// needTools skips the test when QEMU's tools are missing.
func needTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found in PATH (install qemu-utils to run the fs tests)", tool)
		}
	}
}

// needFUSE skips the test when this process cannot mount FUSE.
func needFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	if os.Geteuid() != 0 {
		if _, err := exec.LookPath("fusermount3"); err != nil {
			t.Skip("not root and no fusermount3")
		}
	}
}

// run runs a command in dir and returns its standard output.
func run(t *testing.T, dir, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, errb.String())
	}
	return out.Bytes()
}

// makeImage creates dir/name (making parent directories) with qemu-img
// create options opts and size, then runs qemu-io commands on it.
func makeImage(t *testing.T, dir, name, opts, size string, cmds ...string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
		t.Fatal(err)
	}
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	run(t, dir, "qemu-img", append(args, name, size)...)
	ioCmds(t, dir, name, cmds...)
}

func ioCmds(t *testing.T, dir, name string, cmds ...string) {
	t.Helper()
	if len(cmds) == 0 {
		return
	}
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, filepath.Dir(filepath.Join(dir, name)), "qemu-io", append(args, filepath.Base(name))...)
}

// rawOf returns `qemu-img convert -O raw` of dir/name.
func rawOf(t *testing.T, dir, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ref.raw")
	run(t, filepath.Dir(filepath.Join(dir, name)), "qemu-img", "convert", "-f", "qcow2", "-O", "raw", filepath.Base(name), out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuMap returns the data ranges of `qemu-img map` (data and not zero),
// merged.
func qemuMap(t *testing.T, dir, name string) [][2]int64 {
	t.Helper()
	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	out := run(t, filepath.Dir(filepath.Join(dir, name)), "qemu-img", "map", "-f", "qcow2", "--output=json", filepath.Base(name))
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	var r [][2]int64
	for _, e := range m {
		if !e.Data || e.Zero {
			continue
		}
		if k := len(r) - 1; k >= 0 && r[k][1] == e.Start {
			r[k][1] += e.Length
			continue
		}
		r = append(r, [2]int64{e.Start, e.Start + e.Length})
	}
	return r
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// logBuffer collects log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// fileStore opens a directory store.
func fileStore(t *testing.T, dir string) objstore.Store {
	t.Helper()
	st, err := objstore.NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// faultStore fails every ReadAt while failing is set.
type faultStore struct {
	objstore.Store
	failing atomic.Bool
	reads   atomic.Int64
}

var errInjected = errors.New("injected fault: connection refused")

func (s *faultStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts objstore.ReadOptions) (int, error) {
	s.reads.Add(1)
	if s.failing.Load() {
		return 0, &objstore.Error{Op: "read", URL: s.URL(key), Err: errInjected}
	}
	return s.Store.ReadAt(ctx, key, p, off, opts)
}

// slowStore delays every ReadAt and counts how many run at once.
type slowStore struct {
	objstore.Store
	delay             time.Duration
	inflight, maxSeen atomic.Int64
}

func (s *slowStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts objstore.ReadOptions) (int, error) {
	n := s.inflight.Add(1)
	defer s.inflight.Add(-1)
	for m := s.maxSeen.Load(); n > m && !s.maxSeen.CompareAndSwap(m, n); m = s.maxSeen.Load() {
	}
	time.Sleep(s.delay)
	return s.Store.ReadAt(ctx, key, p, off, opts)
}

// mountFS mounts f on a new temporary directory, unmounted (lazily, and
// with fusermount3 -u -z as a last resort) when the test ends.
func mountFS(t *testing.T, f *FS) (*Mount, string) {
	t.Helper()
	dir := t.TempDir()
	m, err := f.Mount(dir, "test")
	if err != nil {
		f.Close()
		t.Skipf("cannot mount FUSE here: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := m.Unmount(ctx); err != nil {
			t.Logf("unmount: %v", err)
		}
		if _, ok, _ := MountType(dir); ok {
			exec.Command("fusermount3", "-u", "-z", dir).Run()
		}
	})
	return m, dir
}

// readAll reads a file with a deadline, so that a hung mount fails the
// test instead of blocking it.
func readAll(t *testing.T, path string) []byte {
	t.Helper()
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		b, err := os.ReadFile(path)
		ch <- res{b, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("read %s: %v", path, r.err)
		}
		return r.b
	case <-time.After(60 * time.Second):
		t.Fatalf("read %s: no answer in 60s", path)
	}
	return nil
}

// within runs fn with a deadline.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: no answer in %v", what, d)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v", what, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var _ = io.EOF
