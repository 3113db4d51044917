package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/tests/harness"
)

func s3Store(t *testing.T, m *harness.MinIO, bucket string) objstore.Store {
	t.Helper()
	st, key, err := objstore.Open(context.Background(), "s3://"+bucket+"/", m.Config())
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		t.Fatalf("key of s3://%s/ = %q", bucket, key)
	}
	return st
}

func TestS3MinIO(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a MinIO server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "images")
	st := s3Store(t, m, "images")

	t.Run("PutStatReadListDelete", func(t *testing.T) {
		data := pattern(200000, 4)
		if err := st.Put(ctx, "vm/disk.qcow2", bytes.NewReader(data), int64(len(data)), map[string]string{"Snapfs-Format": "qcow2"}); err != nil {
			t.Fatal(err)
		}
		if err := st.Put(ctx, "vm/notes.txt", strings.NewReader("hi"), 2, nil); err != nil {
			t.Fatal(err)
		}
		if err := st.Put(ctx, "other", strings.NewReader("x"), 1, nil); err != nil {
			t.Fatal(err)
		}
		info, err := st.Stat(ctx, "vm/disk.qcow2")
		if err != nil {
			t.Fatal(err)
		}
		if info.Size != int64(len(data)) || info.ETag == "" || strings.Contains(info.ETag, `"`) || info.Metadata["snapfs-format"] != "qcow2" {
			t.Fatalf("Stat = %+v", info)
		}
		p := make([]byte, 5000)
		n, err := st.ReadAt(ctx, "vm/disk.qcow2", p, 100000, objstore.ReadOptions{IfMatch: info.ETag})
		if err != nil || n != 5000 || !bytes.Equal(p, data[100000:105000]) {
			t.Fatalf("ReadAt = %d, %v", n, err)
		}
		n, err = st.ReadAt(ctx, "vm/disk.qcow2", p, int64(len(data))-10, objstore.ReadOptions{})
		if n != 10 || err != io.EOF || !bytes.Equal(p[:10], data[len(data)-10:]) {
			t.Fatalf("read across EOF = %d, %v", n, err)
		}
		n, err = st.ReadAt(ctx, "vm/disk.qcow2", p, int64(len(data))+100, objstore.ReadOptions{})
		if n != 0 || err != io.EOF {
			t.Fatalf("read past EOF = %d, %v", n, err)
		}
		list, err := st.List(ctx, "vm/")
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != 2 || list[0].Key != "vm/disk.qcow2" || list[0].Size != int64(len(data)) || list[1].Key != "vm/notes.txt" {
			t.Fatalf("List = %+v", list)
		}
		_, err = st.Stat(ctx, "vm/missing")
		var oe *objstore.Error
		if !errors.Is(err, objstore.ErrNotFound) || !errors.As(err, &oe) || oe.URL != "s3://images/vm/missing" {
			t.Fatalf("stat missing: %#v", err)
		}
		if _, err := st.ReadAt(ctx, "vm/missing", p, 0, objstore.ReadOptions{}); !errors.Is(err, objstore.ErrNotFound) {
			t.Fatalf("read missing: %v", err)
		}
		if err := st.Delete(ctx, "vm/notes.txt"); err != nil {
			t.Fatal(err)
		}
		if err := st.Delete(ctx, "vm/notes.txt"); err != nil {
			t.Fatalf("deleting a missing key: %v", err)
		}
		if _, err := st.Stat(ctx, "vm/notes.txt"); !errors.Is(err, objstore.ErrNotFound) {
			t.Fatalf("stat after delete: %v", err)
		}
		if _, err := s3Store(t, m, "no-such-bucket").Stat(ctx, "x"); !errors.Is(err, objstore.ErrNotFound) {
			t.Fatalf("missing bucket: %v", err)
		}
	})

	t.Run("Multipart", func(t *testing.T) {
		const mib = 1 << 20
		chunks := [][]byte{pattern(5*mib, 1), pattern(5*mib, 2), pattern(123457, 3)}
		id, err := st.CreateMultipart(ctx, "mp/image.qcow2", map[string]string{"origin": "multipart"})
		if err != nil {
			t.Fatal(err)
		}
		var parts []objstore.Part
		for _, i := range []int{2, 0, 1} {
			p, err := st.UploadPart(ctx, "mp/image.qcow2", id, i+1, bytes.NewReader(chunks[i]), int64(len(chunks[i])))
			if err != nil {
				t.Fatalf("part %d: %v", i+1, err)
			}
			if p.Number != i+1 || p.ETag == "" || p.Size != int64(len(chunks[i])) {
				t.Fatalf("part %+v", p)
			}
			parts = append(parts, p)
		}
		if _, err := st.Stat(ctx, "mp/image.qcow2"); !errors.Is(err, objstore.ErrNotFound) {
			t.Fatalf("visible before Complete: %v", err)
		}
		if err := st.CompleteMultipart(ctx, "mp/image.qcow2", id, parts); err != nil {
			t.Fatal(err)
		}
		want := bytes.Join(chunks, nil)
		info, err := st.Stat(ctx, "mp/image.qcow2")
		if err != nil || info.Size != int64(len(want)) || info.Metadata["origin"] != "multipart" {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		// Read across the part boundaries.
		p := make([]byte, 2*mib)
		off := int64(5*mib - 1000)
		if n, err := st.ReadAt(ctx, "mp/image.qcow2", p, off, objstore.ReadOptions{IfMatch: info.ETag}); err != nil || n != len(p) || !bytes.Equal(p, want[off:off+int64(len(p))]) {
			t.Fatalf("ReadAt = %d, %v", n, err)
		}
		tail := make([]byte, 200000)
		off = int64(len(want)) - 100000
		if n, err := st.ReadAt(ctx, "mp/image.qcow2", tail, off, objstore.ReadOptions{}); n != 100000 || err != io.EOF || !bytes.Equal(tail[:n], want[off:]) {
			t.Fatalf("tail read = %d, %v", n, err)
		}

		// A part below 5 MiB that is not the last is refused by S3.
		id2, err := st.CreateMultipart(ctx, "mp/small", nil)
		if err != nil {
			t.Fatal(err)
		}
		p1, err := st.UploadPart(ctx, "mp/small", id2, 1, bytes.NewReader(pattern(1000, 1)), 1000)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := st.UploadPart(ctx, "mp/small", id2, 2, bytes.NewReader(pattern(1000, 2)), 1000)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.CompleteMultipart(ctx, "mp/small", id2, []objstore.Part{p1, p2}); err == nil {
			t.Fatal("Complete accepted a 1000-byte first part")
		}

		// Abort discards the upload.
		if err := st.AbortMultipart(ctx, "mp/small", id2); err != nil {
			t.Fatal(err)
		}
		if _, err := st.UploadPart(ctx, "mp/small", id2, 3, bytes.NewReader([]byte("x")), 1); !errors.Is(err, objstore.ErrNotFound) {
			t.Fatalf("upload after abort: %v", err)
		}
		if _, err := st.Stat(ctx, "mp/small"); !errors.Is(err, objstore.ErrNotFound) {
			t.Fatalf("aborted object exists: %v", err)
		}
		uploads := m.Client(t).ListIncompleteUploads(ctx, "images", "mp/", true)
		for u := range uploads {
			if u.Err == nil {
				t.Fatalf("upload left behind: %+v", u)
			}
		}
	})

	t.Run("PinnedOverwrite", func(t *testing.T) {
		if err := st.Put(ctx, "pin/img", bytes.NewReader(pattern(8192, 1)), 8192, nil); err != nil {
			t.Fatal(err)
		}
		other := s3Store(t, m, "images") // a second writer
		pinned := objstore.WithPinning(s3Store(t, m, "images"))
		if _, err := pinned.Stat(ctx, "pin/img"); err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 512)
		if _, err := pinned.ReadAt(ctx, "pin/img", p, 1024, objstore.ReadOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := other.Put(ctx, "pin/img", bytes.NewReader(pattern(8192, 2)), 8192, nil); err != nil {
			t.Fatal(err)
		}
		_, err := pinned.ReadAt(ctx, "pin/img", p, 1024, objstore.ReadOptions{})
		if !errors.Is(err, objstore.ErrChanged) || !strings.Contains(err.Error(), "object changed since it was opened") {
			t.Fatalf("pinned read after overwrite: %v", err)
		}
		var oe *objstore.Error
		if !errors.As(err, &oe) || oe.Status != http.StatusPreconditionFailed {
			t.Fatalf("not a 412: %#v", err)
		}
		// ErrChanged is final: WithRetry does not retry it.
		var logs syncBuffer
		retried := objstore.WithRetry(pinned, fastPolicy(&logs, 5))
		if _, err := retried.ReadAt(ctx, "pin/img", p, 0, objstore.ReadOptions{}); !errors.Is(err, objstore.ErrChanged) || logs.String() != "" {
			t.Fatalf("retried a changed object: %v\n%s", err, logs.String())
		}
	})

	t.Run("PresignedURL", func(t *testing.T) {
		dir := t.TempDir()
		data := pattern(300000, 8)
		path := filepath.Join(dir, "disk.qcow2")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		m.Upload(t, "images", "signed/disk.qcow2", path)
		signed := m.PresignGet(t, "images", "signed/disk.qcow2", 10*time.Minute)
		sig := signed[strings.Index(signed, "X-Amz-Signature=")+len("X-Amz-Signature="):]
		if i := strings.IndexByte(sig, '&'); i >= 0 {
			sig = sig[:i]
		}
		if len(sig) < 32 {
			t.Fatalf("no signature in %s", signed)
		}
		// Really pre-signed: HEAD and unsigned GETs are refused.
		if resp, err := http.Head(signed); err != nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("HEAD of a pre-signed URL: %v %v", resp.Status, err)
		}
		if resp, err := http.Get(m.URL("images", "signed/disk.qcow2")); err != nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("unsigned GET: %v %v", resp.Status, err)
		}

		st, key, err := objstore.Open(ctx, signed, objstore.Config{})
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := st.(*objstore.HTTPStore); !ok || key != "disk.qcow2" {
			t.Fatalf("Open(pre-signed) = %T, %q", st, key)
		}
		if u := st.URL(key); strings.Contains(u, "?") || strings.Contains(u, sig) {
			t.Fatalf("URL() shows the query: %s", u)
		}
		info, err := st.Stat(ctx, key)
		if err != nil || info.Size != int64(len(data)) || info.ETag == "" {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		s3info, _ := s3Store(t, m, "images").Stat(ctx, "signed/disk.qcow2")
		if info.ETag != s3info.ETag {
			t.Fatalf("ETag %q over http, %q over s3", info.ETag, s3info.ETag)
		}
		p := make([]byte, 70000)
		if n, err := st.ReadAt(ctx, key, p, 123456, objstore.ReadOptions{IfMatch: info.ETag}); err != nil || n != len(p) || !bytes.Equal(p, data[123456:123456+70000]) {
			t.Fatalf("ReadAt = %d, %v", n, err)
		}
		// A relative key is requested without the signature: MinIO says 403.
		_, err = st.ReadAt(ctx, "missing.qcow2", p, 0, objstore.ReadOptions{})
		if !errors.Is(err, objstore.ErrForbidden) {
			t.Fatalf("relative key: %v", err)
		}
		for e := error(err); e != nil; e = errors.Unwrap(e) {
			if strings.Contains(e.Error(), sig) || strings.Contains(e.Error(), "X-Amz-") {
				t.Fatalf("signature in error: %v", e)
			}
		}
		// A stale pin over http is a 412 from MinIO.
		pinned := objstore.WithPinning(st)
		if _, err := pinned.Stat(ctx, key); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, pattern(300000, 9), 0o644); err != nil {
			t.Fatal(err)
		}
		m.Upload(t, "images", "signed/disk.qcow2", path)
		if _, err := pinned.ReadAt(ctx, key, p, 0, objstore.ReadOptions{}); !errors.Is(err, objstore.ErrChanged) {
			t.Fatalf("pinned http read after overwrite: %v", err)
		}
	})

	t.Run("EmptyObject", func(t *testing.T) {
		if err := st.Put(ctx, "empty", bytes.NewReader(nil), 0, nil); err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 10)
		if info, err := st.Stat(ctx, "empty"); err != nil || info.Size != 0 {
			t.Fatalf("s3 Stat = %+v, %v", info, err)
		}
		if n, err := st.ReadAt(ctx, "empty", p, 0, objstore.ReadOptions{}); n != 0 || err != io.EOF {
			t.Fatalf("s3 read of empty object = %d, %v", n, err)
		}
		hst, key, err := objstore.Open(ctx, m.PresignGet(t, "images", "empty", time.Minute), objstore.Config{})
		if err != nil {
			t.Fatal(err)
		}
		if info, err := hst.Stat(ctx, key); err != nil || info.Size != 0 {
			t.Fatalf("http Stat = %+v, %v", info, err)
		}
		if n, err := hst.ReadAt(ctx, key, p, 0, objstore.ReadOptions{}); n != 0 || err != io.EOF {
			t.Fatalf("http read of empty object = %d, %v", n, err)
		}
	})

	t.Run("PublicBucket", func(t *testing.T) {
		m.MakeBucket(t, "public")
		m.MakePublic(t, "public")
		if err := s3Store(t, m, "public").Put(ctx, "img.raw", bytes.NewReader(pattern(1000, 1)), 1000, nil); err != nil {
			t.Fatal(err)
		}
		st, key, err := objstore.Open(ctx, m.URL("public", "img.raw"), objstore.Config{})
		if err != nil {
			t.Fatal(err)
		}
		if info, err := st.Stat(ctx, key); err != nil || info.Size != 1000 {
			t.Fatalf("public Stat = %+v, %v", info, err)
		}
		// Anonymous S3 access to a public bucket.
		cfg := m.Config()
		cfg.AccessKey, cfg.SecretKey, cfg.Anonymous = "", "", true
		anon, key, err := objstore.Open(ctx, "s3://public/img.raw", cfg)
		if err != nil {
			t.Fatal(err)
		}
		if info, err := anon.Stat(ctx, key); err != nil || info.Size != 1000 {
			t.Fatalf("anonymous Stat = %+v, %v", info, err)
		}
		if err := anon.Put(ctx, "evil", strings.NewReader("x"), 1, nil); !errors.Is(err, objstore.ErrForbidden) {
			t.Fatalf("anonymous Put: %v", err)
		}
	})

	t.Run("EnvConfig", func(t *testing.T) {
		for _, kv := range m.Env() {
			k, v, _ := strings.Cut(kv, "=")
			t.Setenv(k, v)
		}
		st, key, err := objstore.Open(ctx, "s3://images/vm/disk.qcow2", objstore.Config{PathStyle: objstore.PathStyleOn})
		if err != nil {
			t.Fatal(err)
		}
		if info, err := st.Stat(ctx, key); err != nil || info.Size != 200000 {
			t.Fatalf("Stat via environment = %+v, %v", info, err)
		}
		t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
		st, key, _ = objstore.Open(ctx, "s3://images/vm/disk.qcow2", objstore.Config{PathStyle: objstore.PathStyleOn})
		_, err = st.Stat(ctx, key)
		if !errors.Is(err, objstore.ErrForbidden) || strings.Contains(err.Error(), "wrong-secret") {
			t.Fatalf("bad credentials: %v", err)
		}
	})

	t.Run("ServerRestart", func(t *testing.T) {
		// With the server down, reads fail with retryable errors; with
		// WithRetry they succeed once it is back.
		var logs syncBuffer
		pol := objstore.RetryPolicy{MaxAttempts: 40, BaseDelay: 50 * time.Millisecond, MaxDelay: 500 * time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(&logs, nil))}
		rst := objstore.WithRetry(st, pol)
		m.Stop()
		p := make([]byte, 100)
		if _, err := st.ReadAt(ctx, "vm/disk.qcow2", p, 0, objstore.ReadOptions{}); err == nil || !objstore.IsRetryable(err) {
			t.Fatalf("read with server down: %v (retryable %v)", err, objstore.IsRetryable(err))
		}
		done := make(chan error, 1)
		go func() {
			_, err := rst.ReadAt(ctx, "vm/disk.qcow2", p, 0, objstore.ReadOptions{})
			done <- err
		}()
		time.Sleep(300 * time.Millisecond)
		m.Start(t)
		if err := <-done; err != nil {
			t.Fatalf("read across restart: %v\n%s", err, logs.String())
		}
		if !strings.Contains(logs.String(), "retrying") {
			t.Fatalf("no retry logged:\n%s", logs.String())
		}
		if !bytes.Equal(p, pattern(200000, 4)[:100]) {
			t.Fatal("wrong data after restart")
		}
	})
}

// The harness's client must see what objstore wrote (same server, same
// credentials).
func TestHarnessClient(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a MinIO server")
	}
	ctx := context.Background()
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "bkt")
	st := s3Store(t, m, "bkt")
	if err := st.Put(ctx, "k", strings.NewReader("value"), 5, nil); err != nil {
		t.Fatal(err)
	}
	obj, err := m.Client(t).GetObject(ctx, "bkt", "k", minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(obj)
	if err != nil || string(b) != "value" {
		t.Fatalf("read back %q, %v", b, err)
	}
	if !m.Running() {
		t.Fatal("not running")
	}
	m.Stop()
	if m.Running() {
		t.Fatal("still running after Stop")
	}
}
