package qcow2

// Parsing and validation of the QCOW2 header, its extensions and the
// backing file name (QEMU docs/interop/qcow2.rst, "Header" and "Header
// extensions"). Everything here works on bytes only, so it can be fuzzed.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

const (
	qcowMagic = 0x514649fb // "QFI\xfb"

	minClusterBits = 9
	maxClusterBits = 21 // QEMU's limit: 2 MiB clusters

	v2HeaderLength   = 72
	v3MinHeaderLen   = 104
	maxL1Bytes       = 32 << 20 // QEMU's QCOW_MAX_L1_SIZE
	maxSnapshots     = 65536
	maxBackingName   = 1023
	maxBitmaps       = 65535
	maxBitmapDirSize = 64 << 20
	maxRefcountOrder = 6

	// Header extension types.
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureTable = 0x6803f857
	extBitmaps      = 0x23852875
	extCrypto       = 0x0537be77
	extDataFile     = 0x44415441

	// Incompatible feature bits.
	incDirty       = 1 << 0
	incCorrupt     = 1 << 1
	incDataFile    = 1 << 2
	incCompression = 1 << 3
	incExtendedL2  = 1 << 4
	incKnown       = incDirty | incCorrupt | incDataFile | incCompression | incExtendedL2

	// Compatible feature bits.
	compatLazyRefcounts = 1 << 0

	// Autoclear feature bits.
	autoBitmaps     = 1 << 0
	autoDataFileRaw = 1 << 1

	compressionZlib = 0
	compressionZstd = 1
)

// knownFeatureNames are QEMU's names for the feature bits it defines; a
// feature name table in the image overrides them.
var knownFeatureNames = [3]map[int]string{
	0: {0: "dirty bit", 1: "corrupt bit", 2: "external data file", 3: "compression type", 4: "extended L2 entries"},
	1: {0: "lazy refcounts"},
	2: {0: "bitmaps", 1: "raw external data"},
}

// header is a parsed and validated QCOW2 header. All offsets and sizes in it
// have been checked against the object size (except the snapshot and bitmap
// directories' contents, which are parsed on demand).
type header struct {
	version           int
	backingFileOffset int64
	backingFileSize   int
	clusterBits       int
	size              int64 // virtual size
	cryptMethod       uint32
	l1Size            int64 // entries
	l1TableOffset     int64
	refcountOffset    int64
	refcountClusters  int64
	nbSnapshots       int
	snapshotsOffset   int64
	incompatible      uint64
	compatible        uint64
	autoclear         uint64
	refcountOrder     int
	headerLength      int
	compressionType   int

	backingFile   string // as written, "" when none
	backingFormat string // from the backing format extension
	dataFile      string // external data file name extension
	featureNames  map[featureKey]string

	// Bitmaps extension (only kept when the autoclear bit says the bitmaps
	// are consistent).
	hasBitmaps      bool
	nbBitmaps       int
	bitmapDirSize   int64
	bitmapDirOffset int64
}

type featureKey struct {
	typ int // 0 incompatible, 1 compatible, 2 autoclear
	bit int
}

func (h *header) clusterSize() int64 { return 1 << h.clusterBits }
func (h *header) extendedL2() bool   { return h.incompatible&incExtendedL2 != 0 }
func (h *header) hasDataFile() bool  { return h.incompatible&incDataFile != 0 }
func (h *header) dataFileRaw() bool  { return h.autoclear&autoDataFileRaw != 0 }

// l2EntrySize is 8, or 16 with extended L2 entries.
func (h *header) l2EntrySize() int64 {
	if h.extendedL2() {
		return 16
	}
	return 8
}

// l2Bits is log2 of the number of entries in one L2 table.
func (h *header) l2Bits() int {
	if h.extendedL2() {
		return h.clusterBits - 4
	}
	return h.clusterBits - 3
}

// featureName names bit of the given feature type (0 incompatible,
// 1 compatible, 2 autoclear), from the image's table or QEMU's names.
func (h *header) featureName(typ, bit int) string {
	if n, ok := h.featureNames[featureKey{typ, bit}]; ok {
		return n
	}
	return knownFeatureNames[typ][bit]
}

// errNeedMore asks the caller to read more of the first cluster and parse
// again; n is how many bytes from the start of the object are needed.
type errNeedMore struct{ n int64 }

func (e *errNeedMore) Error() string { return fmt.Sprintf("need %d header bytes", e.n) }

// refusal is the cause of ErrUnsupported: a readable image that snapfs
// will not serve. reason is the human part ("encrypted with LUKS").
type refusal struct {
	reason string
	cause  error // optional underlying error (e.g. objstore.ErrNotFound)
}

