package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snapfs/snapfs/tests/images"
)

// snapfsBin is the CLI built by TestMain; workDir holds it and the shared
// corpus.
var snapfsBin, workDir string

func TestMain(m *testing.M) {
	if os.Getenv(runnerEnv) != "" {
		os.Exit(runnerMain(os.Args[1:]))
	}
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "snapfs-e2e-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
		defer os.RemoveAll(dir)
		workDir = dir
		if err := buildCLI(dir); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: cannot build the CLI:", err)
			return 1
		}
		return m.Run()
	}())
}

// buildCLI builds ./cmd/snapfs from the module root into dir, or takes
// the binary $SNAPFS_BIN when set (to test a given build).
func buildCLI(dir string) error {
	if bin := os.Getenv("SNAPFS_BIN"); bin != "" {
		abs, err := filepath.Abs(bin)
		snapfsBin = abs
		return err
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %v", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return errors.New("not inside a Go module")
	}
	snapfsBin = filepath.Join(dir, "snapfs")
	cmd := exec.Command("go", "build", "-o", snapfsBin, "./cmd/snapfs")
	cmd.Dir = filepath.Dir(gomod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/snapfs: %v\n%s", err, out)
	}
	return nil
}

// The corpus and malformed images are made once, by the first test that
// needs them, in workDir/images.
var (
	corpusOnce   sync.Once
	corpusOK     bool
	corpusImages []images.Image
	malImages    []images.Image
)

// imageSet returns the directory of the images and the Corpus and
// Malformed lists.
func imageSet(t *testing.T) (dir string, corpus, malformed []images.Image) {
	t.Helper()
	dir = filepath.Join(workDir, "images")
	corpusOnce.Do(func() {
		start := time.Now()
		corpusImages = images.Corpus(t, dir)
		malImages = images.Malformed(t, dir)
		corpusOK = true
		t.Logf("made %d corpus and %d malformed images in %v", len(corpusImages), len(malImages), time.Since(start).Round(time.Millisecond))
	})
	if !corpusOK {
		t.Fatal("the test images could not be made (see the first test that tried)")
	}
	return dir, corpusImages, malImages
}

// byName finds an image.
func byName(t *testing.T, ims []images.Image, name string) images.Image {
	t.Helper()
	for _, im := range ims {
		if im.Name == name {
			return im
		}
	}
	t.Fatalf("no image %q", name)
	return images.Image{}
}

// cliRun describes one run of the CLI.
type cliRun struct {
	args    []string
	env     []string      // added to the environment (AWS_* of the host are removed)
	dir     string        // working directory
	stdout  io.Writer     // default: captured in result.stdout
	stdin   io.Reader     // default: empty
	timeout time.Duration // default: 2 minutes
}

type result struct {
	args    []string
	code    int    // exit code; -1 when killed
	stdout  []byte // when not streamed elsewhere
	stderr  string
	maxRSS  int64 // bytes
	elapsed time.Duration

	stderrBuf *lockedBuffer
	started   time.Time
	rssFile   string
}

func (r *result) String() string {
	return fmt.Sprintf("snapfs %s: exit %d after %v, max RSS %d MiB\nstderr:\n%s",
		strings.Join(r.args, " "), r.code, r.elapsed.Round(time.Millisecond), r.maxRSS>>20, tail(r.stderr, 4000))
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// snapfs runs the CLI with args and default options.
func snapfs(t *testing.T, args ...string) *result {
	t.Helper()
	return runCLI(t, cliRun{args: args})
}

// runCLI runs the CLI under a timeout and an address-space cap, and fails
// the test if it panicked or was killed.
func runCLI(t *testing.T, c cliRun) *result {
	t.Helper()
	res, cmd, cancel := startCLI(t, c, nil)
	defer cancel()
	waitCLI(t, res, cmd)
	return res
}

// startCLI starts the CLI, through the runner (see runner_test.go); stdout
// goes to c.stdout, or to the pipe returned when pipe is non-nil.
func startCLI(t *testing.T, c cliRun, pipe *io.ReadCloser) (*result, *exec.Cmd, context.CancelFunc) {
	t.Helper()
	if c.timeout == 0 {
		c.timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	res := &result{args: c.args, rssFile: filepath.Join(t.TempDir(), "rusage")}
	cmd := exec.CommandContext(ctx, self, append([]string{res.rssFile, snapfsBin}, c.args...)...)
	// The runner and the CLI form a process group, killed as one on timeout.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	cmd.Dir = c.dir
	cmd.Stdin = c.stdin
	cmd.Env = append(append(cleanEnv(), c.env...), runnerEnv+"=1")
	var errb lockedBuffer
	cmd.Stderr = &errb
	switch {
	case pipe != nil:
		r, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		*pipe = r
	case c.stdout != nil:
		cmd.Stdout = c.stdout
	default:
		cmd.Stdout = &resultStdout{res: res}
	}
	res.stderrBuf = &errb
	res.started = time.Now()
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start snapfs: %v", err)
	}
	return res, cmd, cancel
}

// waitCLI waits for a started CLI and checks it did not crash.
func waitCLI(t *testing.T, res *result, cmd *exec.Cmd) {
	t.Helper()
	err := cmd.Wait()
	res.elapsed = time.Since(res.started)
	res.stderr = res.stderrBuf.String()
	res.code = -1
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Errorf("snapfs %s: %v", strings.Join(res.args, " "), err)
	}
	ru, rerr := readRunnerReport(res.rssFile)
	switch {
	case rerr != nil && cmd.ProcessState != nil && !cmd.ProcessState.Exited():
		t.Errorf("snapfs killed (%v): timed out?\n%s", cmd.ProcessState, res)
	case rerr != nil:
		t.Errorf("snapfs %s: no report from the runner (%v; runner %v):\n%s", strings.Join(res.args, " "), rerr, cmd.ProcessState, res)
	case ru.signal != "":
		t.Errorf("snapfs was killed (%s; timeout or crash):\n%s", ru.signal, res)
	default:
		res.code, res.maxRSS = ru.code, ru.maxRSS
	}
	if strings.Contains(res.stderr, "panic:") || strings.Contains(res.stderr, "goroutine ") {
		t.Errorf("snapfs crashed:\n%s", res)
	}
}

// resultStdout collects stdout into the result.
type resultStdout struct{ res *result }

func (w *resultStdout) Write(p []byte) (int, error) {
	w.res.stdout = append(w.res.stdout, p...)
	return len(p), nil
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// cleanEnv is the test's environment without AWS_* settings, so that the
// host's credentials or endpoint never leak into a run.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "AWS_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// sha256File hashes a file.
func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// hashWriter hashes what it is given and counts it.
type hashWriter struct {
	mu sync.Mutex
	h  interface {
		io.Writer
		Sum([]byte) []byte
	}
	n int64
}

func newHashWriter() *hashWriter { return &hashWriter{h: sha256.New()} }

func (w *hashWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n += int64(len(p))
	return w.h.Write(p)
}

func (w *hashWriter) sum() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return hex.EncodeToString(w.h.Sum(nil))
}

// catSHA runs `snapfs cat` with its output hashed.
func catSHA(t *testing.T, c cliRun) (string, int64, *result) {
	t.Helper()
	hw := newHashWriter()
	c.stdout = hw
	res := runCLI(t, c)
	return hw.sum(), hw.n, res
}

// fileURL is the file:// URL of an absolute path.
func fileURL(path string) string { return "file://" + path }
