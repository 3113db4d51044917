package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snapfs/snapfs/tests/harness"
	"github.com/snapfs/snapfs/tests/images"
)

// The faults are injected while `snapfs cat` is blocked writing to its
// stdout: the test reads pauseAt bytes, stops reading (so snapfs can get
// at most its read-ahead further), injects the fault, and reads on. With a
// 256 MiB image most of the reads happen after the fault, deterministically.
const (
	largeSize = 256 << 20
	pauseAt   = 32 << 20
)

var retryLog = regexp.MustCompile(`(?i)retry|retries|retrying|attempt`)

// TestFaults: MinIO stopped during a read (the read fails, naming the
// object, after logged retries), MinIO restarted within the retry window
// (the read succeeds with the right content), and the object overwritten
// during a read, in MinIO and in a directory (the read fails with "object
// changed since it was opened" and what it wrote is never mixed content).
func TestFaults(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	images.Large(t, dir, "large.qcow2", largeSize, 1)
	images.Large(t, dir, "large-v2.qcow2", largeSize, 2)
	raw := filepath.Join(dir, "large.raw") // what every prefix of the output must match
	qemuImg(t, dir, "convert", "-f", "qcow2", "-O", "raw", "large.qcow2", raw)
	wantSHA := sha256File(t, raw)

	m := harness.StartMinIO(t)
	const bucket, key = "faults", "images/large.qcow2"
	m.MakeBucket(t, bucket)
	m.Upload(t, bucket, key, filepath.Join(dir, "large.qcow2"))
	u := "s3://" + bucket + "/" + key
	env := m.Env()

	// (c) The object overwritten in a directory while cat reads it: a new
	// file renamed over the image.
	t.Run("overwritten-file", func(t *testing.T) {
		fdir := t.TempDir()
		img := filepath.Join(fdir, "large.qcow2")
		copyFile(t, filepath.Join(dir, "large.qcow2"), img)
		res, out := catWithFault(t, cliRun{args: []string{"cat", fileURL(img)}}, raw, func() {
			tmp := filepath.Join(fdir, ".large.qcow2.new")
			copyFile(t, filepath.Join(dir, "large-v2.qcow2"), tmp)
			if err := os.Rename(tmp, img); err != nil {
				t.Fatal(err)
			}
		}, nil)
		expectChanged(t, res, out, "large.qcow2")
	})

	// (a) MinIO stopped during the read, for good: the read fails after
	// its retries, with an error naming the object.
	t.Run("stopped", func(t *testing.T) {
		res, out := catWithFault(t, cliRun{args: []string{"--retries", "4", "cat", u}, env: env, timeout: 90 * time.Second}, raw, m.Stop, nil)
		if res.code == 0 {
			t.Fatalf("cat succeeded with MinIO stopped (%d bytes):\n%s", out.n, res)
		}
		if out.n >= largeSize {
			t.Errorf("cat wrote all %d bytes though MinIO was stopped", out.n)
		}
		if !strings.Contains(lastLine(res.stderr), key) || !strings.HasPrefix(lastLine(res.stderr), "snapfs: ") {
			t.Errorf("the error does not name the object %s:\n%s", key, res)
		}
		if !retryLog.MatchString(res.stderr) {
			t.Errorf("the log shows no retries:\n%s", res)
		}
	})

	// (b) MinIO stopped, then restarted within the retry window: the read
	// succeeds, with the right content, after logged retries.
	t.Run("restarted", func(t *testing.T) {
		if !m.Running() {
			m.Start(t)
		}
		res, out := catWithFault(t, cliRun{args: []string{"--retries", "20", "cat", u}, env: env, timeout: 2 * time.Minute}, raw, m.Stop, func() {
			// The output is read on meanwhile, so that snapfs's requests
			// meet a dead server for a while.
			time.Sleep(1500 * time.Millisecond)
			m.Start(t)
		})
		if res.code != 0 {
			t.Fatalf("cat failed though MinIO came back:\n%s\n%s", res, m.LogTail())
		}
		if out.n != largeSize || out.sum() != wantSHA {
			t.Errorf("cat wrote %d bytes, sha256 %s; want %d bytes, %s", out.n, out.sum(), largeSize, wantSHA)
		}
		if !retryLog.MatchString(res.stderr) {
			t.Errorf("the log shows no retries, so the fault was not exercised:\n%s", res)
		}
	})

	// (c) The object overwritten in MinIO while cat reads it.
	t.Run("overwritten-s3", func(t *testing.T) {
		if !m.Running() {
			m.Start(t)
		}
		res, out := catWithFault(t, cliRun{args: []string{"cat", u}, env: env}, raw, func() {
			m.Upload(t, bucket, key, filepath.Join(dir, "large-v2.qcow2"))
		}, nil)
		expectChanged(t, res, out, key)
	})
}

