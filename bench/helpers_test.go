package bench

import (
	"context"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"golang.org/x/sync/errgroup"
)

// diskRun is the length of the data runs and holes of the benchmark disks.
const diskRun = 16 << 20

// writeDisk writes a raw disk of size bytes to path: data in diskRun runs
// over about two thirds of it (every third run a hole), each run filled by
// fill.
func writeDisk(tb testing.TB, path string, size int64, fill func(run []byte)) {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, diskRun)
	for off := int64(0); off < size; off += diskRun {
		if (off/diskRun)%3 == 2 {
			continue
		}
		p := buf[:min(diskRun, size-off)]
		fill(p)
		if _, err := f.WriteAt(p, off); err != nil {
			tb.Fatal(err)
		}
	}
}

// benchDisk writes a writeDisk disk of random data. Random data keeps the
// page cache and compression from flattering anyone.
func benchDisk(tb testing.TB, path string, size int64) {
	rng := rand.NewChaCha8([32]byte{1})
	writeDisk(tb, path, size, func(p []byte) { _, _ = rng.Read(p) })
}

// buildSnapfs builds the CLI into dir and returns its path.
func buildSnapfs(tb testing.TB, dir string) string {
	tb.Helper()
	bin := filepath.Join(dir, "snapfs")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/snapfs/snapfs/cmd/snapfs").CombinedOutput()
	if err != nil {
		tb.Fatalf("build snapfs: %v\n%s", err, out)
	}
	return bin
}

// stallAfter is how long a reader may move no bytes before it counts as
// stalled and is killed.
const stallAfter = 15 * time.Second

// runWatched runs a command that writes the file out, and returns its wall
// time, or stalled=true when out stopped growing for stallAfter (the
// command is then killed).
func runWatched(tb testing.TB, env []string, out string, name string, args ...string) (d time.Duration, stalled bool) {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	var output strings.Builder
	cmd.Stdout, cmd.Stderr = &output, &output
	start := time.Now()
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var lastSize int64 = -1
	lastMove := time.Now()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, output.String())
			}
			return time.Since(start), false
		case <-tick.C:
			var size int64
			if fi, err := os.Stat(out); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					size = st.Blocks
				}
			}
			if size != lastSize {
				lastSize, lastMove = size, time.Now()
			} else if time.Since(lastMove) > stallAfter {
				_ = cmd.Process.Kill()
				<-done
				return time.Since(start), true
			}
		}
	}
}

// parallelGets reads the whole object with ranged GETs, jobs in flight and
// nothing else done with the bytes: the limit any reader of the object has.
func parallelGets(cl *minio.Client, bucket, key string, size, chunk int64, jobs int) (time.Duration, error) {
	start := time.Now()
	g, ctx := errgroup.WithContext(context.Background())
	g.SetLimit(jobs)
	for off := int64(0); off < size; off += chunk {
		off := off
		g.Go(func() error {
			opts := minio.GetObjectOptions{}
			if err := opts.SetRange(off, min(off+chunk, size)-1); err != nil {
				return err
			}
			obj, err := cl.GetObject(ctx, bucket, key, opts)
			if err != nil {
				return err
			}
			defer obj.Close()
			buf := make([]byte, 1<<20)
			for {
				_, err := obj.Read(buf)
				if err != nil {
					if err == io.EOF {
						return nil
					}
					return err
				}
			}
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}
