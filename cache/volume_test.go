package cache

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"
)

func testSource() VolumeSource {
	return VolumeSource{URL: "s3://b/vm.qcow2", ETag: "abc", VirtualSize: 10<<20 + 512, Granularity: 64 << 10}
}

func TestVolumeCreateSparseAndReopen(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "vol.raw")
	v, err := OpenVolume(target, testSource(), VolumeOptions{FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(target)
	if fi.Size() != 10<<20+512 {
		t.Fatalf("target size %d", fi.Size())
	}
	if v.Granules() != 161 {
		t.Fatalf("granules %d", v.Granules())
	}
	data := make([]byte, 64<<10)
	for i := range data {
		data[i] = byte(i) | 1
	}
	if err := v.WriteData(data, 3*64<<10); err != nil {
		t.Fatal(err)
	}
	if err := v.MarkPresent(3, 4); err != nil {
		t.Fatal(err)
	}
	if err := v.MarkPresent(160, 161); err != nil { // the partial last granule
		t.Fatal(err)
	}
	if got, want := v.PresentBytes(), int64(64<<10+512); got != want {
		t.Fatalf("present bytes %d, want %d", got, want)
	}
	if v.NextMissing(3) != 4 || v.NextPresent(4) != 160 || v.NextMissing(160) != 161 {
		t.Fatalf("NextMissing/NextPresent wrong: %d %d %d", v.NextMissing(3), v.NextPresent(4), v.NextMissing(160))
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := ReadVolumeState(StatePathFor(target))
	if err != nil {
		t.Fatal(err)
	}
	if st.URL != "s3://b/vm.qcow2" || st.ETag != "abc" || st.PresentBytes != 64<<10+512 || st.Complete {
		t.Fatalf("state %+v", st)
	}
	v, err = OpenVolume(target, testSource(), VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := OpenVolume(target, testSource(), VolumeOptions{}); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("a second open of a volume in use: %v", err)
	}
	if !v.Present(3) || !v.Present(160) || v.Present(0) || v.Present(4) {
		t.Fatal("bits not restored")
	}
	got := make([]byte, len(data))
	if _, err := v.ReadAt(got, 3*64<<10); err != nil || string(got) != string(data) {
		t.Fatalf("data not kept: %v", err)
	}
}

// Bits set but not flushed are not in the state file: a crash (here: the
// state read while the volume is still open, without Sync) loses them, so
// the granules are fetched again rather than trusted.
func TestVolumeUnflushedBitsNotTrusted(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "vol.raw")
	v, err := OpenVolume(target, testSource(), VolumeOptions{FlushInterval: time.Hour, FlushBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.MarkPresent(0, 2); err != nil {
		t.Fatal(err)
	}
	st, err := readState(StatePathFor(target))
	if err != nil {
		t.Fatal(err)
	}
	if st.PresentBytes != 0 || st.bitmap[0] != 0 {
		t.Fatalf("unflushed bits reached the state file: %+v %x", st.VolumeState, st.bitmap[0])
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	st, _ = readState(StatePathFor(target))
	if st.bitmap[0] != 3 {
		t.Fatalf("flushed bitmap %x, want 03", st.bitmap[0])
	}
	// A batch of FlushBytes makes MarkPresent have the flusher flush (at
	// once, not at the next tick); twice that, MarkPresent flushes itself.
	v2, err := OpenVolume(filepath.Join(dir, "b.raw"), testSource(), VolumeOptions{FlushInterval: time.Hour, FlushBytes: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	v2.MarkPresent(0, 1)
	v2.MarkPresent(1, 2)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st, _ = readState(StatePathFor(filepath.Join(dir, "b.raw")))
		if st.bitmap[0] == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("batch not flushed: %x", st.bitmap[0])
		}
	}
	v2.MarkPresent(2, 6) // 4 granules: twice the batch, flushed before it returns
	if st, _ = readState(StatePathFor(filepath.Join(dir, "b.raw"))); st.bitmap[0] != 0x3f {
		t.Fatalf("a double batch not flushed by MarkPresent: %x", st.bitmap[0])
	}
}

func TestVolumeRefusals(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "vol.raw")
	src := testSource()
	if _, err := OpenVolume(target, src, VolumeOptions{Size: src.VirtualSize - 1}); err == nil || !strings.Contains(err.Error(), "smaller than the image's virtual size") {
		t.Fatalf("smaller size: %v", err)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a refused volume created the target")
	}
	v, err := OpenVolume(target, src, VolumeOptions{Size: 20 << 20})
	if err != nil {
		t.Fatal(err)
	}
	v.Close()
	for _, c := range []struct {
		mod  func(*VolumeSource)
		want string
	}{
		{func(s *VolumeSource) { s.ETag = "def" }, `ETag "abc", now "def" (the object changed)`},
		{func(s *VolumeSource) { s.URL = "s3://b/other.qcow2" }, "URL s3://b/vm.qcow2, now s3://b/other.qcow2"},
		{func(s *VolumeSource) { s.VirtualSize = 1 << 20 }, "virtual size"},
		{func(s *VolumeSource) { s.Granularity = 128 << 10 }, "granularity 65536, now 131072"},
	} {
		s := src
		c.mod(&s)
		_, err := OpenVolume(target, s, VolumeOptions{})
		if !errors.Is(err, ErrVolumeMismatch) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "refusing to mix versions") {
			t.Errorf("reopen with %+v: %v", s, err)
		}
	}
	if _, err := OpenVolume(target, src, VolumeOptions{Size: 30 << 20}); err == nil || !strings.Contains(err.Error(), "differs from the size") {
		t.Fatalf("other size: %v", err)
	}
	v, err = OpenVolume(target, src, VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v.Size() != 20<<20 {
		t.Fatalf("size %d", v.Size())
	}
	v.Close()
	// A damaged state file is refused, not trusted.
	sp := StatePathFor(target)
	b, _ := os.ReadFile(sp)
	b[len(b)-6] ^= 0xff
	os.WriteFile(sp, b, 0o644)
	if _, err := OpenVolume(target, src, VolumeOptions{}); err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Fatalf("damaged state: %v", err)
	}
}

func TestVolumeWriteDataSparse(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "vol.raw")
	v, err := OpenVolume(target, testSource(), VolumeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	// Bytes of an unfinished earlier fill are replaced, zeros by a hole.
	junk := make([]byte, 1<<20)
	for i := range junk {
		junk[i] = 0xee
	}
	v.WriteAt(junk, 0)
	p := make([]byte, 1<<20)
	p[5000] = 1
	if err := v.WriteData(p, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	v.ReadAt(got, 0)
	if string(got) != string(p) {
		t.Fatal("WriteData content differs")
	}
	fi, _ := os.Stat(target)
	if blocks := allocatedBytes(fi); blocks > 64<<10 {
		t.Fatalf("%d bytes allocated for one non-zero 4 KiB block", blocks)
	}
	if d, err := v.SeekData(0); err != nil || d != 4096 {
		t.Fatalf("SeekData %d %v", d, err)
	}
}

// A full batch is flushed by the flusher at once, not at the next tick;
// hole bits wait for the tick (losing them costs no fetch).
func TestVolumeBatchFlushAndHoles(t *testing.T) {
	target := filepath.Join(t.TempDir(), "vol.raw")
	v, err := OpenVolume(target, testSource(), VolumeOptions{FlushBytes: 128 << 10, FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	present := func() int64 {
		st, err := ReadVolumeState(StatePathFor(target))
		if err != nil {
			t.Fatal(err)
		}
		return st.PresentBytes
	}
	if err := v.Zero(0, 10<<20); err != nil {
		t.Fatal(err)
	}
	if err := v.MarkHoles(0, 100); err != nil {
		t.Fatal(err)
	}
	if got := present(); got != 0 {
		t.Fatalf("hole bits flushed at once: %d bytes present in the state file", got)
	}
	data := make([]byte, 128<<10)
	for i := range data {
		data[i] = byte(i) | 1
	}
	if err := v.WriteData(data, 100*64<<10); err != nil {
		t.Fatal(err)
	}
	if err := v.MarkPresent(100, 102); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for present() != 102*64<<10 {
		if time.Now().After(deadline) {
			t.Fatalf("a full batch was not flushed within 10 s (flush interval 1 h): %d bytes present in the state file", present())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A fill written around the page cache (aligned: O_DIRECT) is what a
// buffered read sees, even when that read cached the range before.
func TestVolumeDirectFillCoherent(t *testing.T) {
	target := filepath.Join(t.TempDir(), "vol.raw")
	v, err := OpenVolume(target, testSource(), VolumeOptions{FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	got := make([]byte, 1<<20)
	if _, err := v.ReadAt(got, 1<<20); err != nil { // caches zero pages
		t.Fatal(err)
	}
	// An aligned buffer, as hydration's are.
	raw := make([]byte, 1<<20+directAlign)
	skip := (directAlign - int(uintptr(unsafe.Pointer(&raw[0]))%directAlign)) % directAlign
	data := raw[skip : skip+1<<20]
	for i := range data {
		data[i] = byte(i*7) | 1
	}
	if err := v.WriteData(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := v.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("a buffered read after an aligned fill returns stale bytes")
	}
	if v.df == nil {
		t.Log("the filesystem of the test directory refuses O_DIRECT: the fill was buffered")
	} else if v.noDirect.Load() {
		t.Fatal("the aligned fill fell back to a buffered write")
	}
}
