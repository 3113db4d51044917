package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapfs/snapfs/objstore"
)

// Byte-patched images: each is refused or fails with the right error and
// message, and nothing panics.

type imgFile struct {
	t    *testing.T
	path string
	b    []byte
}

func loadImg(t *testing.T, path string) *imgFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return &imgFile{t: t, path: path, b: b}
}

func (f *imgFile) u32(off int) uint32      { return binary.BigEndian.Uint32(f.b[off:]) }
func (f *imgFile) u64(off int) uint64      { return binary.BigEndian.Uint64(f.b[off:]) }
func (f *imgFile) put32(off int, v uint32) { binary.BigEndian.PutUint32(f.b[off:], v) }
func (f *imgFile) put64(off int, v uint64) { binary.BigEndian.PutUint64(f.b[off:], v) }

func (f *imgFile) save(name string) string {
	f.t.Helper()
	p := filepath.Join(filepath.Dir(f.path), name)
	if err := os.WriteFile(p, f.b, 0o644); err != nil {
		f.t.Fatal(err)
	}
	return name
}

// ext returns the data offset and length of the first header extension of
// type typ.
func (f *imgFile) ext(typ uint32) (int, int) {
	off := 72
	if f.u32(4) == 3 {
		off = int(f.u32(100))
	}
	for off+8 <= len(f.b) {
		ty, n := f.u32(off), int(f.u32(off+4))
		if ty == 0 {
			break
		}
		if ty == typ {
			return off + 8, n
		}
		off += 8 + (n+7)&^7
	}
	f.t.Fatalf("no header extension %#x", typ)
	return 0, 0
}

// setBacking rewrites the backing file name.
func (f *imgFile) setBacking(name string) {
	bo := int(f.u64(8))
	if bo == 0 || bo+len(name) > 65536 {
		f.t.Fatal("image has no room for a backing name")
	}
	copy(f.b[bo:], name)
	f.put32(16, uint32(len(name)))
}

// l2EntryOff returns the file offset of the L2 entry of guest cluster i
// (64 KiB clusters, first L2 table).
func (f *imgFile) l2EntryOff(i int) int {
	l1 := int(f.u64(40))
	l2 := int(f.u64(l1) & offsetMask)
	if l2 == 0 {
		f.t.Fatal("no L2 table")
	}
	return l2 + 8*i
}

type outcome struct {
	sentinel error  // ErrNotQCOW2, ErrCorrupt, ErrUnsupported
	msg      string // substring of the error
}

func expectOpenErr(t *testing.T, st *dirStore, key string, want outcome) {
	t.Helper()
	im, err := Open(context.Background(), st, key, nil)
	if err == nil {
		im.Close()
		t.Fatalf("Open(%s) succeeded, want %v", key, want.msg)
	}
	var qe *Error
	if !errors.As(err, &qe) || qe.URL != st.URL(key) || qe.Offset != -1 {
		t.Fatalf("Open(%s) error %#v is not an *Error naming the image", key, err)
	}
	if !errors.Is(err, want.sentinel) || !strings.Contains(err.Error(), want.msg) {
		t.Fatalf("Open(%s) = %v; want %v containing %q", key, err, want.sentinel, want.msg)
	}
	in, ierr := Inspect(context.Background(), st, key)
	if want.sentinel == ErrUnsupported {
		if ierr != nil || in.Servable || !strings.Contains(in.Reason, want.msg) {
			t.Fatalf("Inspect(%s) = %+v, %v; want not servable because %q", key, in, ierr, want.msg)
		}
	} else if ierr == nil || !errors.Is(ierr, want.sentinel) {
		t.Fatalf("Inspect(%s) = %v; want %v", key, ierr, want.sentinel)
	}
}

func makeBase(t *testing.T) (string, *dirStore) {
	t.Helper()
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "img.qcow2", "4M")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 0x11 0 1M", "write -P 0x22 2M 64k")
	return dir, newDirStore(dir)
}

