package qcow2

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

func TestResolveName(t *testing.T) {
	ok := map[[2]string]string{
		{"vm/top.qcow2", "base.qcow2"}:        "vm/base.qcow2",
		{"vm/top.qcow2", "./base.qcow2"}:      "vm/base.qcow2",
		{"vm/top.qcow2", "sub/base.qcow2"}:    "vm/sub/base.qcow2",
		{"vm/top.qcow2", "sub/../base.qcow2"}: "vm/base.qcow2",
		{"vm/top.qcow2", "sub/a:b.qcow2"}:     "vm/sub/a:b.qcow2",
		{"top.qcow2", "base.qcow2"}:           "base.qcow2",
		{"a/b/c/top.qcow2", "d/e/base.qcow2"}: "a/b/c/d/e/base.qcow2",
	}
	for in, want := range ok {
		got, err := resolveName(in[0], in[1], "backing file")
		if err != nil || got != want {
			t.Errorf("resolveName(%q, %q) = %q, %v; want %q", in[0], in[1], got, err, want)
		}
	}
	for _, name := range []string{"/abs", "..", "../x", "a/../../x", ".", "", "http://h/x", "nbd:h:1", "file:x",
		"json:{}", "s3:bucket/key", "x\x00y", "C:x", "d/../../c/x.raw"} {
		if got, err := resolveName("vm/top.qcow2", name, "backing file"); err == nil {
			t.Errorf("resolveName(%q) = %q, want a refusal", name, got)
		}
	}
}

// A backing file name beyond the first 64 KiB of a 2 MiB cluster makes Open
// read more of the header cluster.
func TestHeaderNeedsMoreThanFirstRead(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
	qio(t, dir, "base.qcow2", "qcow2", "write -P 0x61 0 4M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M")
	f := loadImg(t, filepath.Join(dir, "top.qcow2"))
	old := int(f.u64(8))
	name := strings.Repeat("x/../", 100) + "base.qcow2"
	clear(f.b[old : old+int(f.u32(16))])
	const at = 300000 // past the first read (firstHeaderRead)
	copy(f.b[at:], name)
	f.put64(8, at)
	f.put32(16, uint32(len(name)))
	st := newDirStore(dir)
	key := f.save("far.qcow2")
	st.resetLog()
	im, err := Open(context.Background(), st, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	reads := 0
	for _, r := range st.resetLog() {
		if r.key == key && r.off == 0 {
			reads++
		}
	}
	if reads != 2 {
		t.Fatalf("header read %d times, want 2", reads)
	}
	in, err := im.Info(context.Background())
	if err != nil || in.BackingFile != name || in.Backing == nil {
		t.Fatalf("Info: %+v, %v", in, err)
	}
	buf := make([]byte, 4096)
	if _, err := im.ReadAt(buf, 1<<20); err != nil || buf[0] != 0x61 {
		t.Fatal(err, buf[0])
	}
}

func TestParseHeaderPrefix(t *testing.T) {
	// Too short to know: ask for more.
	if _, err := parseHeader([]byte("QFI\xfb"), 1<<20); err == nil || !strings.Contains(err.Error(), "need") {
		t.Fatalf("4-byte prefix: %v", err)
	}
}
