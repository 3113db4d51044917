package objstore_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// secret is the signature of the fake pre-signed URLs; no error text or
// URL() output may ever contain it.
const secret = "s3cr3tSIGNATURE"

// fakeObject is one object of fakeServer.
type fakeObject struct {
	data []byte
	etag string
	meta map[string]string
}

// fakeServer is an httptest server that behaves like S3 behind a
// pre-signed URL: HEAD is refused (the signature is for GET only), objects
// under /signed/ need X-Amz-Signature=secret, GETs honour Range and
// If-Match. Hook, when set, may answer a request itself (fault injection).
type fakeServer struct {
	*httptest.Server
	mu       sync.Mutex
	objects  map[string]*fakeObject // by URL path
	requests []*http.Request        // every request, in order
	noRanges bool                   // answer ranged GETs with 200 and the whole body
	hook     func(w http.ResponseWriter, r *http.Request, n int) bool
}

func newFakeServer(t *testing.T) *fakeServer {
	t.Helper()
	fs := &fakeServer{objects: map[string]*fakeObject{}}
	fs.Server = httptest.NewServer(http.HandlerFunc(fs.serve))
	t.Cleanup(fs.Close)
	return fs
}

func (fs *fakeServer) put(path string, data []byte, etag string, meta map[string]string) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.objects[path] = &fakeObject{data: data, etag: etag, meta: meta}
}

// setHook installs a fault-injection hook (see fakeServer.hook).
func (fs *fakeServer) setHook(h func(w http.ResponseWriter, r *http.Request, n int) bool) {
	fs.mu.Lock()
	fs.hook = h
	fs.mu.Unlock()
}

// setNoRanges makes the server ignore Range headers.
func (fs *fakeServer) setNoRanges(v bool) {
	fs.mu.Lock()
	fs.noRanges = v
	fs.mu.Unlock()
}

// seen returns the requests made so far for path.
func (fs *fakeServer) seen(path string) []*http.Request {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	var out []*http.Request
	for _, r := range fs.requests {
		if r.URL.Path == path {
			out = append(out, r)
		}
	}
	return out
}

func (fs *fakeServer) ranges(path string) []string {
	var out []string
	for _, r := range fs.seen(path) {
		out = append(out, r.Header.Get("Range"))
	}
	return out
}

func s3Error(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	// Like S3, the body echoes request details, here the signature.
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>%s</Message><SignatureProvided>%s</SignatureProvided></Error>`, code, msg, secret)
}

func (fs *fakeServer) serve(w http.ResponseWriter, r *http.Request) {
	fs.mu.Lock()
	fs.requests = append(fs.requests, r.Clone(r.Context()))
	n := 0
	for _, q := range fs.requests {
		if q.URL.Path == r.URL.Path {
			n++
		}
	}
	hook := fs.hook
	obj := fs.objects[r.URL.Path]
	noRanges := fs.noRanges
	fs.mu.Unlock()
	if hook != nil && hook(w, r, n) {
		return
	}
	if r.Method != http.MethodGet {
		s3Error(w, http.StatusForbidden, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided.")
		return
	}
	if strings.HasPrefix(r.URL.Path, "/signed/") && r.URL.Query().Get("X-Amz-Signature") != secret {
		s3Error(w, http.StatusForbidden, "AccessDenied", "Access Denied")
		return
	}
	if obj == nil {
		s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	if im := r.Header.Get("If-Match"); im != "" && im != `"`+obj.etag+`"` {
		s3Error(w, http.StatusPreconditionFailed, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold")
		return
	}
	h := w.Header()
	h.Set("ETag", `"`+obj.etag+`"`)
	h.Set("Last-Modified", time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).Format(http.TimeFormat))
	for k, v := range obj.meta {
		h.Set("X-Amz-Meta-"+k, v)
	}
	size := int64(len(obj.data))
	rng := r.Header.Get("Range")
	if rng == "" || noRanges {
		h.Set("Content-Length", strconv.FormatInt(size, 10))
		w.WriteHeader(http.StatusOK)
		w.Write(obj.data)
		return
	}
	first, last, ok := parseRange(rng)
	if !ok {
		s3Error(w, http.StatusBadRequest, "InvalidArgument", "bad range")
		return
	}
	if first >= size {
		h.Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		s3Error(w, http.StatusRequestedRangeNotSatisfiable, "InvalidRange", "The requested range is not satisfiable")
		return
	}
	last = min(last, size-1)
	h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, size))
	h.Set("Content-Length", strconv.FormatInt(last-first+1, 10))
	w.WriteHeader(http.StatusPartialContent)
	w.Write(obj.data[first : last+1])
}

func parseRange(v string) (int64, int64, bool) {
	spec, ok := strings.CutPrefix(v, "bytes=")
	if !ok {
		return 0, 0, false
	}
	a, b, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || last < first {
		return 0, 0, false
	}
	return first, last, true
}
