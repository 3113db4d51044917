// Package harness runs the external servers snapfs's tests talk to.
package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"go/build"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/snapfs/snapfs/objstore"
)

// MinIOVersion is the MinIO release the tests are written against (the
// one scripts/test-deps installs).
const MinIOVersion = "v0.0.0-20260212201848-7aac2a2c5b7c"

// MinIORegion is the region the test server and its clients use.
const MinIORegion = "us-east-1"

// MinIO is a MinIO server run by a test: one process on a loopback port,
// with its data in a test temp directory.
type MinIO struct {
	Endpoint  string // host:port, plain http
	AccessKey string // root user
	SecretKey string // root password
	DataDir   string // the server's data directory
	LogPath   string // the server's output, kept across restarts

	bin    string
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
}

// FindMinIO returns the path of the minio binary: $GOBIN/minio, else
// $GOPATH/bin/minio (each GOPATH entry, GOPATH defaulting to ~/go), else
// minio on $PATH.
func FindMinIO() (string, error) {
	var dirs []string
	if gobin := os.Getenv("GOBIN"); gobin != "" {
		dirs = append(dirs, gobin)
	}
	for _, dir := range filepath.SplitList(build.Default.GOPATH) {
		dirs = append(dirs, filepath.Join(dir, "bin"))
	}
	for _, dir := range dirs {
		p := filepath.Join(dir, "minio")
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := exec.LookPath("minio"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("minio binary not found in $GOPATH/bin or $PATH; install it with scripts/test-deps or: go install github.com/minio/minio@%s", MinIOVersion)
}

// StartMinIO starts a fresh MinIO server for t on a free 127.0.0.1 port
// and waits until it is live. The test fails (it is not skipped) when the
// binary is missing. The server is stopped when the test ends.
func StartMinIO(t testing.TB) *MinIO {
	t.Helper()
	bin, err := FindMinIO()
	if err != nil {
		t.Fatal(err)
	}
	logDir := t.TempDir()
	m := &MinIO{
		AccessKey: "snapfs-" + randomHex(4),
		SecretKey: randomHex(16),
		DataDir:   t.TempDir(),
		LogPath:   filepath.Join(logDir, "minio.log"),
		bin:       bin,
	}
	t.Cleanup(m.Stop)
	// The port is free when freePort returns, but another process (a
	// listener, or an outgoing connection's ephemeral port) may take it
	// before MinIO binds it: then try another.
	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("minio: no free port: %v", err)
		}
		m.Endpoint = net.JoinHostPort("127.0.0.1", port)
		err = m.start()
		if err == nil {
			return m
		}
		if !errors.Is(err, errPortInUse) || attempt == 5 {
			t.Fatal(err)
		}
		t.Logf("minio: %s was taken before MinIO bound it; trying another port", m.Endpoint)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	_, port, err := net.SplitHostPort(l.Addr().String())
	return port, err
}

// errPortInUse is start's error when MinIO found its port taken.
var errPortInUse = errors.New("port already in use")

// Start (re)starts the server on the same port and data directory, for
// tests that stop it to inject faults, and waits until it is live. While
// another process holds the port (it may have taken it while the server
// was down), it tries again for up to 10 s.
func (m *MinIO) Start(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := m.start()
		if err == nil {
			return
		}
		if !errors.Is(err, errPortInUse) || time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// start starts the server on m.Endpoint and waits until it is live.
func (m *MinIO) start() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return fmt.Errorf("minio: already running on %s", m.Endpoint)
	}
	logf, err := os.OpenFile(m.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("minio: log file: %w", err)
	}
	fmt.Fprintf(logf, "=== %s start on %s\n", time.Now().Format(time.RFC3339Nano), m.Endpoint)
	cmd := exec.Command(m.bin, "server", "--quiet", "--address", m.Endpoint, m.DataDir)
	cmd.Env = append(os.Environ(),
		"MINIO_ROOT_USER="+m.AccessKey,
		"MINIO_ROOT_PASSWORD="+m.SecretKey,
		"MINIO_CI_CD=1",
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
		"MINIO_REGION="+MinIORegion,
		"MINIO_API_REQUESTS_MAX=256",
	)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = procAttr()
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("minio: start %s: %w", m.bin, err)
	}
	logf.Close() // the child holds its own copy
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	m.cmd, m.exited = cmd, exited

	deadline := time.Now().Add(60 * time.Second)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := client.Get("http://" + m.Endpoint + "/minio/health/live")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			m.cmd = nil
			tail := m.LogTail()
			err := fmt.Errorf("minio: server exited during startup (%v)\n%s", cmd.ProcessState, tail)
			if strings.Contains(lastStart(tail), "already in use") {
				err = fmt.Errorf("%w: %w", errPortInUse, err)
			}
			return err
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			m.stopLocked()
			return fmt.Errorf("minio: not live on %s after 60s\n%s", m.Endpoint, m.LogTail())
		}
	}
}

