package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snapfs/snapfs/objstore"
)

func newFileStore(t *testing.T) (*objstore.FileStore, string) {
	t.Helper()
	dir := t.TempDir()
	st, err := objstore.NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st, dir
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}

func TestFilePutStatReadListDelete(t *testing.T) {
	ctx := context.Background()
	st, dir := newFileStore(t)
	data := pattern(10000, 1)
	if err := st.Put(ctx, "a/b/disk.qcow2", bytes.NewReader(data), int64(len(data)), map[string]string{"Snapfs-Kind": "qcow2"}); err != nil {
		t.Fatal(err)
	}
	if err := st.Put(ctx, "a.txt", strings.NewReader("hello"), 5, nil); err != nil {
		t.Fatal(err)
	}
	info, err := st.Stat(ctx, "a/b/disk.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(data)) || info.ETag == "" || info.Key != "a/b/disk.qcow2" {
		t.Fatalf("stat: %+v", info)
	}
	if info.Metadata["snapfs-kind"] != "qcow2" {
		t.Fatalf("metadata: %v", info.Metadata)
	}
	again, err := st.Stat(ctx, "a/b/disk.qcow2")
	if err != nil || again.ETag != info.ETag {
		t.Fatalf("ETag not stable: %q vs %q (%v)", again.ETag, info.ETag, err)
	}

	p := make([]byte, 300)
	n, err := st.ReadAt(ctx, "a/b/disk.qcow2", p, 4000, objstore.ReadOptions{IfMatch: info.ETag})
	if err != nil || n != 300 || !bytes.Equal(p, data[4000:4300]) {
		t.Fatalf("ReadAt = %d, %v; data ok %v", n, err, bytes.Equal(p, data[4000:4300]))
	}

	// The sidecar and directories are on disk but not objects.
	if _, err := os.Stat(filepath.Join(dir, "a/b/.disk.qcow2.snapfs-meta.json")); err != nil {
		t.Fatalf("sidecar missing: %v", err)
	}
	list, err := st.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, o := range list {
		keys = append(keys, o.Key)
	}
	// "a.txt" sorts before "a/b/..." ('.' < '/').
	if strings.Join(keys, ",") != "a.txt,a/b/disk.qcow2" {
		t.Fatalf("List = %v", keys)
	}
	if list[1].Size != int64(len(data)) || list[1].ETag != info.ETag {
		t.Fatalf("List entry %+v", list[1])
	}
	for prefix, want := range map[string]string{"a/": "a/b/disk.qcow2", "a/b/d": "a/b/disk.qcow2", "a.": "a.txt", "zz": "", "a/c/": ""} {
		list, err := st.List(ctx, prefix)
		if err != nil {
			t.Fatalf("List(%q): %v", prefix, err)
		}
		var got []string
		for _, o := range list {
			got = append(got, o.Key)
		}
		if strings.Join(got, ",") != want {
			t.Errorf("List(%q) = %v, want %q", prefix, got, want)
		}
	}

	if err := st.Delete(ctx, "a/b/disk.qcow2"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Stat(ctx, "a/b/disk.qcow2"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("stat after delete: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "a/b/.disk.qcow2.snapfs-meta.json")); !os.IsNotExist(err) {
		t.Fatalf("sidecar left behind: %v", err)
	}
	if err := st.Delete(ctx, "a/b/disk.qcow2"); err != nil {
		t.Fatalf("deleting a missing key: %v", err)
	}
	_, err = st.ReadAt(ctx, "missing", p, 0, objstore.ReadOptions{})
	var oe *objstore.Error
	if !errors.Is(err, objstore.ErrNotFound) || !errors.As(err, &oe) || oe.Op != "read" || !strings.HasPrefix(oe.URL, "file://") {
		t.Fatalf("read missing: %#v", err)
	}
}

func TestFileReadPastEOF(t *testing.T) {
	ctx := context.Background()
	st, _ := newFileStore(t)
	data := pattern(1000, 3)
	if err := st.Put(ctx, "obj", bytes.NewReader(data), int64(len(data)), nil); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 100)
	n, err := st.ReadAt(ctx, "obj", p, 950, objstore.ReadOptions{})
	if n != 50 || err != io.EOF || !bytes.Equal(p[:50], data[950:]) {
		t.Fatalf("read across EOF: n=%d err=%v", n, err)
	}
	n, err = st.ReadAt(ctx, "obj", p, 1000, objstore.ReadOptions{})
	if n != 0 || err != io.EOF {
		t.Fatalf("read at EOF: n=%d err=%v", n, err)
	}
	n, err = st.ReadAt(ctx, "obj", p, 5000, objstore.ReadOptions{})
	if n != 0 || err != io.EOF {
		t.Fatalf("read past EOF: n=%d err=%v", n, err)
	}
	if _, err := st.ReadAt(ctx, "obj", p, -1, objstore.ReadOptions{}); !errors.Is(err, objstore.ErrRange) {
		t.Fatalf("negative offset: %v", err)
	}
}

func TestFileIfMatchAfterOverwrite(t *testing.T) {
	ctx := context.Background()
	st, _ := newFileStore(t)
	if err := st.Put(ctx, "img", bytes.NewReader(pattern(4096, 1)), 4096, nil); err != nil {
		t.Fatal(err)
	}
	info, err := st.Stat(ctx, "img")
	if err != nil {
		t.Fatal(err)
	}
	// Same size, new content: the ETag must still change.
	if err := st.Put(ctx, "img", bytes.NewReader(pattern(4096, 2)), 4096, nil); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 16)
	if _, err := st.ReadAt(ctx, "img", p, 0, objstore.ReadOptions{IfMatch: info.ETag}); !errors.Is(err, objstore.ErrChanged) {
		t.Fatalf("read with stale IfMatch: %v", err)
	}
	now, _ := st.Stat(ctx, "img")
	if now.ETag == info.ETag {
		t.Fatal("ETag did not change on overwrite")
	}
	if _, err := st.ReadAt(ctx, "img", p, 0, objstore.ReadOptions{IfMatch: now.ETag}); err != nil {
		t.Fatalf("read with current IfMatch: %v", err)
	}
	// An in-place modification (same inode) changes the ETag too.
	path := filepath.Join(st.Dir(), "img")
	later := time.Now().Add(time.Second)
	if err := os.Chtimes(path, later, later); err != nil {
		t.Fatal(err)
	}
	if _, err := st.ReadAt(ctx, "img", p, 0, objstore.ReadOptions{IfMatch: now.ETag}); !errors.Is(err, objstore.ErrChanged) {
		t.Fatalf("read after in-place change: %v", err)
	}

	// Through WithPinning: Stat pins, the overwrite breaks the pin.
	pinned := objstore.WithPinning(st)
	if _, err := pinned.Stat(ctx, "img"); err != nil {
		t.Fatal(err)
	}
	if _, err := pinned.ReadAt(ctx, "img", p, 0, objstore.ReadOptions{}); err != nil {
		t.Fatalf("pinned read before overwrite: %v", err)
	}
	if err := st.Put(ctx, "img", bytes.NewReader(pattern(4096, 3)), 4096, nil); err != nil {
		t.Fatal(err)
	}
	_, err = pinned.ReadAt(ctx, "img", p, 0, objstore.ReadOptions{})
	if !errors.Is(err, objstore.ErrChanged) || !strings.Contains(err.Error(), "object changed since it was opened") {
		t.Fatalf("pinned read after overwrite: %v", err)
	}
	if _, err := pinned.Stat(ctx, "img"); !errors.Is(err, objstore.ErrChanged) {
		t.Fatalf("pinned stat after overwrite: %v", err)
	}
}