func TestMalformedHeaders(t *testing.T) {
	dir, st := makeBase(t)
	cases := []struct {
		name  string
		patch func(f *imgFile)
		want  outcome
	}{
		{"bad magic", func(f *imgFile) { f.b[3] = 0 }, outcome{ErrNotQCOW2, "bad magic"}},
		{"version 4", func(f *imgFile) { f.put32(4, 4) }, outcome{ErrUnsupported, "unsupported QCOW2 version 4"}},
		{"cluster_bits 8", func(f *imgFile) { f.put32(20, 8) }, outcome{ErrCorrupt, "cluster_bits 8"}},
		{"cluster_bits 22", func(f *imgFile) { f.put32(20, 22) }, outcome{ErrUnsupported, "cluster size 2^22"}},
		{"l1_size too small", func(f *imgFile) { f.put32(36, 0) }, outcome{ErrCorrupt, "does not cover the virtual size"}},
		{"size too large for l1", func(f *imgFile) { f.put64(24, 1<<40) }, outcome{ErrCorrupt, "does not cover the virtual size"}},
		{"L1 past EOF", func(f *imgFile) { f.put64(40, 1<<40) }, outcome{ErrCorrupt, "L1 table"}},
		{"L1 misaligned", func(f *imgFile) { f.put64(40, f.u64(40)+8) }, outcome{ErrCorrupt, "not cluster aligned"}},
		{"huge l1_size", func(f *imgFile) { f.put32(36, 0xffffffff) }, outcome{ErrCorrupt, "exceeds the 32 MiB limit"}},
		{"refcount_order 7", func(f *imgFile) { f.put32(96, 7) }, outcome{ErrCorrupt, "refcount_order 7"}},
		{"header_length past cluster", func(f *imgFile) { f.put32(100, 65536+8) }, outcome{ErrCorrupt, "exceeds the cluster size"}},
		{"header_length unaligned", func(f *imgFile) { f.put32(100, 108) }, outcome{ErrCorrupt, "header_length 108"}},
		{"extension length overflow", func(f *imgFile) { f.put32(int(f.u32(100))+4, 0xfffffff0) }, outcome{ErrCorrupt, "overflows the header area"}},
		{"refcount table past EOF", func(f *imgFile) { f.put32(56, 1<<20) }, outcome{ErrCorrupt, "refcount table"}},
		{"too many snapshots", func(f *imgFile) { f.put32(60, 70000) }, outcome{ErrCorrupt, "nb_snapshots 70000"}},
		{"snapshots past EOF", func(f *imgFile) { f.put32(60, 2); f.put64(64, 1<<30) }, outcome{ErrCorrupt, "snapshot table"}},
		{"AES", func(f *imgFile) { f.put32(32, 1) }, outcome{ErrUnsupported, "encrypted with AES"}},
		{"LUKS bit", func(f *imgFile) { f.put32(32, 2) }, outcome{ErrUnsupported, "encrypted with LUKS"}},
		{"unknown incompatible bit named", func(f *imgFile) {
			off, n := f.ext(extFeatureTable)
			found := false
			for e := off; e+48 <= off+n; e += 48 {
				if f.b[e] == 0 && f.b[e+1] == 4 { // "extended L2 entries"
					f.b[e+1] = 9
					copy(f.b[e+2:e+48], append([]byte("fancy"), make([]byte, 41)...))
					found = true
				}
			}
			if !found {
				t.Fatal("feature table has no entry for incompatible bit 4")
			}
			f.put64(72, f.u64(72)|1<<9)
		}, outcome{ErrUnsupported, `unknown incompatible feature bit 9 ("fancy")`}},
		{"unknown incompatible bit unnamed", func(f *imgFile) { f.put64(72, 1<<40) }, outcome{ErrUnsupported, "unknown incompatible feature bit 40"}},
		{"compression type without bit", func(f *imgFile) { f.b[104] = 1 }, outcome{ErrCorrupt, "compression type"}},
		{"unknown compression type", func(f *imgFile) { f.b[104] = 7; f.put64(72, f.u64(72)|incCompression) }, outcome{ErrUnsupported, "unknown compression type 7"}},
		{"data file bit without name", func(f *imgFile) { f.put64(72, f.u64(72)|incDataFile) }, outcome{ErrUnsupported, "external data file"}},
		{"truncated", func(f *imgFile) { f.b = f.b[:100] }, outcome{ErrCorrupt, "header"}},
		{"empty", func(f *imgFile) { f.b = nil }, outcome{ErrNotQCOW2, "too short"}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := loadImg(t, filepath.Join(dir, "img.qcow2"))
			c.patch(f)
			key := f.save("case" + string(rune('a'+i)) + ".qcow2")
			expectOpenErr(t, st, key, c.want)
		})
	}
}

