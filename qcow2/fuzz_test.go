package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// FuzzParseHeader feeds arbitrary bytes to the header parser, as the whole
// object and as a prefix of it: it must never panic, never allocate more
// than a bound, and what it accepts must satisfy the header invariants.
func FuzzParseHeader(f *testing.F) {
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var ms0, ms1 runtime.MemStats
		runtime.ReadMemStats(&ms0)
		h, err := parseHeader(data, int64(len(data)))
		runtime.ReadMemStats(&ms1)
		if got := ms1.TotalAlloc - ms0.TotalAlloc; got > uint64(8*len(data))+256<<10 {
			t.Fatalf("parseHeader of %d bytes allocated %d bytes", len(data), got)
		}
		var more *errNeedMore
		if errors.As(err, &more) {
			t.Fatalf("parseHeader asked for %d bytes of a %d-byte object", more.n, len(data))
		}
		if err == nil {
			checkHeaderInvariants(t, h, int64(len(data)))
		} else if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotQCOW2) && !errors.Is(err, ErrUnsupported) {
			t.Fatalf("error %v wraps no sentinel", err)
		}

		// The same bytes as a prefix of a larger object.
		if len(data) > 512 {
			objSize := int64(len(data)) + 1<<20
			h2, err := parseHeader(data[:512], objSize)
			if errors.As(err, &more) {
				if more.n <= 512 || more.n > objSize {
					t.Fatalf("parseHeader asked for %d bytes with 512 read of %d", more.n, objSize)
				}
			} else if err == nil {
				checkHeaderInvariants(t, h2, objSize)
			}
		}
	})
}

func checkHeaderInvariants(t *testing.T, h *header, objSize int64) {
	t.Helper()
	cs := h.clusterSize()
	switch {
	case h.version != 2 && h.version != 3:
		t.Fatalf("accepted version %d", h.version)
	case h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits:
		t.Fatalf("accepted cluster_bits %d", h.clusterBits)
	case h.refcountOrder > maxRefcountOrder:
		t.Fatalf("accepted refcount_order %d", h.refcountOrder)
	case int64(h.headerLength) > cs:
		t.Fatalf("accepted header_length %d", h.headerLength)
	case h.l1Size*8 > maxL1Bytes:
		t.Fatalf("accepted l1_size %d", h.l1Size)
	case h.l1Size > 0 && h.l1TableOffset+h.l1Size*8 > objSize:
		t.Fatalf("accepted L1 table past the object")
	case h.size < 0 || h.size > h.l1Size<<(h.clusterBits+h.l2Bits()):
		t.Fatalf("accepted size %d with l1_size %d", h.size, h.l1Size)
	case h.refcountOffset+h.refcountClusters*cs > objSize:
		t.Fatalf("accepted refcount table past the object")
	case h.nbSnapshots > maxSnapshots:
		t.Fatalf("accepted %d snapshots", h.nbSnapshots)
	case len(h.backingFile) > maxBackingName:
		t.Fatalf("accepted backing name of %d bytes", len(h.backingFile))
	case h.cryptMethod != 0:
		t.Fatalf("accepted crypt_method %d", h.cryptMethod)
	case h.incompatible&^incKnown != 0:
		t.Fatalf("accepted unknown incompatible bits %#x", h.incompatible)
	case h.extendedL2() && h.clusterBits < 14:
		t.Fatalf("accepted extended L2 with cluster_bits %d", h.clusterBits)
	case h.hasBitmaps && h.bitmapDirOffset+h.bitmapDirSize > objSize:
		t.Fatalf("accepted bitmap directory past the object")
	}
}