// failingReader returns some bytes, then an error.
type failingReader struct {
	data []byte
	err  error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestFilePartialPutNeverVisible(t *testing.T) {
	ctx := context.Background()
	st, dir := newFileStore(t)
	boom := errors.New("source broke")
	err := st.Put(ctx, "d/obj", &failingReader{data: pattern(5000, 1), err: boom}, 10000, map[string]string{"k": "v"})
	if !errors.Is(err, boom) {
		t.Fatalf("Put with failing reader: %v", err)
	}
	if _, err := st.Stat(ctx, "d/obj"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("partial object visible: %v", err)
	}
	// A reader that ends early is a failure too.
	err = st.Put(ctx, "d/obj", bytes.NewReader(pattern(10, 1)), 100, nil)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short body: %v", err)
	}
	// An overwrite that fails leaves the old object intact.
	old := pattern(300, 9)
	if err := st.Put(ctx, "d/obj", bytes.NewReader(old), 300, nil); err != nil {
		t.Fatal(err)
	}
	if err := st.Put(ctx, "d/obj", &failingReader{data: pattern(100, 1), err: boom}, 300, nil); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "d/obj"))
	if err != nil || !bytes.Equal(got, old) {
		t.Fatalf("old object damaged by failed overwrite: %v", err)
	}
	// No temp files left behind.
	entries, _ := os.ReadDir(filepath.Join(dir, "d"))
	for _, e := range entries {
		if e.Name() != "obj" {
			t.Errorf("leftover file %s", e.Name())
		}
	}
	// A cancelled context stops the copy.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := st.Put(cctx, "d/other", bytes.NewReader(old), 300, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Put with cancelled context: %v", err)
	}
	if _, err := st.Stat(ctx, "d/other"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("cancelled Put visible: %v", err)
	}
}