// lastStart returns the part of a log tail written since the last start.
func lastStart(tail string) string {
	if i := strings.LastIndex(tail, "=== "); i >= 0 {
		return tail[i:]
	}
	return tail
}

// Stop stops the server: SIGTERM, then SIGKILL after 10s. It waits for the
// process to exit. Stopping a stopped server does nothing.
func (m *MinIO) Stop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopLocked()
}

func (m *MinIO) stopLocked() {
	if m.cmd == nil {
		return
	}
	_ = m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.exited:
	case <-time.After(10 * time.Second):
		_ = m.cmd.Process.Kill()
		<-m.exited
	}
	m.cmd = nil
}

// LogTail returns the last few KiB of the server's output.
func (m *MinIO) LogTail() string {
	const max = 4 << 10
	b, err := os.ReadFile(m.LogPath)
	if err != nil {
		return "(no minio log: " + err.Error() + ")"
	}
	if len(b) > max {
		b = b[len(b)-max:]
		if i := strings.IndexByte(string(b), '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return "--- minio log tail (" + m.LogPath + ") ---\n" + string(b)
}

// Client returns a minio-go client with the root credentials.
func (m *MinIO) Client(t testing.TB) *minio.Client {
	t.Helper()
	c, err := minio.New(m.Endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(m.AccessKey, m.SecretKey, ""),
		Secure: false,
		Region: MinIORegion,
	})
	if err != nil {
		t.Fatalf("minio: client: %v", err)
	}
	return c
}

func (m *MinIO) ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// MakeBucket creates bucket.
func (m *MinIO) MakeBucket(t testing.TB, name string) {
	t.Helper()
	if err := m.Client(t).MakeBucket(m.ctx(t), name, minio.MakeBucketOptions{Region: MinIORegion}); err != nil {
		t.Fatalf("minio: make bucket %s: %v\n%s", name, err, m.LogTail())
	}
}

// MakePublic lets anonymous clients GET (and HEAD) every object of bucket,
// so that http://Endpoint/bucket/key works without a signature.
func (m *MinIO) MakePublic(t testing.TB, bucket string) {
	t.Helper()
	policy := fmt.Sprintf(`{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":["*"]},"Action":["s3:GetObject"],"Resource":["arn:aws:s3:::%s/*"]}]}`, bucket)
	if err := m.Client(t).SetBucketPolicy(m.ctx(t), bucket, policy); err != nil {
		t.Fatalf("minio: make %s public: %v\n%s", bucket, err, m.LogTail())
	}
}

// Upload stores the local file path as bucket/key.
func (m *MinIO) Upload(t testing.TB, bucket, key, path string) {
	t.Helper()
	if _, err := m.Client(t).FPutObject(m.ctx(t), bucket, key, path, minio.PutObjectOptions{ContentType: "application/octet-stream"}); err != nil {
		t.Fatalf("minio: upload %s to %s/%s: %v\n%s", path, bucket, key, err, m.LogTail())
	}
}

// PresignGet returns a pre-signed GET URL for bucket/key valid for ttl.
func (m *MinIO) PresignGet(t testing.TB, bucket, key string, ttl time.Duration) string {
	t.Helper()
	u, err := m.Client(t).PresignedGetObject(m.ctx(t), bucket, key, ttl, nil)
	if err != nil {
		t.Fatalf("minio: presign %s/%s: %v", bucket, key, err)
	}
	return u.String()
}

// URL returns the plain (unsigned) http URL of bucket/key.
func (m *MinIO) URL(bucket, key string) string {
	return "http://" + m.Endpoint + "/" + bucket + "/" + key
}

// Env returns the environment that points the snapfs binary at this
// server: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
// AWS_REGION, and AWS_EC2_METADATA_DISABLED=true.
func (m *MinIO) Env() []string {
	return []string{
		"AWS_ENDPOINT_URL=http://" + m.Endpoint,
		"AWS_ACCESS_KEY_ID=" + m.AccessKey,
		"AWS_SECRET_ACCESS_KEY=" + m.SecretKey,
		"AWS_REGION=" + MinIORegion,
		"AWS_EC2_METADATA_DISABLED=true",
	}
}

// Config returns an objstore.Config for this server with explicit
// credentials, path-style addressing and no instance-metadata lookups.
func (m *MinIO) Config() objstore.Config {
	return objstore.Config{
		Endpoint:  "http://" + m.Endpoint,
		Region:    MinIORegion,
		PathStyle: objstore.PathStyleOn,
		AccessKey: m.AccessKey,
		SecretKey: m.SecretKey,
		NoIAM:     true,
	}
}

// Running reports whether the server process is up (started and not
// stopped or exited).
func (m *MinIO) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return false
	}
	select {
	case <-m.exited:
		return false
	default:
		return true
	}
}

var errNotRunning = errors.New("minio is not running")

// Pid returns the server's process id.
func (m *MinIO) Pid() (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return 0, errNotRunning
	}
	return m.cmd.Process.Pid, nil
}
