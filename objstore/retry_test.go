package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/snapfs/snapfs/objstore"
)

// fastPolicy retries quickly and logs into buf.
func fastPolicy(buf *syncBuffer, attempts int) objstore.RetryPolicy {
	return objstore.RetryPolicy{
		MaxAttempts: attempts,
		BaseDelay:   time.Millisecond,
		MaxDelay:    5 * time.Millisecond,
		Logger:      slog.New(slog.NewTextHandler(buf, nil)),
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func openSigned(t *testing.T, fs *fakeServer, path string) (objstore.Store, string) {
	t.Helper()
	st, key, err := objstore.Open(context.Background(), signedURL(fs, path), objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return st, key
}

// gets counts the ranged GETs (not Stat's bytes=0-0) seen for path.
func gets(fs *fakeServer, path string) int {
	n := 0
	for _, r := range fs.ranges(path) {
		if r != "bytes=0-0" {
			n++
		}
	}
	return n
}

func TestRetry503ThenOK(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	data := pattern(20000, 3)
	fs.put("/signed/img", data, "v1", nil)
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n <= 2 {
			s3Error(w, http.StatusServiceUnavailable, "SlowDown", "Please reduce your request rate.")
			return true
		}
		return false
	})
	var logs syncBuffer
	st, key := openSigned(t, fs, "/signed/img")
	rst := objstore.WithRetry(st, fastPolicy(&logs, 8))
	p := make([]byte, 1000)
	n, err := rst.ReadAt(ctx, key, p, 700, objstore.ReadOptions{})
	if err != nil || n != 1000 || !bytes.Equal(p, data[700:1700]) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if got := len(fs.seen("/signed/img")); got != 3 {
		t.Fatalf("%d requests, want 3", got)
	}
	if c := strings.Count(logs.String(), "level=WARN"); c != 2 {
		t.Fatalf("%d retry warnings, want 2:\n%s", c, logs.String())
	}
	if !strings.Contains(logs.String(), "SlowDown") {
		t.Fatalf("log lacks the cause:\n%s", logs.String())
	}
	noSecret(t, "retry log", logs.String())

	// Stat is retried the same way.
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n <= 4 {
			w.WriteHeader(http.StatusInternalServerError)
			return true
		}
		return false
	})
	if info, err := rst.Stat(ctx, key); err != nil || info.Size != int64(len(data)) {
		t.Fatalf("Stat = %+v, %v", info, err)
	}
}

func TestRetryShortReadResumes(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	data := pattern(10000, 9)
	fs.put("/signed/img", data, "v1", nil)
	// The first GET announces the whole range but the connection dies
	// after 4000 bytes.
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n != 1 {
			return false
		}
		w.Header().Set("ETag", `"v1"`)
		w.Header().Set("Content-Range", "bytes 0-9999/10000")
		w.Header().Set("Content-Length", "10000")
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[:4000])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // drop the connection mid-body
	})
	var logs syncBuffer
	st, key := openSigned(t, fs, "/signed/img")
	rst := objstore.WithRetry(st, fastPolicy(&logs, 8))
	p := make([]byte, 10000)
	n, err := rst.ReadAt(ctx, key, p, 0, objstore.ReadOptions{IfMatch: "v1"})
	if err != nil || n != 10000 || !bytes.Equal(p, data) {
		t.Fatalf("ReadAt = %d, %v (data ok %v)", n, err, bytes.Equal(p, data))
	}
	if got := strings.Join(fs.ranges("/signed/img"), " "); got != "bytes=0-9999 bytes=4000-9999" {
		t.Fatalf("ranges requested: %s", got)
	}
	rs := fs.seen("/signed/img")
	if im := rs[1].Header.Get("If-Match"); im != `"v1"` {
		t.Fatalf("resumed read dropped If-Match: %q", im)
	}

	// Without WithRetry the backend reports the short read honestly.
	fs2 := newFakeServer(t)
	fs2.put("/signed/img", data, "v1", nil)
	fs2.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		w.Header().Set("Content-Range", "bytes 0-9999/10000")
		w.Header().Set("Content-Length", "10000")
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[:4000])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	})
	st2, key2 := openSigned(t, fs2, "/signed/img")
	n, err = st2.ReadAt(ctx, key2, p, 0, objstore.ReadOptions{})
	if n != 4000 || !errors.Is(err, io.ErrUnexpectedEOF) || !objstore.IsRetryable(err) {
		t.Fatalf("raw short read = %d, %v", n, err)
	}
}