func TestMalformedBackingNames(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "aaa.qcow2", "4M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "bbb.qcow2", "4M")
	st := newDirStore(dir)
	for name, want := range map[string]string{
		"/etc/passwd":                   `"/etc/passwd" is absolute`,
		"../base.qcow2":                 "escapes the image's directory",
		"x/../../base.qcow2":            "escapes the image's directory",
		`json:{"file.filename":"/x"}`:   "json: pseudo-protocol",
		"http://example.com/base.qcow2": "looks like a protocol",
		"nbd:localhost:10809":           "looks like a protocol",
		"file:base.qcow2":               "looks like a protocol",
		"top-self.qcow2":                "backing loop",
		"missing.qcow2":                 `backing file "missing.qcow2" (` + st.URL("missing.qcow2") + ") not found",
	} {
		t.Run(name, func(t *testing.T) {
			f := loadImg(t, filepath.Join(dir, "top.qcow2"))
			f.setBacking(name)
			expectOpenErr(t, st, f.save("top-self.qcow2"), outcome{ErrUnsupported, want})
		})
	}
	// A two-image loop.
	a := loadImg(t, filepath.Join(dir, "aaa.qcow2"))
	a.setBacking("bbb.qcow2")
	a.save("aaa.qcow2")
	b := loadImg(t, filepath.Join(dir, "bbb.qcow2"))
	b.setBacking("aaa.qcow2")
	b.save("bbb.qcow2")
	expectOpenErr(t, st, "aaa.qcow2", outcome{ErrUnsupported, "backing loop: " + st.URL("aaa.qcow2") + " appears twice"})

	// A missing backing file also matches objstore.ErrNotFound.
	if err := os.Remove(filepath.Join(dir, "base.qcow2")); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), st, "top.qcow2", nil)
	if !errors.Is(err, ErrUnsupported) || !errors.Is(err, objstore.ErrNotFound) || !strings.Contains(err.Error(), `backing file "base.qcow2"`) {
		t.Fatalf("missing backing: %v", err)
	}
}

func TestMalformedDataFileNames(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "img.qcow2", "4M")
	st := newDirStore(dir)
	for name, want := range map[string]string{
		"/ata.raw": "is absolute",
		"../a.raw": "escapes",
		"s3:a.raw": "looks like a protocol",
		"nodata.r": `external data file "nodata.r"`,
	} {
		f := loadImg(t, filepath.Join(dir, "img.qcow2"))
		off, n := f.ext(extDataFile)
		if n != len(name) {
			t.Fatalf("data file extension is %d bytes", n)
		}
		copy(f.b[off:], name)
		expectOpenErr(t, st, f.save("bad.qcow2"), outcome{ErrUnsupported, want})
	}
}

// Bad L2 entries fail the reads that touch them, with the guest offset,
// and leave the rest of the image readable.
func TestMalformedL2Entries(t *testing.T) {
	dir, st := makeBase(t)
	cases := []struct {
		name  string
		patch func(f *imgFile, e int)
		msg   string
	}{
		{"reserved bits", func(f *imgFile, e int) { f.put64(e, f.u64(e)|1<<3) }, "reserved bits"},
		{"reserved high bits", func(f *imgFile, e int) { f.put64(e, f.u64(e)|1<<58) }, "reserved bits"},
		{"misaligned", func(f *imgFile, e int) { f.put64(e, f.u64(e)+512) }, "not cluster aligned"},
		{"past EOF", func(f *imgFile, e int) { f.put64(e, 1<<63|1<<40) }, "past the end"},
		{"compressed past EOF", func(f *imgFile, e int) { f.put64(e, 1<<62|0x3fffffffffffffff) }, "past the end"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := loadImg(t, filepath.Join(dir, "img.qcow2"))
			c.patch(f, f.l2EntryOff(2))
			key := f.save("bad.qcow2")
			im, err := Open(context.Background(), st, key, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			checkBadCluster(t, im, 2, 0x11, c.msg)
			if _, err := im.Map(context.Background(), 0, im.Size()); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Map: %v", err)
			}
			if ext, err := im.Map(context.Background(), 0, 2*im.ClusterSize()); err != nil || len(ext) != 1 || ext[0].Kind != Data {
				t.Fatalf("Map of the good clusters: %+v, %v", ext, err)
			}
		})
	}
}

