package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/tests/harness"
)

// uploadsLeft lists the multipart uploads a file store still holds.
func uploadsLeft(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, ".snapfs-uploads"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func TestUploadHeadLast(t *testing.T) {
	ctx := context.Background()
	st, dir := newFileStore(t)
	head := pattern(objstore.MinPartSize, 1)
	body := pattern(11<<20+123, 2)
	u, err := objstore.NewUpload(ctx, st, "vm/disk.qcow2", objstore.UploadOptions{PartSize: objstore.MinPartSize, Meta: map[string]string{"snapfs-source": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	// Written in odd-sized pieces, across part boundaries.
	for p := body; len(p) > 0; {
		n := min(len(p), 777777)
		if _, err := u.Write(p[:n]); err != nil {
			t.Fatal(err)
		}
		p = p[n:]
	}
	if _, err := st.Stat(ctx, "vm/disk.qcow2"); err == nil {
		t.Fatal("object visible before WriteHead")
	}
	if err := u.WriteHead(head); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "vm/disk.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append(append([]byte(nil), head...), body...)) {
		t.Fatal("object is not head + body")
	}
	if u.Sent() != int64(len(got)) {
		t.Errorf("Sent %d, want %d", u.Sent(), len(got))
	}
	info, err := st.Stat(ctx, "vm/disk.qcow2")
	if err != nil || info.Metadata["snapfs-source"] != "x" {
		t.Fatalf("metadata %v (%v)", info.Metadata, err)
	}
	if err := st.ReplaceMetadata(ctx, "vm/disk.qcow2", info.ETag, map[string]string{"snapfs-source": "x", "snapfs-raw-sha256": "ab"}); err != nil {
		t.Fatal(err)
	}
	if info, _ := st.Stat(ctx, "vm/disk.qcow2"); info.Metadata["snapfs-raw-sha256"] != "ab" {
		t.Errorf("metadata after replace: %v", info.Metadata)
	}
	if err := st.ReplaceMetadata(ctx, "vm/disk.qcow2", "other", nil); !errors.Is(err, objstore.ErrChanged) {
		t.Errorf("replace with a stale ETag: %v", err)
	}
	if left := uploadsLeft(t, dir); len(left) != 0 {
		t.Errorf("uploads left: %v", left)
	}
}

func TestUploadSmallSinglePart(t *testing.T) {
	ctx := context.Background()
	st, dir := newFileStore(t)
	u, err := objstore.NewUpload(ctx, st, "small", objstore.UploadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := u.WriteHead([]byte("tiny")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "small")); string(b) != "tiny" {
		t.Fatalf("object %q", b)
	}
}

func TestUploadAbort(t *testing.T) {
	ctx := context.Background()
	st, dir := newFileStore(t)

	// Abort after some parts went out.
	u, err := objstore.NewUpload(ctx, st, "a", objstore.UploadOptions{PartSize: objstore.MinPartSize})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Write(pattern(12<<20, 3)); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("source failed")
	if err := u.Abort(boom); !errors.Is(err, boom) {
		t.Errorf("Abort returned %v", err)
	}
	if _, err := u.Write([]byte("x")); err == nil {
		t.Error("Write after Abort succeeded")
	}

	// A head below the part minimum with a body: refused and aborted.
	u, err = objstore.NewUpload(ctx, st, "b", objstore.UploadOptions{PartSize: objstore.MinPartSize})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Write(pattern(1<<20, 4)); err != nil {
		t.Fatal(err)
	}
	if err := u.WriteHead([]byte("short")); err == nil || !strings.Contains(err.Error(), "minimum") {
		t.Errorf("short head: %v", err)
	}

	// A cancelled context fails the next Write and aborts.
	cctx, cancel := context.WithCancel(ctx)
	u, err = objstore.NewUpload(cctx, st, "c", objstore.UploadOptions{PartSize: objstore.MinPartSize})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Write(pattern(6<<20, 5)); err != nil {
		t.Fatal(err)
	}
	cancel()
	var werr error
	for i := 0; i < 10 && werr == nil; i++ {
		_, werr = u.Write(pattern(6<<20, 5))
	}
	if !errors.Is(werr, context.Canceled) {
		t.Errorf("Write after cancel: %v", werr)
	}
	if err := u.Abort(werr); !errors.Is(err, context.Canceled) {
		t.Errorf("Abort: %v", err)
	}

	for _, k := range []string{"a", "b", "c"} {
		if _, err := st.Stat(ctx, k); !errors.Is(err, objstore.ErrNotFound) {
			t.Errorf("%s: object visible after an aborted upload (%v)", k, err)
		}
	}
	if left := uploadsLeft(t, dir); len(left) != 0 {
		t.Errorf("uploads left: %v", left)
	}
}

func TestPartSizeFor(t *testing.T) {
	for _, c := range []struct{ size, min, want int64 }{
		{0, 0, objstore.MinPartSize},
		{100 << 30, 8 << 20, 11 << 20},
		{1 << 40, 8 << 20, 105 << 20},
	} {
		got := objstore.PartSizeFor(c.size, c.min)
		if got != c.want {
			t.Errorf("PartSizeFor(%d, %d) = %d, want %d", c.size, c.min, got, c.want)
		}
		if c.size > 0 && (c.size+got-1)/got > objstore.MaxPartCount-1 {
			t.Errorf("PartSizeFor(%d): %d parts", c.size, (c.size+got-1)/got)
		}
	}
}

// TestS3UploadAndReplaceMetadata streams an object into MinIO with part 1
// last, then replaces its metadata by a multipart copy onto itself.
func TestS3UploadAndReplaceMetadata(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a MinIO server")
	}
	ctx := context.Background()
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "uploads")
	st := s3Store(t, m, "uploads")
	head, body := pattern(objstore.MinPartSize, 7), pattern(7<<20+5, 8)
	u, err := objstore.NewUpload(ctx, st, "vm.qcow2", objstore.UploadOptions{PartSize: objstore.MinPartSize, Meta: map[string]string{"snapfs-source": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := u.WriteHead(head); err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte(nil), head...), body...)
	check := func(what string) objstore.ObjectInfo {
		info, err := st.Stat(ctx, "vm.qcow2")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want)+1)
		n, _ := st.ReadAt(ctx, "vm.qcow2", got, 0, objstore.ReadOptions{})
		if !bytes.Equal(got[:n], want) {
			t.Fatalf("%s: object content differs (%d bytes)", what, n)
		}
		return info
	}
	info := check("after the upload")
	defer objstore.SetCopyPartSize(8 << 20)() // two even copy parts of about 6 MiB
	mr := st.(objstore.MetadataReplacer)
	if err := mr.ReplaceMetadata(ctx, "vm.qcow2", "stale", map[string]string{"a": "b"}); !errors.Is(err, objstore.ErrChanged) {
		t.Errorf("stale ETag: %v", err)
	}
	if err := mr.ReplaceMetadata(ctx, "vm.qcow2", info.ETag, map[string]string{"snapfs-source": "x", "snapfs-raw-sha256": "cd"}); err != nil {
		t.Fatal(err)
	}
	info = check("after the metadata copy")
	if info.Metadata["snapfs-raw-sha256"] != "cd" || info.Metadata["snapfs-source"] != "x" {
		t.Errorf("metadata %v", info.Metadata)
	}
	core := minio.Core{Client: m.Client(t)}
	res, err := core.ListMultipartUploads(ctx, "uploads", "", "", "", "", 100)
	if err != nil || len(res.Uploads) != 0 {
		t.Errorf("multipart uploads left: %v (%v)", res.Uploads, err)
	}
}