func TestRetryFinalErrorsNotRetried(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		status int
		code   string
		want   error
	}{
		{"404", http.StatusNotFound, "NoSuchKey", objstore.ErrNotFound},
		{"403", http.StatusForbidden, "AccessDenied", objstore.ErrForbidden},
		{"412", http.StatusPreconditionFailed, "PreconditionFailed", objstore.ErrChanged},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := newFakeServer(t)
			fs.put("/signed/img", pattern(100, 1), "v1", nil)
			fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
				s3Error(w, tc.status, tc.code, "no")
				return true
			})
			var logs syncBuffer
			st, key := openSigned(t, fs, "/signed/img")
			rst := objstore.WithRetry(st, fastPolicy(&logs, 8))
			_, err := rst.ReadAt(ctx, key, make([]byte, 10), 0, objstore.ReadOptions{})
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if _, err := rst.Stat(ctx, key); !errors.Is(err, tc.want) {
				t.Fatalf("Stat err = %v", err)
			}
			if got := len(fs.seen("/signed/img")); got != 2 {
				t.Fatalf("%d requests for one read and one stat, want 2", got)
			}
			if logs.String() != "" {
				t.Fatalf("retry logged: %s", logs.String())
			}
		})
	}
}

func TestRetryGivesUp(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	fs.put("/signed/dir/img", pattern(100, 1), "v1", nil)
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		s3Error(w, http.StatusServiceUnavailable, "SlowDown", "Please reduce your request rate.")
		return true
	})
	var logs syncBuffer
	st, key := openSigned(t, fs, "/signed/dir/img")
	rst := objstore.WithRetry(st, fastPolicy(&logs, 3))
	_, err := rst.ReadAt(ctx, key, make([]byte, 10), 0, objstore.ReadOptions{})
	if err == nil {
		t.Fatal("no error")
	}
	want := "read " + fs.URL + "/signed/dir/img: giving up after 3 attempts: HTTP 503: "
	if !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %q\nwant prefix %q", err, want)
	}
	t.Log(err)
	noSecret(t, "give-up error", err.Error())
	if got := gets(fs, "/signed/dir/img"); got != 3 {
		t.Fatalf("%d attempts, want 3", got)
	}
	var oe *objstore.Error
	if !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("not an *Error: %#v", err)
	}
	if objstore.IsRetryable(errors.Unwrap(err)) != true {
		t.Fatal("last cause lost from the chain")
	}
}

func TestRetryCancelledContext(t *testing.T) {
	fs := newFakeServer(t)
	fs.put("/signed/img", pattern(100, 1), "v1", nil)
	ctx, cancel := context.WithCancel(context.Background())
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		cancel()
		s3Error(w, http.StatusServiceUnavailable, "SlowDown", "busy")
		return true
	})
	var logs syncBuffer
	st, key := openSigned(t, fs, "/signed/img")
	pol := fastPolicy(&logs, 8)
	pol.BaseDelay = time.Minute // a retry would hang the test
	pol.MaxDelay = time.Minute
	rst := objstore.WithRetry(st, pol)
	start := time.Now()
	_, err := rst.ReadAt(ctx, key, make([]byte, 10), 0, objstore.ReadOptions{})
	if err == nil || time.Since(start) > 10*time.Second {
		t.Fatalf("err %v after %v", err, time.Since(start))
	}
	if got := len(fs.seen("/signed/img")); got != 1 {
		t.Fatalf("%d requests after cancellation, want 1", got)
	}
}

func TestRetryAttemptTimeout(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	data := pattern(1000, 1)
	fs.put("/signed/img", data, "v1", nil)
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n == 1 {
			<-r.Context().Done() // hang until the client gives up
			return true
		}
		return false
	})
	var logs syncBuffer
	st, key := openSigned(t, fs, "/signed/img")
	pol := fastPolicy(&logs, 3)
	pol.AttemptTimeout = 200 * time.Millisecond
	rst := objstore.WithRetry(st, pol)
	p := make([]byte, 100)
	n, err := rst.ReadAt(ctx, key, p, 0, objstore.ReadOptions{})
	if err != nil || n != 100 || !bytes.Equal(p, data[:100]) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if got := len(fs.seen("/signed/img")); got != 2 {
		t.Fatalf("%d requests, want 2", got)
	}
}

// flakyStore fails the first failures calls of each method with a
// retryable error and records the bodies UploadPart received.
type flakyStore struct {
	objstore.Store
	failures int
	calls    atomic.Int64
	bodies   []string
}

var errFlaky = &objstore.Error{Op: "test", URL: "mem://x", Status: 500, Err: errors.New("internal error")}

func (f *flakyStore) UploadPart(ctx context.Context, key, id string, n int, r io.Reader, size int64) (objstore.Part, error) {
	c := f.calls.Add(1)
	b, _ := io.ReadAll(r)
	f.bodies = append(f.bodies, string(b))
	if int(c) <= f.failures {
		return objstore.Part{}, errFlaky
	}
	return objstore.Part{Number: n, ETag: "e", Size: int64(len(b))}, nil
}

func (f *flakyStore) List(ctx context.Context, prefix string) ([]objstore.ObjectInfo, error) {
	if int(f.calls.Add(1)) <= f.failures {
		return nil, errFlaky
	}
	return []objstore.ObjectInfo{{Key: "k"}}, nil
}