func TestFileMultipartOutOfOrder(t *testing.T) {
	ctx := context.Background()
	st, dir := newFileStore(t)
	id, err := st.CreateMultipart(ctx, "big/image", map[string]string{"Origin": "test"})
	if err != nil {
		t.Fatal(err)
	}
	chunks := [][]byte{pattern(1000, 1), pattern(2000, 2), pattern(10, 3)}
	var parts []objstore.Part
	for _, i := range []int{2, 0, 1} { // upload 3, 1, 2
		p, err := st.UploadPart(ctx, "big/image", id, i+1, bytes.NewReader(chunks[i]), int64(len(chunks[i])))
		if err != nil {
			t.Fatal(err)
		}
		if p.Number != i+1 || p.Size != int64(len(chunks[i])) || p.ETag == "" {
			t.Fatalf("part %+v", p)
		}
		parts = append(parts, p)
	}
	// Not visible before Complete, and the upload directory is hidden.
	if _, err := st.Stat(ctx, "big/image"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("object visible before Complete: %v", err)
	}
	if l, _ := st.List(ctx, ""); len(l) != 0 {
		t.Fatalf("List shows upload internals: %+v", l)
	}
	// A wrong ETag is refused.
	bad := append([]objstore.Part(nil), parts...)
	bad[0].ETag = "0123"
	if err := st.CompleteMultipart(ctx, "big/image", id, bad); err == nil {
		t.Fatal("Complete accepted a wrong ETag")
	}
	if err := st.CompleteMultipart(ctx, "big/image", id, parts); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "big/image"))
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Join(chunks, nil)
	if !bytes.Equal(got, want) {
		t.Fatalf("assembled object wrong (%d bytes, want %d)", len(got), len(want))
	}
	info, err := st.Stat(ctx, "big/image")
	if err != nil || info.Metadata["origin"] != "test" {
		t.Fatalf("stat after complete: %+v %v", info, err)
	}
	if _, err := st.UploadPart(ctx, "big/image", id, 4, strings.NewReader("x"), 1); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("upload to a completed upload: %v", err)
	}

	// Abort removes the upload and its parts.
	id2, err := st.CreateMultipart(ctx, "other", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.UploadPart(ctx, "other", id2, 1, strings.NewReader("abc"), 3); err != nil {
		t.Fatal(err)
	}
	if err := st.AbortMultipart(ctx, "big/image", id2); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("abort with the wrong key: %v", err)
	}
	if err := st.AbortMultipart(ctx, "other", id2); err != nil {
		t.Fatal(err)
	}
	if _, err := st.UploadPart(ctx, "other", id2, 2, strings.NewReader("abc"), 3); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("upload after abort: %v", err)
	}
	if _, err := st.Stat(ctx, "other"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("aborted object exists: %v", err)
	}
	uploads, _ := os.ReadDir(filepath.Join(dir, ".snapfs-uploads"))
	if len(uploads) != 0 {
		t.Fatalf("uploads left: %v", uploads)
	}
	if _, err := st.UploadPart(ctx, "other", "../../etc", 1, strings.NewReader("x"), 1); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("bogus upload id: %v", err)
	}
}