// FuzzDecodeL2Entry decodes arbitrary L2 entries for arbitrary geometries:
// it must never panic, and what it accepts must satisfy the invariants the
// read path relies on.
func FuzzDecodeL2Entry(f *testing.F) {
	f.Add(uint64(0x8000000000050000), uint64(0), uint8(7), uint8(2), int64(1<<20), int64(1<<20))
	f.Fuzz(func(t *testing.T, raw, bitmap uint64, cb, flags uint8, imageSize, dataSize int64) {
		g := geometry{
			clusterBits: minClusterBits + int(cb)%(maxClusterBits-minClusterBits+1),
			v3:          flags&2 != 0,
			extendedL2:  flags&1 != 0,
			dataFile:    flags&4 != 0,
			imageSize:   max(imageSize, 0) & (1<<56 - 1),
			dataSize:    max(dataSize, 0) & (1<<56 - 1),
		}
		if g.extendedL2 && g.clusterBits < 14 {
			g.clusterBits = 14
		}
		if !g.dataFile {
			g.dataSize = g.imageSize
		}
		e, err := decodeL2Entry(raw, bitmap, &g)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		cs := g.clusterSize()
		if e.compressed {
			if e.alloc != 0 || e.zero != 0 || g.dataFile || (g.extendedL2 && bitmap != 0) {
				t.Fatalf("compressed entry %+v", e)
			}
			if e.host < 0 || e.host >= g.imageSize || e.clen < 1 || e.clen > 2*cs || e.host+e.clen > (g.imageSize+511)&^511 {
				t.Fatalf("compressed range %#x+%d outside an image of %d bytes", e.host, e.clen, g.imageSize)
			}
			return
		}
		if e.alloc&e.zero != 0 {
			t.Fatalf("subclusters both allocated and zero: %+v", e)
		}
		if n := g.nsub(); n < 32 && (e.alloc>>n != 0 || e.zero>>n != 0) {
			t.Fatalf("bits beyond %d subclusters: %+v", n, e)
		}
		if e.alloc != 0 {
			if !e.hasHost || e.host < 0 || e.host&(cs-1) != 0 || e.host >= g.dataSize {
				t.Fatalf("allocated entry with bad host offset: %+v (data size %d)", e, g.dataSize)
			}
		}
		if raw&l2Reserved != 0 {
			t.Fatalf("accepted reserved bits in %#x", raw)
		}
		for i := 0; i < g.nsub(); i++ {
			switch k := e.kind(i); k {
			case Data, Zero, Unallocated:
			default:
				t.Fatalf("subcluster %d kind %v", i, k)
			}
		}
	})
}