// checkBadCluster checks that reads touching guest cluster bad fail with
// its offset and msg, and that cluster 0 still reads want.
func checkBadCluster(t *testing.T, im *Image, bad int64, want byte, msg string) {
	t.Helper()
	cs := im.ClusterSize()
	buf := make([]byte, 3*cs)
	for _, off := range []int64{bad * cs, (bad-1)*cs + 100} {
		_, err := im.ReadAt(buf, off)
		var qe *Error
		if !errors.As(err, &qe) || !errors.Is(err, ErrCorrupt) || qe.Offset != bad*cs || !strings.Contains(err.Error(), msg) {
			t.Fatalf("ReadAt(%d) = %v; want ErrCorrupt at guest offset %d with %q", off, err, bad*cs, msg)
		}
	}
	for i := 0; i < 2; i++ { // the failure leaves no poisoned state
		if _, err := im.ReadAt(buf[:cs], 0); err != nil || buf[0] != want {
			t.Fatalf("cluster 0 after a bad read: %v %#x", err, buf[0])
		}
	}
	if _, err := im.Info(context.Background()); err != nil {
		t.Fatalf("Info: %v", err)
	}
}

func TestMalformedCompressedStream(t *testing.T) {
	needQemu(t)
	for _, ctype := range []string{"zlib", "zstd"} {
		t.Run(ctype, func(t *testing.T) {
			dir := t.TempDir()
			text := make([]byte, 1<<20)
			for i := range text {
				text[i] = "abcdefgh\n"[i%9]
			}
			if err := os.WriteFile(dir+"/src.raw", text, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type="+ctype, "src.raw", "img.qcow2")
			st := newDirStore(dir)
			im, err := Open(context.Background(), st, "img.qcow2", nil)
			if err != nil {
				t.Fatal(err)
			}
			m2, _ := im.lookup(context.Background(), 2*65536)
			m3, _ := im.lookup(context.Background(), 3*65536)
			im.Close()
			if m2.kind != Compressed || m3.kind != Compressed {
				t.Fatal("clusters 2 and 3 are not compressed")
			}
			f := loadImg(t, filepath.Join(dir, "img.qcow2"))
			for i := m2.host + 2; i < min(m2.host+m2.clen, m3.host); i++ {
				f.b[i] ^= 0x5a
			}
			im, err = Open(context.Background(), st, f.save("bad.qcow2"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			checkBadCluster(t, im, 2, 'a', "compressed cluster")
			// The cluster after the bad one is fine.
			buf := make([]byte, 65536)
			if _, err := im.ReadAt(buf, 3*65536); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Feature bits that are served and reported.
func TestServedFeatureBits(t *testing.T) {
	dir, st := makeBase(t)
	f := loadImg(t, filepath.Join(dir, "img.qcow2"))
	f.put64(72, f.u64(72)|incDirty|incCorrupt)
	f.put64(80, f.u64(80)|1<<5)
	f.put64(88, f.u64(88)|1<<7)
	key := f.save("bits.qcow2")
	im, err := Open(context.Background(), st, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	buf := make([]byte, 4096)
	if _, err := im.ReadAt(buf, 2<<20); err != nil || buf[0] != 0x22 {
		t.Fatal(err, buf[0])
	}
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !in.Dirty || !in.Corrupt || in.UnknownCompat != 1<<5 || in.UnknownAutoclear != 1<<7 || !in.Servable ||
		len(in.Incompatible) != 2 || in.Incompatible[0].Name != "dirty bit" {
		t.Fatalf("Info = %+v", in)
	}
}

// TestRefused tells refusals of the image from failures to read it.
func TestRefused(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&Error{URL: "u", Offset: -1, Err: ErrNotQCOW2}, true},
		{&Error{URL: "u", Offset: -1, Err: refuse("encrypted")}, true},
		{&Error{URL: "u", Offset: 0, Err: corrupt("L1 entry")}, true},
		{&Error{URL: "u", Offset: -1, Err: &objstore.Error{Op: "stat", URL: "u", Err: objstore.ErrNotFound}}, false},
		{&Error{URL: "u", Offset: -1, Err: io.ErrUnexpectedEOF}, false},
		{nil, false},
	} {
		if got := Refused(c.err); got != c.want {
			t.Errorf("Refused(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
