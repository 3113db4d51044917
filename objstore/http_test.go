package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/snapfs/snapfs/objstore"
)

// noSecret fails t if s shows the signature or any query string.
func noSecret(t *testing.T, what, s string) {
	t.Helper()
	if strings.Contains(s, secret) || strings.Contains(s, "X-Amz-") || strings.Contains(s, "pa55word") {
		t.Fatalf("%s leaks a secret: %s", what, s)
	}
}

func signedURL(fs *fakeServer, path string) string {
	return fs.URL + path + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=600&X-Amz-Signature=" + secret
}

func TestHTTPPresignedStatAndRead(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	data := pattern(100000, 5)
	fs.put("/signed/dir/disk.qcow2", data, "etag-v1", map[string]string{"Snapfs-Format": "qcow2"})

	st, key, err := objstore.Open(ctx, signedURL(fs, "/signed/dir/disk.qcow2"), objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if key != "disk.qcow2" {
		t.Fatalf("key = %q", key)
	}
	if got, want := st.URL(key), fs.URL+"/signed/dir/disk.qcow2"; got != want {
		t.Fatalf("URL = %q, want %q", got, want)
	}
	// HEAD is refused by the server, as with a real pre-signed URL.
	resp, err := http.Head(signedURL(fs, "/signed/dir/disk.qcow2"))
	if err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("fake server HEAD: %v %v", resp.StatusCode, err)
	}
	info, err := st.Stat(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(data)) || info.ETag != "etag-v1" || info.Metadata["snapfs-format"] != "qcow2" || info.LastModified.Year() != 2026 {
		t.Fatalf("Stat = %+v", info)
	}
	if rs := fs.seen("/signed/dir/disk.qcow2"); len(rs) != 2 || rs[1].Method != http.MethodGet || rs[1].Header.Get("Range") != "bytes=0-0" {
		t.Fatal("Stat did not use one GET with Range: bytes=0-0")
	}

	p := make([]byte, 4096)
	n, err := st.ReadAt(ctx, key, p, 12345, objstore.ReadOptions{IfMatch: info.ETag})
	if err != nil || n != len(p) || !bytes.Equal(p, data[12345:12345+4096]) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	last := fs.seen("/signed/dir/disk.qcow2")
	if r := last[len(last)-1]; r.Header.Get("Range") != "bytes=12345-16440" || r.Header.Get("If-Match") != `"etag-v1"` {
		t.Fatalf("request headers: Range %q If-Match %q", r.Header.Get("Range"), r.Header.Get("If-Match"))
	}
	// Across the end: the bytes up to it and io.EOF.
	n, err = st.ReadAt(ctx, key, p, int64(len(data))-100, objstore.ReadOptions{})
	if n != 100 || err != io.EOF || !bytes.Equal(p[:100], data[len(data)-100:]) {
		t.Fatalf("read across EOF = %d, %v", n, err)
	}
	// At and past the end (416): 0 and io.EOF.
	for _, off := range []int64{int64(len(data)), int64(len(data)) + 5000} {
		if n, err := st.ReadAt(ctx, key, p, off, objstore.ReadOptions{}); n != 0 || err != io.EOF {
			t.Fatalf("read at %d = %d, %v", off, n, err)
		}
	}
}

func TestHTTPIfMatchChanged(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	fs.put("/signed/img", pattern(5000, 1), "v1", nil)
	st, key, err := objstore.Open(ctx, signedURL(fs, "/signed/img"), objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	pinned := objstore.WithPinning(st)
	if _, err := pinned.Stat(ctx, key); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 100)
	if _, err := pinned.ReadAt(ctx, key, p, 0, objstore.ReadOptions{}); err != nil {
		t.Fatal(err)
	}
	fs.put("/signed/img", pattern(5000, 2), "v2", nil)
	_, err = pinned.ReadAt(ctx, key, p, 0, objstore.ReadOptions{})
	if !errors.Is(err, objstore.ErrChanged) {
		t.Fatalf("pinned read after change: %v", err)
	}
	var oe *objstore.Error
	if !errors.As(err, &oe) || oe.Status != http.StatusPreconditionFailed || oe.Op != "read" {
		t.Fatalf("error %#v", err)
	}
	noSecret(t, "412 error", err.Error())
	rs := fs.seen("/signed/img")
	if got := rs[len(rs)-1].Header.Get("If-Match"); got != `"v1"` {
		t.Fatalf("pinned read sent If-Match %q", got)
	}
	// A server that ignores If-Match is caught by the response's ETag.
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		r.Header.Del("If-Match")
		return false
	})
	stale := objstore.ReadOptions{IfMatch: "v1"}
	if _, err := st.ReadAt(ctx, key, p, 0, stale); !errors.Is(err, objstore.ErrChanged) {
		t.Fatalf("If-Match ignored by server: %v", err)
	}
}