// TestGenerateFuzzSeeds rewrites the seed corpora under testdata/fuzz from
// images made by qemu-img. Run with QCOW2_GEN_SEEDS=1.
func TestGenerateFuzzSeeds(t *testing.T) {
	if os.Getenv("QCOW2_GEN_SEEDS") == "" {
		t.Skip("set QCOW2_GEN_SEEDS=1 to regenerate testdata/fuzz seeds")
	}
	needQemu(t)
	dir := t.TempDir()
	type img struct {
		name   string
		create []string
		io     []string
	}
	imgs := []img{
		{"v2-512", []string{"-o", "compat=0.10,cluster_size=512", "v2-512", "256k"}, []string{"write -P 1 0 4k"}},
		{"v3-512", []string{"-o", "cluster_size=512", "v3-512", "256k"}, []string{"write -P 1 0 4k", "write -z 8k 1k"}},
		{"v3-4k-lazy", []string{"-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=64", "v3-4k-lazy", "1M"}, []string{"write -P 2 0 8k"}},
		{"v3-4k-zstd", []string{"-o", "cluster_size=4k,compression_type=zstd", "v3-4k-zstd", "1M"}, nil},
		{"v3-16k-extl2", []string{"-o", "cluster_size=16k,extended_l2=on", "v3-16k-extl2", "1M"}, []string{"write -P 3 1k 1k"}},
		{"v3-4k-datafile", []string{"-o", "cluster_size=4k,data_file=v3-4k-datafile.raw,data_file_raw=on", "v3-4k-datafile", "64k"}, nil},
		{"v3-4k-backing", []string{"-o", "cluster_size=4k", "-b", "v3-512", "-F", "qcow2", "v3-4k-backing", "1M"}, nil},
		{"v3-64k", []string{"v3-64k", "1M"}, nil},
	}
	var l2seeds [][6]uint64
	for _, im := range imgs {
		run(t, dir, "qemu-img", append([]string{"create", "-q", "-f", "qcow2"}, im.create...)...)
		if len(im.io) > 0 {
			qio(t, dir, im.name, "qcow2", im.io...)
		}
	}
	run(t, dir, "qemu-img", "snapshot", "-c", "s1", "v3-512")
	run(t, dir, "qemu-img", "bitmap", "--add", "v3-4k-lazy", "bm")
	runFlaky(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=x", "-o",
		"cluster_size=4k,encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", "luks", "1M")
	writeRaw(t, filepath.Join(dir, "src.raw"), 256<<10, 1)
	run(t, dir, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw", "comp-zlib")
	run(t, dir, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k,compression_type=zstd", "src.raw", "comp-zstd")
	run(t, dir, "qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=16k,extended_l2=on", "src.raw", "extl2")

	hdrDir := filepath.Join("testdata", "fuzz", "FuzzParseHeader")
	l2Dir := filepath.Join("testdata", "fuzz", "FuzzDecodeL2Entry")
	os.RemoveAll(hdrDir)
	os.RemoveAll(l2Dir)
	os.MkdirAll(hdrDir, 0o755)
	os.MkdirAll(l2Dir, 0o755)
	names := []string{"luks", "comp-zlib", "comp-zstd", "extl2"}
	for _, im := range imgs {
		names = append(names, im.name)
	}
	for _, name := range names {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		seed := b
		if len(seed) > 64<<10 {
			seed = seed[:4096] // header cluster only: exercises the bounds checks
		}
		writeSeed(t, hdrDir, "qemu-"+name, fmt.Sprintf("[]byte(%q)", seed))
		// L2 entries of the first L2 table.
		h, err := parseHeader(b, int64(len(b)))
		if err != nil || h.l1Size == 0 {
			continue
		}
		l2 := binary.BigEndian.Uint64(b[h.l1TableOffset:]) & offsetMask
		if l2 == 0 {
			continue
		}
		es := h.l2EntrySize()
		flags := uint64(0)
		if h.extendedL2() {
			flags |= 1
		}
		if h.version == 3 {
			flags |= 2
		}
		if h.hasDataFile() {
			flags |= 4
		}
		seen := map[uint64]bool{}
		for i := int64(0); i < 64; i++ {
			raw := binary.BigEndian.Uint64(b[l2+uint64(i*es):])
			var bm uint64
			if es == 16 {
				bm = binary.BigEndian.Uint64(b[l2+uint64(i*es)+8:])
			}
			kind := raw >> 62
			if raw == 0 || seen[kind<<1|bm&1] {
				continue
			}
			seen[kind<<1|bm&1] = true
			l2seeds = append(l2seeds, [6]uint64{raw, bm, uint64(h.clusterBits - minClusterBits), flags, uint64(len(b)), uint64(len(b))})
		}
	}
	// Edge cases.
	l2seeds = append(l2seeds,
		[6]uint64{flagCopied, 0, 3, 4, 1 << 20, 1 << 20},         // offset 0 in a data file
		[6]uint64{flagZero | 0x10000, 0, 7, 2, 1 << 20, 1 << 20}, // zero with stale offset
		[6]uint64{0x10000, 0xffffffff, 7, 3, 1 << 20, 1 << 20},   // extended: all allocated
		[6]uint64{0, 1 << 32, 7, 3, 1 << 20, 1 << 20},            // extended: zero subcluster
		[6]uint64{flagCompressed | 1<<61, 0, 12, 2, 1 << 30, 1 << 30},
	)
	for i, s := range l2seeds {
		writeSeed(t, l2Dir, fmt.Sprintf("seed-%02d", i), fmt.Sprintf("uint64(%d)\nuint64(%d)\nuint8(%d)\nuint8(%d)\nint64(%d)\nint64(%d)",
			s[0], s[1], uint8(s[2]), uint8(s[3]), int64(s[4]), int64(s[5])))
	}
}

func writeSeed(t *testing.T, dir, name, body string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte("go test fuzz v1\n"+body+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}
