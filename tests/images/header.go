package images

import (
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// Offsets of QCOW2 header fields (docs/interop/qcow2.rst), big-endian.
const (
	offMagic          = 0  // u32 "QFI\xfb"
	offVersion        = 4  // u32
	offBackingOffset  = 8  // u64
	offBackingSize    = 16 // u32
	offClusterBits    = 20 // u32
	offSize           = 24 // u64
	offCryptMethod    = 32 // u32
	offL1Size         = 36 // u32
	offL1Offset       = 40 // u64
	offRefcountOffset = 48 // u64
	offRefcountClust  = 56 // u32
	offNbSnapshots    = 60 // u32
	offSnapshotsOff   = 64 // u64
	offIncompat       = 72 // u64 (v3)
	offCompat         = 80 // u64
	offAutoclear      = 88 // u64
	offRefcountOrder  = 96 // u32
	offHeaderLength   = 100
)

// Header extension types.
const (
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureTable = 0x6803f857
	extDataFile     = 0x44415441
)

func putU16(h []byte, off int, v uint16) { binary.BigEndian.PutUint16(h[off:], v) }
func getU32(h []byte, off int) uint32    { return binary.BigEndian.Uint32(h[off:]) }
func getU64(h []byte, off int) uint64    { return binary.BigEndian.Uint64(h[off:]) }
func putU32(h []byte, off int, v uint32) { binary.BigEndian.PutUint32(h[off:], v) }
func putU64(h []byte, off int, v uint64) { binary.BigEndian.PutUint64(h[off:], v) }

// patch applies fn to the first 1 MiB of file (the header cluster and the
// first tables of a small default image; less if the file is shorter) and
// writes them back.
func (b *builder) patch(file string, fn func(h []byte)) {
	b.t.Helper()
	f, err := os.OpenFile(b.path(file), os.O_RDWR, 0)
	if err != nil {
		b.t.Fatal(err)
	}
	defer f.Close()
	h := make([]byte, 1<<20)
	n, err := f.ReadAt(h, 0)
	if err != nil && err != io.EOF {
		b.t.Fatal(err)
	}
	h = h[:n]
	fn(h)
	if _, err := f.WriteAt(h, 0); err != nil {
		b.t.Fatal(err)
	}
}

// edit replaces the whole of file (a small one) by fn's result.
func (b *builder) edit(file string, fn func(f []byte) []byte) {
	b.t.Helper()
	f, err := os.ReadFile(b.path(file))
	if err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(b.path(file), fn(f), 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// refcountEntry returns the file offset of the 16-bit refcount of
// cluster n in a whole image file f with 64 KiB clusters, whose refcount
// block for n exists.
func refcountEntry(f []byte, n int) int {
	const perBlock = 65536 / 2
	rt := int(getU64(f, offRefcountOffset))
	block := int(getU64(f, rt+8*(n/perBlock)))
	if block == 0 {
		panic("images: no refcount block for the cluster")
	}
	return block + 2*(n%perBlock)
}

// copyFile copies src to dst in the directory, keeping holes.
func (b *builder) copyFile(src, dst string) {
	b.t.Helper()
	b.run("cp", "--sparse=always", "-f", src, dst)
}

// extensions returns the header extensions of a v3 header: type, offset of
// the data, length.
type ext struct {
	typ       uint32
	off, size int
}

func extensions(h []byte) []ext {
	var out []ext
	off := int(getU32(h, offHeaderLength))
	for off+8 <= len(h) {
		typ, size := getU32(h, off), int(getU32(h, off+4))
		if typ == extEnd {
			break
		}
		out = append(out, ext{typ, off + 8, size})
		off += 8 + (size+7)&^7
	}
	return out
}

// samplesDir finds QEMU's sample images: $SNAPFS_QEMU_SAMPLES, else
// shared/qemu-samples beside the repository (as in CI), else
// /work/shared/qemu-samples.
func samplesDir() string {
	if d := os.Getenv("SNAPFS_QEMU_SAMPLES"); d != "" {
		return d
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		root := filepath.Dir(filepath.Dir(filepath.Dir(file))) // tests/images/header.go
		d := filepath.Join(filepath.Dir(root), "shared", "qemu-samples")
		if _, err := os.Stat(d); err == nil {
			return d
		}
	}
	return "/work/shared/qemu-samples"
}

// unpackSample bunzip2s a sample image to dst, leaving holes where it is
// all zeros (some samples unpack to 260 MB of mostly zeros).
func (b *builder) unpackSample(sample, dst string) string {
	b.t.Helper()
	src := filepath.Join(samplesDir(), sample+".bz2")
	if _, err := os.Stat(src); err != nil {
		b.t.Fatalf("images: QEMU sample image missing (set SNAPFS_QEMU_SAMPLES): %v", err)
	}
	cmd := exec.Command("bunzip2", "-c", src)
	r, err := cmd.StdoutPipe()
	if err != nil {
		b.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.t.Fatal(err)
	}
	f, err := os.Create(dst)
	if err != nil {
		b.t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	var off int64
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if !allZero(buf[:n]) {
				if _, werr := f.WriteAt(buf[:n], off); werr != nil {
					b.t.Fatal(werr)
				}
			}
			off += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			b.t.Fatal(err)
		}
	}
	if err := cmd.Wait(); err != nil {
		b.t.Fatalf("images: bunzip2 %s: %v", src, err)
	}
	if err := f.Truncate(off); err != nil {
		b.t.Fatal(err)
	}
	return dst
}

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