func TestHTTPSecretsNeverShown(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	fs.put("/signed/dir/disk.qcow2", pattern(1000, 1), "v1", nil)
	st, key, err := objstore.Open(ctx, signedURL(fs, "/signed/dir/disk.qcow2"), objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	noSecret(t, "URL()", st.URL(key))

	// A sibling key gets no signature: 403, and the server's error body
	// (which echoes the signature) must not leak.
	p := make([]byte, 10)
	_, err = st.ReadAt(ctx, "base.qcow2", p, 0, objstore.ReadOptions{})
	if !errors.Is(err, objstore.ErrForbidden) {
		t.Fatalf("sibling read: %v", err)
	}
	noSecret(t, "403 error", err.Error())
	if !strings.Contains(err.Error(), fs.URL+"/signed/dir/base.qcow2") {
		t.Fatalf("error does not name the object: %v", err)
	}
	if rs := fs.seen("/signed/dir/base.qcow2"); len(rs) != 1 || rs[0].URL.RawQuery != "" {
		t.Fatalf("sibling request carried the signature: %v", rs[0].URL)
	}
	// Relative keys resolve against the directory.
	if got := st.URL("../other/x.img"); got != fs.URL+"/signed/other/x.img" {
		t.Fatalf("relative URL = %q", got)
	}

	// Transport errors (url.Error carries the full URL) are redacted too.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String() + "/signed/x.img?X-Amz-Signature=" + secret
	l.Close()
	dst, dkey, err := objstore.Open(ctx, dead, objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = dst.Stat(ctx, dkey)
	if err == nil || !objstore.IsRetryable(err) {
		t.Fatalf("stat on a closed port: %v (retryable %v)", err, objstore.IsRetryable(err))
	}
	noSecret(t, "connection error", err.Error())
	for e := err; e != nil; e = errors.Unwrap(e) {
		noSecret(t, "wrapped cause", e.Error())
	}

	// Credentials in the URL and unparsable URLs.
	ust, ukey, err := objstore.Open(ctx, "http://user:pa55word@"+fs.Listener.Addr().String()+"/signed/dir/disk.qcow2?X-Amz-Signature="+secret, objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	noSecret(t, "URL() with userinfo", ust.URL(ukey))
	_, _, err = objstore.Open(ctx, "https://user:pa55word@host/%zz?X-Amz-Signature="+secret, objstore.Config{})
	if err == nil {
		t.Fatal("bad escape accepted")
	}
	noSecret(t, "parse error", err.Error())

	// Writes are not supported.
	if err := st.Put(ctx, "x", strings.NewReader("x"), 1, nil); !errors.Is(err, objstore.ErrNotSupported) {
		t.Fatalf("Put: %v", err)
	}
	if _, err := st.List(ctx, ""); !errors.Is(err, objstore.ErrNotSupported) {
		t.Fatalf("List: %v", err)
	}
	if _, err := st.CreateMultipart(ctx, "x", nil); !errors.Is(err, objstore.ErrNotSupported) {
		t.Fatalf("CreateMultipart: %v", err)
	}
	if err := st.Delete(ctx, key); !errors.Is(err, objstore.ErrNotSupported) {
		t.Fatalf("Delete: %v", err)
	}
}

func TestHTTPMissingObject(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	st, key, err := objstore.Open(ctx, fs.URL+"/public/nothing.img", objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = st.Stat(ctx, key)
	var oe *objstore.Error
	if !errors.Is(err, objstore.ErrNotFound) || !errors.As(err, &oe) || oe.Status != 404 || oe.Op != "stat" {
		t.Fatalf("stat missing: %#v", err)
	}
	if !strings.Contains(err.Error(), "NoSuchKey") {
		t.Fatalf("S3 error code not shown: %v", err)
	}
}

func TestHTTPServerWithoutRanges(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	data := pattern(3<<20, 7)
	fs.put("/public/big.img", data, "v1", nil)
	fs.setNoRanges(true)
	st, key, err := objstore.Open(ctx, fs.URL+"/public/big.img", objstore.Config{})
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Stat(ctx, key)
	if err != nil || info.Size != int64(len(data)) {
		t.Fatalf("Stat = %+v, %v", info, err)
	}
	p := make([]byte, 1000)
	n, err := st.ReadAt(ctx, key, p, 5000, objstore.ReadOptions{})
	if err != nil || n != 1000 || !bytes.Equal(p, data[5000:6000]) {
		t.Fatalf("small-offset read on a 200 = %d, %v", n, err)
	}
	_, err = st.ReadAt(ctx, key, p, 2<<20, objstore.ReadOptions{})
	if !errors.Is(err, objstore.ErrNotSupported) || !strings.Contains(err.Error(), "ignores Range") {
		t.Fatalf("large-offset read on a 200: %v", err)
	}
}

func TestHTTPWrongContentRange(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	fs.put("/public/x", pattern(1000, 1), "v1", nil)
	fs.setHook(func(w http.ResponseWriter, r *http.Request, n int) bool {
		if r.Header.Get("Range") == "bytes=0-0" {
			return false
		}
		w.Header().Set("Content-Range", "bytes 0-99/1000")
		w.WriteHeader(http.StatusPartialContent)
		w.Write(pattern(100, 1))
		return true
	})
	st, key, _ := objstore.Open(ctx, fs.URL+"/public/x", objstore.Config{})
	p := make([]byte, 100)
	if _, err := st.ReadAt(ctx, key, p, 500, objstore.ReadOptions{}); err == nil || !strings.Contains(err.Error(), "starting at 0") {
		t.Fatalf("misplaced range accepted: %v", err)
	}
}

func TestHTTPEmptyObject(t *testing.T) {
	ctx := context.Background()
	fs := newFakeServer(t)
	fs.put("/public/empty", nil, "e", nil)
	st, key, _ := objstore.Open(ctx, fs.URL+"/public/empty", objstore.Config{})
	info, err := st.Stat(ctx, key)
	if err != nil || info.Size != 0 {
		t.Fatalf("Stat(empty) = %+v, %v", info, err)
	}
}