func (r *refusal) Error() string {
	return ErrUnsupported.Error() + ": " + r.reason
}

func (r *refusal) Is(target error) bool { return target == ErrUnsupported }
func (r *refusal) Unwrap() error        { return r.cause }

func refuse(format string, args ...any) error {
	return &refusal{reason: fmt.Sprintf(format, args...)}
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// reasonOf returns the human reason of a refusal, or the error text.
func reasonOf(err error) string {
	var r *refusal
	if errors.As(err, &r) {
		return r.reason
	}
	return err.Error()
}

// peekClusterBits returns cluster_bits when buf holds at least the fixed
// part of a header, so the caller knows how much of the first cluster
// exists.
func peekClusterBits(buf []byte) (int, bool) {
	if len(buf) < 24 || binary.BigEndian.Uint32(buf) != qcowMagic {
		return 0, false
	}
	return int(binary.BigEndian.Uint32(buf[20:])), true
}

// parseHeader parses and validates the header at the start of buf, a prefix
// of an object of objSize bytes. It reads nothing outside the first cluster.
// When buf is shorter than the first cluster (and the object) and more bytes
// are needed, it returns *errNeedMore. A refusal (ErrUnsupported) comes
// with the header parsed so far, so that Inspect can describe it.
// Structural problems wrap ErrNotQCOW2 or ErrCorrupt.
func parseHeader(buf []byte, objSize int64) (*header, error) {
	if objSize < int64(len(buf)) {
		objSize = int64(len(buf))
	}
	be := binary.BigEndian
	if len(buf) < v2HeaderLength {
		if objSize > int64(len(buf)) && len(buf) < 4096 {
			return nil, &errNeedMore{n: min(objSize, 4096)}
		}
		if len(buf) >= 4 && be.Uint32(buf) == qcowMagic {
			return nil, corrupt("header truncated: object is %d bytes", objSize)
		}
		return nil, fmt.Errorf("%w: object too short (%d bytes)", ErrNotQCOW2, objSize)
	}
	if be.Uint32(buf) != qcowMagic {
		return nil, fmt.Errorf("%w: bad magic %#08x", ErrNotQCOW2, be.Uint32(buf))
	}
	h := &header{
		version:           int(be.Uint32(buf[4:])),
		backingFileOffset: 0,
		cryptMethod:       be.Uint32(buf[32:]),
		refcountOrder:     4,
		headerLength:      v2HeaderLength,
	}
	if sz := be.Uint64(buf[24:]); sz <= 1<<62 {
		h.size = int64(sz) // for Inspect of refused images; checked by checkGeometry
	}
	if h.version != 2 && h.version != 3 {
		return h, refuse("unsupported QCOW2 version %d", h.version)
	}
	cb := be.Uint32(buf[20:])
	if cb < minClusterBits {
		return nil, corrupt("cluster_bits %d is below %d", cb, minClusterBits)
	}
	if cb > maxClusterBits {
		if cb > 63 {
			return nil, corrupt("cluster_bits %d out of range", cb)
		}
		return h, refuse("cluster size 2^%d exceeds the 2 MiB limit", cb)
	}
	h.clusterBits = int(cb)
	cs := h.clusterSize()
	// firstCluster is what of the first cluster exists in the object.
	firstCluster := min(cs, objSize)
	need := func(end int64) error {
		if end <= int64(len(buf)) {
			return nil
		}
		if end > firstCluster {
			return corrupt("header data ends at byte %d, past the first cluster (%d bytes) or the object (%d bytes)", end, cs, objSize)
		}
		return &errNeedMore{n: firstCluster}
	}

	if h.version == 3 {
		if err := need(v3MinHeaderLen); err != nil {
			return nil, err
		}
		h.incompatible = be.Uint64(buf[72:])
		h.compatible = be.Uint64(buf[80:])
		h.autoclear = be.Uint64(buf[88:])
		ro := be.Uint32(buf[96:])
		hl := be.Uint32(buf[100:])
		if ro > maxRefcountOrder {
			return nil, corrupt("refcount_order %d is above %d", ro, maxRefcountOrder)
		}
		h.refcountOrder = int(ro)
		if hl < v3MinHeaderLen || hl%8 != 0 {
			return nil, corrupt("header_length %d is invalid (must be >= 104 and a multiple of 8)", hl)
		}
		if int64(hl) > cs {
			return nil, corrupt("header_length %d exceeds the cluster size %d", hl, cs)
		}
		if err := need(int64(hl)); err != nil {
			return nil, err
		}
		h.headerLength = int(hl)
		if hl > 104 {
			h.compressionType = int(buf[104])
		}
	}

	bfo := be.Uint64(buf[8:])
	bfs := be.Uint32(buf[16:])
	if bfo > uint64(cs) {
		return nil, corrupt("backing_file_offset %d is past the first cluster", bfo)
	}
	h.backingFileOffset = int64(bfo)

	// Header extensions: from the end of the header to the backing file name
	// (or the end of the first cluster).
	extEndOff := cs
	if bfo != 0 {
		extEndOff = int64(bfo)
	}
	if err := h.parseExtensions(buf, extEndOff, need); err != nil {
		return nil, err
	}

	if bfo != 0 {
		if bfs > maxBackingName || int64(bfs) > cs-int64(bfo) {
			return nil, corrupt("backing file name too long (%d bytes)", bfs)
		}
		if err := need(int64(bfo) + int64(bfs)); err != nil {
			return nil, err
		}
		h.backingFileSize = int(bfs)
		h.backingFile = string(buf[bfo : bfo+uint64(bfs)])
	}

	// What snapfs refuses to serve. Checked before the geometry, whose
	// meaning an unknown feature may change.
	switch h.cryptMethod {
	case 0:
	case 1:
		return h, refuse("encrypted with AES")
	case 2:
		return h, refuse("encrypted with LUKS")
	default:
		return h, refuse("unknown encryption method %d", h.cryptMethod)
	}
	if unk := h.incompatible &^ incKnown; unk != 0 {
		var parts []string
		for bit := 0; bit < 64; bit++ {
			if unk&(1<<bit) == 0 {
				continue
			}
			if n, ok := h.featureNames[featureKey{0, bit}]; ok && n != "" {
				parts = append(parts, fmt.Sprintf("unknown incompatible feature bit %d (%q)", bit, n))
			} else {
				parts = append(parts, fmt.Sprintf("unknown incompatible feature bit %d", bit))
			}
		}
		return h, refuse("%s", strings.Join(parts, ", "))
	}
	switch h.compressionType {
	case compressionZlib:
		if h.incompatible&incCompression != 0 {
			return nil, corrupt("compression type feature bit set with zlib compression")
		}
	case compressionZstd:
		if h.incompatible&incCompression == 0 {
			return nil, corrupt("compression type %d without the compression type feature bit", h.compressionType)
		}
	default:
		return h, refuse("unknown compression type %d", h.compressionType)
	}
	if h.extendedL2() && h.clusterBits < 14 {
		return nil, corrupt("extended L2 entries with a cluster size below 16 KiB")
	}
	if h.hasDataFile() && h.dataFile == "" {
		return h, refuse("external data file without a name in the header")
	}
	if h.dataFileRaw() && !h.hasDataFile() {
		return nil, corrupt("raw external data bit set without an external data file")
	}

	if err := h.checkGeometry(buf, objSize); err != nil {
		return nil, err
	}
	return h, nil
}

func (h *header) parseExtensions(buf []byte, end int64, need func(int64) error) error {
	be := binary.BigEndian
	off := int64(h.headerLength)
	for off < end {
		if off+8 > end {
			return corrupt("header extension at byte %d too large", off)
		}
		if err := need(off + 8); err != nil {
			return err
		}
		typ := be.Uint32(buf[off:])
		n := int64(be.Uint32(buf[off+4:]))
		off += 8
		if n > end-off {
			return corrupt("header extension %#x at byte %d: length %d overflows the header area", typ, off-8, n)
		}
		if typ == extEnd {
			return nil
		}
		if err := need(off + n); err != nil {
			return err
		}
		data := buf[off : off+n]
		switch typ {
		case extBackingFmt:
			if n >= 16 {
				return corrupt("backing format extension too long (%d bytes)", n)
			}
			h.backingFormat = string(data)
		case extFeatureTable:
			if h.featureNames == nil {
				h.featureNames = make(map[featureKey]string)
			}
			for i := int64(0); i+48 <= n; i += 48 {
				e := data[i : i+48]
				name := e[2:]
				if j := indexByte(name, 0); j >= 0 {
					name = name[:j]
				}
				if e[0] > 2 || e[1] > 63 {
					continue // unknown feature type or impossible bit: ignore
				}
				h.featureNames[featureKey{int(e[0]), int(e[1])}] = string(name)
			}
		case extBitmaps:
			if h.autoclear&autoBitmaps == 0 {
				break // bitmaps are inconsistent: QEMU ignores them
			}
			if n != 24 {
				return corrupt("bitmaps extension has length %d, want 24", n)
			}
			nb := be.Uint32(data)
			size := be.Uint64(data[8:])
			dirOff := be.Uint64(data[16:])
			if nb == 0 || nb > maxBitmaps {
				return corrupt("bitmaps extension: %d bitmaps", nb)
			}
			if size > maxBitmapDirSize {
				return corrupt("bitmap directory too large (%d bytes)", size)
			}
			if dirOff&uint64(h.clusterSize()-1) != 0 || dirOff > 1<<62 {
				return corrupt("bitmap directory offset %#x invalid", dirOff)
			}
			h.hasBitmaps = true
			h.nbBitmaps = int(nb)
			h.bitmapDirSize = int64(size)
			h.bitmapDirOffset = int64(dirOff)
		case extDataFile:
			h.dataFile = string(data)
		case extCrypto:
			// Only meaningful for LUKS, which is refused.
		}
		off += (n + 7) &^ 7
	}
	return nil
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// checkGeometry validates the virtual size and the tables the header
// points to against the object size.
func (h *header) checkGeometry(buf []byte, objSize int64) error {
	be := binary.BigEndian
	cs := h.clusterSize()
	size := be.Uint64(buf[24:])
	l1Size := int64(be.Uint32(buf[36:]))
	l1Off := be.Uint64(buf[40:])
	rtOff := be.Uint64(buf[48:])
	rtClusters := int64(be.Uint32(buf[56:]))
	nbSnap := be.Uint32(buf[60:])
	snapOff := be.Uint64(buf[64:])

	if l1Size*8 > maxL1Bytes {
		return corrupt("l1_size %d exceeds the 32 MiB limit", l1Size)
	}
	// Guest bytes covered by one L1 entry: one L2 table's worth.
	perL1 := int64(1) << (h.clusterBits + h.l2Bits())
	if size > uint64(l1Size)*uint64(perL1) { // both factors are < 2^23 and 2^38
		return corrupt("l1_size %d does not cover the virtual size %d", l1Size, size)
	}
	h.size = int64(size)
	h.l1Size = l1Size
	if l1Size > 0 {
		if l1Off&uint64(cs-1) != 0 {
			return corrupt("L1 table offset %#x is not cluster aligned", l1Off)
		}
		if l1Off > uint64(objSize) || uint64(l1Size*8) > uint64(objSize)-l1Off {
			return corrupt("L1 table (%d entries at %#x) extends past the end of the object (%d bytes)", l1Size, l1Off, objSize)
		}
	}
	h.l1TableOffset = int64(l1Off)

	if rtOff&uint64(cs-1) != 0 {
		return corrupt("refcount table offset %#x is not cluster aligned", rtOff)
	}
	if rtClusters == 0 {
		return corrupt("refcount table has no clusters")
	}
	if rtOff > uint64(objSize) || uint64(rtClusters)*uint64(cs) > uint64(objSize)-rtOff {
		return corrupt("refcount table (%d clusters at %#x) extends past the end of the object (%d bytes)", rtClusters, rtOff, objSize)
	}
	h.refcountOffset = int64(rtOff)
	h.refcountClusters = rtClusters

	if nbSnap > maxSnapshots {
		return corrupt("nb_snapshots %d exceeds %d", nbSnap, maxSnapshots)
	}
	if nbSnap > 0 {
		if snapOff&uint64(cs-1) != 0 {
			return corrupt("snapshot table offset %#x is not cluster aligned", snapOff)
		}
		// Each entry takes at least 40 bytes.
		if snapOff > uint64(objSize) || uint64(nbSnap)*40 > uint64(objSize)-snapOff {
			return corrupt("snapshot table (%d entries at %#x) extends past the end of the object (%d bytes)", nbSnap, snapOff, objSize)
		}
	}
	h.nbSnapshots = int(nbSnap)
	h.snapshotsOffset = int64(snapOff)

	if h.hasBitmaps {
		if uint64(h.bitmapDirOffset) > uint64(objSize) || uint64(h.bitmapDirSize) > uint64(objSize-h.bitmapDirOffset) {
			return corrupt("bitmap directory extends past the end of the object")
		}
	}
	return nil
}

// features lists the set bits of one feature type with their names.
func (h *header) features(typ int, bits uint64) []Feature {
	var out []Feature
	for bit := 0; bit < 64; bit++ {
		if bits&(1<<bit) != 0 {
			out = append(out, Feature{Bit: bit, Name: h.featureName(typ, bit)})
		}
	}
	return out
}