// expectChanged checks the outcome of a cat whose object was overwritten.
func expectChanged(t *testing.T, res *result, out *prefixWriter, key string) {
	t.Helper()
	if res.code == 0 {
		t.Fatalf("cat succeeded though the object changed (%d bytes):\n%s", out.n, res)
	}
	if !strings.Contains(res.stderr, "object changed since it was opened") {
		t.Errorf("the error does not say \"object changed since it was opened\":\n%s", res)
	}
	if !strings.Contains(lastLine(res.stderr), key) {
		t.Errorf("the error does not name the object %s:\n%s", key, res)
	}
	if out.n >= largeSize {
		t.Errorf("cat wrote all %d bytes though the object changed", out.n)
	}
}

// catWithFault runs the CLI (a cat), reads pauseAt bytes of its output,
// calls fault while the CLI is blocked on its stdout, then reads the rest,
// calling whileReading (if not nil) meanwhile. Every byte read is checked
// against the raw file want: the output may stop early, but must never
// hold bytes of another version.
func catWithFault(t *testing.T, c cliRun, want string, fault, whileReading func()) (*result, *prefixWriter) {
	t.Helper()
	f, err := os.Open(want)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := &prefixWriter{want: f, hw: newHashWriter()}
	var pipe io.ReadCloser
	res, cmd, cancel := startCLI(t, c, &pipe)
	defer func() {
		t.Logf("%s: exit %d after %d bytes; %s", strings.Join(c.args, " "), res.code, out.n, lastLine(res.stderr))
	}()
	defer cancel()
	if _, err := io.CopyN(out, pipe, pauseAt); err != nil {
		cancel()
		io.Copy(io.Discard, pipe)
		waitCLI(t, res, cmd)
		t.Fatalf("cat stopped before %d bytes: %v\n%s", pauseAt, err, res)
	}
	fault()
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(out, pipe)
		done <- err
	}()
	if whileReading != nil {
		whileReading()
	}
	if err := <-done; err != nil {
		t.Errorf("reading cat's output: %v", err)
	}
	waitCLI(t, res, cmd)
	if out.bad != "" {
		t.Errorf("cat wrote wrong bytes: %s", out.bad)
	}
	return res, out
}

// prefixWriter checks that what it is given is a prefix of want, and
// hashes it.
type prefixWriter struct {
	mu   sync.Mutex
	want io.Reader
	hw   *hashWriter
	n    int64
	bad  string
	buf  []byte
}

func (w *prefixWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.bad == "" {
		if cap(w.buf) < len(p) {
			w.buf = make([]byte, len(p))
		}
		b := w.buf[:len(p)]
		k, _ := io.ReadFull(w.want, b)
		if k < len(p) {
			w.bad = fmt.Sprintf("more than the %d bytes of the image", w.n+int64(k))
		} else if !bytes.Equal(b, p) {
			i := 0
			for i < len(p) && p[i] == b[i] {
				i++
			}
			w.bad = fmt.Sprintf("byte %d is %#02x, the image has %#02x there", w.n+int64(i), p[i], b[i])
		}
	}
	w.n += int64(len(p))
	w.hw.Write(p)
	return len(p), nil
}

func (w *prefixWriter) sum() string { return w.hw.sum() }

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestRetriesFlag: against an endpoint that refuses connections, a request
// is tried --retries times (8 by default), each retry logged, and the
// error names the object.
func TestRetriesFlag(t *testing.T) {
	t.Parallel()
	// Port 1 (tcpmux) is privileged and unused: connections are refused,
	// and no test server can take it meanwhile.
	const endpoint = "http://127.0.0.1:1"
	if c, err := net.DialTimeout("tcp", "127.0.0.1:1", time.Second); err == nil {
		c.Close()
		t.Skip("something listens on 127.0.0.1:1")
	}
	env := []string{"AWS_ENDPOINT_URL=" + endpoint, "AWS_ACCESS_KEY_ID=snapfs", "AWS_SECRET_ACCESS_KEY=snapfs-secret", "AWS_REGION=us-east-1"}
	const u = "s3://bucket/some/image.qcow2"
	retrying := regexp.MustCompile(`(?i)\bretrying\b`)
	for _, c := range []struct {
		flags    []string
		attempts int
	}{
		{[]string{"--retries", "1"}, 1},
		{[]string{"--retries", "3"}, 3},
		{nil, 8},
	} {
		args := append(append([]string{}, c.flags...), "info", u)
		res := runCLI(t, cliRun{args: args, env: env, timeout: time.Minute})
		if res.code != 1 {
			t.Errorf("exit %d, want 1:\n%s", res.code, res)
		}
		last := lastLine(res.stderr)
		if !strings.HasPrefix(last, "snapfs: ") || !strings.Contains(last, "some/image.qcow2") {
			t.Errorf("the error does not name the object:\n%s", res)
		}
		body := strings.TrimSuffix(strings.TrimRight(res.stderr, "\n"), last)
		if n := len(retrying.FindAllString(body, -1)); n != c.attempts-1 {
			t.Errorf("%v: %d retries logged, want %d:\n%s", c.flags, n, c.attempts-1, res)
		}
	}
}