func TestRetryUploadPartRewindsBody(t *testing.T) {
	ctx := context.Background()
	inner, _ := newFileStore(t)
	var logs syncBuffer

	f := &flakyStore{Store: inner, failures: 2}
	rst := objstore.WithRetry(f, fastPolicy(&logs, 8))
	body := strings.NewReader("XXpart-data")
	body.Seek(2, io.SeekStart) // the body starts where the reader stands
	p, err := rst.UploadPart(ctx, "k", "id", 1, body, 9)
	if err != nil || p.Size != 9 {
		t.Fatalf("UploadPart = %+v, %v", p, err)
	}
	if strings.Join(f.bodies, ",") != "part-data,part-data,part-data" {
		t.Fatalf("bodies seen: %q", f.bodies)
	}

	// A body that cannot seek is tried once.
	f2 := &flakyStore{Store: inner, failures: 1}
	rst2 := objstore.WithRetry(f2, fastPolicy(&logs, 8))
	if _, err := rst2.UploadPart(ctx, "k", "id", 1, io.MultiReader(strings.NewReader("once")), 4); err == nil {
		t.Fatal("non-seekable body retried to success")
	}
	if f2.calls.Load() != 1 {
		t.Fatalf("%d calls with a non-seekable body", f2.calls.Load())
	}

	// List is retried.
	f3 := &flakyStore{Store: inner, failures: 2}
	if l, err := objstore.WithRetry(f3, fastPolicy(&logs, 8)).List(ctx, ""); err != nil || len(l) != 1 || f3.calls.Load() != 3 {
		t.Fatalf("List = %v, %v after %d calls", l, err, f3.calls.Load())
	}
}

func TestIsRetryable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&objstore.Error{Status: 503, Err: errors.New("x")}, true},
		{&objstore.Error{Status: 429, Err: errors.New("x")}, true},
		{&objstore.Error{Status: 400, Err: errors.New("x")}, false},
		{&objstore.Error{Status: 404, Err: objstore.ErrNotFound}, false},
		{&objstore.Error{Err: objstore.ErrNotSupported}, false},
		{&objstore.Error{Err: io.ErrUnexpectedEOF}, true},
		{io.EOF, false},
		{context.Canceled, false},
		{context.DeadlineExceeded, true},
		{errors.New("read tcp: connection reset by peer"), true},
		{errors.New("something else"), false},
	} {
		if got := objstore.IsRetryable(tc.err); got != tc.want {
			t.Errorf("IsRetryable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestMetricsCount(t *testing.T) {
	ctx := context.Background()
	inner, _ := newFileStore(t)
	var m objstore.Metrics
	st := objstore.WithMetrics(inner, &m)
	if err := st.Put(ctx, "a", strings.NewReader("hello world"), 11, nil); err != nil {
		t.Fatal(err)
	}
	st.Stat(ctx, "a")
	st.Stat(ctx, "missing")
	p := make([]byte, 8)
	st.ReadAt(ctx, "a", p, 0, objstore.ReadOptions{})
	st.ReadAt(ctx, "a", p, 8, objstore.ReadOptions{}) // 3 bytes and io.EOF: no error
	got := m.Snapshot()
	want := objstore.MetricsSnapshot{Gets: 2, BytesRead: 11, Stats: 2, Puts: 1, BytesWritten: 11, Errors: 1}
	if got != want {
		t.Fatalf("metrics %+v, want %+v", got, want)
	}
}

// The documented stack: pinning over retry over metrics.
func TestWrapperStack(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	data := pattern(10000, 2)
	fs.put("/signed/img", data, "v1", nil)
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n != 2 { // the first ranged read dies after 3000 bytes
			return false
		}
		w.Header().Set("Content-Range", "bytes 0-9999/10000")
		w.Header().Set("Content-Length", "10000")
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[:3000])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	})
	var logs syncBuffer
	var m objstore.Metrics
	backend, key := openSigned(t, fs, "/signed/img")
	st := objstore.WithPinning(objstore.WithRetry(objstore.WithMetrics(backend, &m), fastPolicy(&logs, 4)))
	if _, err := st.Stat(ctx, key); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 10000)
	if n, err := st.ReadAt(ctx, key, p, 0, objstore.ReadOptions{}); err != nil || n != 10000 || !bytes.Equal(p, data) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	rs := fs.seen("/signed/img")
	if len(rs) != 3 || rs[2].Header.Get("Range") != "bytes=3000-9999" || rs[2].Header.Get("If-Match") != `"v1"` {
		t.Fatalf("requests: %d, last Range %q If-Match %q", len(rs), rs[len(rs)-1].Header.Get("Range"), rs[len(rs)-1].Header.Get("If-Match"))
	}
	if s := m.Snapshot(); s.Gets != 2 || s.BytesRead != 10000 || s.Stats != 1 || s.Errors != 1 || s.InFlight != 0 {
		t.Fatalf("metrics %+v", s)
	}
	// The object changes: the next read fails at once, without retries.
	fs.setHook(nil)
	fs.put("/signed/img", pattern(10000, 3), "v2", nil)
	if _, err := st.ReadAt(ctx, key, p, 0, objstore.ReadOptions{}); !errors.Is(err, objstore.ErrChanged) {
		t.Fatalf("read after change: %v", err)
	}
	if len(fs.seen("/signed/img")) != 4 {
		t.Fatal("ErrChanged was retried")
	}
}