func TestFileKeysCannotEscapeRoot(t *testing.T) {
	ctx := context.Background()
	parent := t.TempDir()
	if err := os.WriteFile(filepath.Join(parent, "secret"), []byte("top secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	rootDir := filepath.Join(parent, "root")
	if err := os.Mkdir(rootDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// A symlink inside the root pointing outside it.
	if err := os.Symlink("../secret", filepath.Join(rootDir, "link")); err != nil {
		t.Fatal(err)
	}
	st, err := objstore.NewFileStore(rootDir)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 10)
	for _, key := range []string{"../secret", "a/../../secret", "/etc/passwd", "", "a//b", "./x", ".snapfs-uploads/x", ".x.snapfs-meta.json"} {
		if _, err := st.ReadAt(ctx, key, p, 0, objstore.ReadOptions{}); !errors.Is(err, objstore.ErrInvalidKey) {
			t.Errorf("ReadAt(%q): %v, want ErrInvalidKey", key, err)
		}
		if err := st.Put(ctx, key, strings.NewReader("x"), 1, nil); !errors.Is(err, objstore.ErrInvalidKey) {
			t.Errorf("Put(%q): %v, want ErrInvalidKey", key, err)
		}
	}
	if _, err := st.ReadAt(ctx, "link", p, 0, objstore.ReadOptions{}); err == nil {
		t.Fatal("read through a symlink escaping the root succeeded")
	} else if !errors.Is(err, objstore.ErrInvalidKey) {
		t.Fatalf("escaping link: %v, want ErrInvalidKey", err)
	} else if strings.Contains(err.Error(), "top secret") {
		t.Fatal("secret leaked")
	}
	if _, err := st.List(ctx, "../"); !errors.Is(err, objstore.ErrInvalidKey) {
		t.Fatalf("List(../): %v", err)
	}
	if l, err := st.List(ctx, ""); err != nil || len(l) != 0 {
		t.Fatalf("List lists an escaping link: %+v %v", l, err)
	}
}

func TestOpenFilePaths(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "disk.qcow2"), []byte("QFI\xfb"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		raw, key string
	}{
		{filepath.Join(dir, "disk.qcow2"), "disk.qcow2"},
		{"file://" + filepath.Join(dir, "disk.qcow2"), "disk.qcow2"},
		{dir, ""},
		{"file://" + dir + "/", ""},
		{filepath.Join(dir, "new.qcow2"), "new.qcow2"}, // not there yet: parent is the root
	}
	for _, c := range cases {
		st, key, err := objstore.Open(ctx, c.raw, objstore.Config{})
		if err != nil {
			t.Fatalf("Open(%q): %v", c.raw, err)
		}
		if key != c.key {
			t.Errorf("Open(%q) key = %q, want %q", c.raw, key, c.key)
		}
		if !strings.HasPrefix(st.URL(key), "file://"+dir) {
			t.Errorf("Open(%q) URL = %q", c.raw, st.URL(key))
		}
	}
	// A relative path resolves against the working directory.
	t.Chdir(dir)
	st, key, err := objstore.Open(ctx, "disk.qcow2", objstore.Config{})
	if err != nil || key != "disk.qcow2" {
		t.Fatalf("Open(relative): %q %v", key, err)
	}
	if info, err := st.Stat(ctx, key); err != nil || info.Size != 4 {
		t.Fatalf("stat via relative path: %+v %v", info, err)
	}
	if _, _, err := objstore.Open(ctx, "ftp://host/x", objstore.Config{}); !errors.Is(err, objstore.ErrNotSupported) {
		t.Fatalf("ftp: %v", err)
	}
}
