package qcow2

// This file writes QCOW2 images from raw sources, sequentially, with no
// seeking: Write scans the source once to find the clusters that hold data,
// computes the whole layout from that list (imageLayout), then streams the
// header, refcount table, refcount blocks, L1 table, L2 tables and data
// clusters in file order.
//
// The layout and encoding helpers (imageLayout, refcountSizes,
// putRefcount, encodeWriterHeader) do not depend on where the bytes come
// from, so a streaming writer can reuse them.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sort"
)

// WriteOptions tune Write. The zero value writes a version 3 image with
// 64 KiB clusters and 16-bit refcounts.
type WriteOptions struct {
	// ClusterSize is the cluster size in bytes: a power of two from 512 to
	// 2 MiB. Zero means 65536.
	ClusterSize int
	// Compat is "1.1" (QCOW2 version 3, the default when empty) or "0.10"
	// (version 2).
	Compat string
	// RefcountBits is the width of a refcount entry: a power of two from 1
	// to 64 for version 3, and 16 for version 2. Zero means 16.
	RefcountBits int
}

// WriteStats describe an image written by Write.
type WriteStats struct {
	// VirtualSize is the guest size recorded in the header: the source size
	// rounded up to a multiple of 512 bytes.
	VirtualSize int64
	// AllocatedClusters counts the data clusters written; clusters that are
	// all zeros in the source are left unallocated.
	AllocatedClusters int64
	// BytesWritten is the size of the image written to w.
	BytesWritten int64
}

// Implementation limits of QEMU, which refuses images beyond them.
const (
	wrMaxL1Bytes       = 32 << 20        // QCOW_MAX_L1_SIZE
	wrMaxRefTableBytes = 8 << 20         // QCOW_MAX_REFTABLE_SIZE
	wrMaxHostOffset    = 1 << 56         // L1/L2 entries hold offset bits 9-55
	wrHeaderLenV3      = 112             // header through compression_type and padding
	wrOflagCopied      = uint64(1) << 63 // L1/L2 entry: refcount is exactly one
	wrSectorSize       = 512
	wrScanChunk        = 1 << 20 // source bytes read at a time (at least a cluster)
)

// writeParams are validated WriteOptions.
type writeParams struct {
	clusterBits   uint
	version       uint32
	refcountOrder uint
}

func (o WriteOptions) params() (writeParams, error) {
	var p writeParams
	cs := o.ClusterSize
	if cs == 0 {
		cs = 65536
	}
	if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
		return p, fmt.Errorf("qcow2: cluster size %d is not a power of two from 512 to 2 MiB", o.ClusterSize)
	}
	p.clusterBits = uint(bits.TrailingZeros(uint(cs)))
	switch o.Compat {
	case "", "1.1":
		p.version = 3
	case "0.10":
		p.version = 2
	default:
		return p, fmt.Errorf("qcow2: compat %q is neither \"0.10\" nor \"1.1\"", o.Compat)
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	if rb < 1 || rb > 64 || rb&(rb-1) != 0 {
		return p, fmt.Errorf("qcow2: refcount bits %d is not a power of two from 1 to 64", o.RefcountBits)
	}
	if p.version == 2 && rb != 16 {
		return p, fmt.Errorf("qcow2: compat 0.10 requires 16 refcount bits, not %d", rb)
	}
	p.refcountOrder = uint(bits.TrailingZeros(uint(rb)))
	return p, nil
}

// imageLayout places every structure of an image with no backing file,
// snapshots or compression, in this order: header cluster, refcount table,
// refcount blocks, L1 table, L2 tables, then the allocated data clusters in
// guest order. Every host cluster in the file has refcount 1.
type imageLayout struct {
	clusterBits   uint
	clusterSize   int64
	version       uint32
	refcountOrder uint
	virtualSize   int64

	l1Size    int64 // entries in the L1 table
	l2Entries int64 // entries per L2 table

	refTableOffset   int64
	refTableClusters int64
	refBlocksOffset  int64
	refBlocks        int64
	l1Offset         int64 // 0 when l1Size is 0
	l1Clusters       int64
	l2Offset         int64
	// l2Tables lists, ascending, the L1 indexes that have an L2 table; the
	// k-th table is at l2Offset + k*clusterSize.
	l2Tables []int64
	// allocated lists, ascending, the guest clusters that hold data; the k-th
	// is stored at dataOffset + k*clusterSize.
	allocated     []int64
	dataOffset    int64
	totalClusters int64 // host clusters in the file
}

// ceilDiv returns a/b rounded up, for a >= 0 and b > 0.
func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }

// refcountSizes returns how many refcount blocks and refcount table clusters
// cover an image of otherClusters host clusters plus those refcount
// structures themselves. tableClusters is at least 1.
func refcountSizes(clusterBits, refcountOrder uint, otherClusters int64) (blocks, tableClusters int64) {
	cs := int64(1) << clusterBits
	perBlock := cs * 8 >> refcountOrder
	tableClusters = 1
	for {
		total := otherClusters + blocks + tableClusters
		nb := ceilDiv(total, perBlock)
		nt := max(ceilDiv(nb*8, cs), 1)
		if nb == blocks && nt == tableClusters {
			return blocks, tableClusters
		}
		blocks, tableClusters = nb, nt
	}
}

// newImageLayout lays out an image of virtualSize bytes whose allocated guest
// clusters are the ascending, distinct indexes in allocated. The layout keeps
// allocated.
func newImageLayout(p writeParams, virtualSize int64, allocated []int64) (*imageLayout, error) {
	l := &imageLayout{
		clusterBits:   p.clusterBits,
		clusterSize:   int64(1) << p.clusterBits,
		version:       p.version,
		refcountOrder: p.refcountOrder,
		virtualSize:   virtualSize,
		allocated:     allocated,
	}
	cs := l.clusterSize
	l.l2Entries = cs / 8
	guestClusters := ceilDiv(virtualSize, cs)
	l.l1Size = ceilDiv(guestClusters, l.l2Entries)
	if l.l1Size*8 > wrMaxL1Bytes {
		return nil, fmt.Errorf("qcow2: virtual size %d needs a %d-byte L1 table with %d-byte clusters; QEMU allows at most %d: use larger clusters",
			virtualSize, l.l1Size*8, cs, wrMaxL1Bytes)
	}
	l.l1Clusters = ceilDiv(l.l1Size*8, cs)
	for i, g := range allocated {
		if g < 0 || g >= guestClusters || (i > 0 && g <= allocated[i-1]) {
			return nil, fmt.Errorf("qcow2: internal error: allocated cluster list not ascending within the disk at %d", i)
		}
		t := g / l.l2Entries
		if n := len(l.l2Tables); n == 0 || l.l2Tables[n-1] != t {
			l.l2Tables = append(l.l2Tables, t)
		}
	}
	n := int64(len(allocated))
	other := 1 + l.l1Clusters + int64(len(l.l2Tables)) + n
	l.refBlocks, l.refTableClusters = refcountSizes(l.clusterBits, l.refcountOrder, other)
	if l.refTableClusters*cs > wrMaxRefTableBytes {
		return nil, fmt.Errorf("qcow2: image needs a %d-byte refcount table; QEMU allows at most %d: use larger clusters",
			l.refTableClusters*cs, wrMaxRefTableBytes)
	}
	l.totalClusters = other + l.refBlocks + l.refTableClusters
	if l.totalClusters > wrMaxHostOffset/cs {
		return nil, fmt.Errorf("qcow2: image of %d clusters is beyond the 64 PiB host offset limit", l.totalClusters)
	}
	next := cs // the header takes cluster 0
	take := func(clusters int64) int64 {
		off := next
		next += clusters * cs
		return off
	}
	l.refTableOffset = take(l.refTableClusters)
	l.refBlocksOffset = take(l.refBlocks)
	l.l1Offset = take(l.l1Clusters)
	if l.l1Size == 0 {
		l.l1Offset = 0
	}
	l.l2Offset = take(int64(len(l.l2Tables)))
	l.dataOffset = take(n)
	if next != l.totalClusters*cs {
		return nil, fmt.Errorf("qcow2: internal error: layout ends at %d, expected %d", next, l.totalClusters*cs)
	}
	return l, nil
}

// fileSize is the size in bytes of the laid-out image.
func (l *imageLayout) fileSize() int64 { return l.totalClusters * l.clusterSize }

// wrHeaderFields are the header fields encodeWriterHeader writes.
type wrHeaderFields struct {
	version          uint32
	clusterBits      uint
	size             int64
	l1Size           int64
	l1Offset         int64
	refTableOffset   int64
	refTableClusters int64
	refcountOrder    uint
	incompatible     uint64
	compressionType  byte
}

// encodeWriterHeader writes the header and an empty header extension area
// into buf, which must be zeroed and at least 120 bytes long. Version 2
// headers are 72 bytes, version 3 headers 112 (through compression_type).
func encodeWriterHeader(buf []byte, h wrHeaderFields) {
	be := binary.BigEndian
	copy(buf[0:4], "QFI\xfb")
	be.PutUint32(buf[4:], h.version)
	// backing_file_offset and backing_file_size stay 0.
	be.PutUint32(buf[20:], uint32(h.clusterBits))
	be.PutUint64(buf[24:], uint64(h.size))
	// crypt_method stays 0.
	be.PutUint32(buf[36:], uint32(h.l1Size))
	be.PutUint64(buf[40:], uint64(h.l1Offset))
	be.PutUint64(buf[48:], uint64(h.refTableOffset))
	be.PutUint32(buf[56:], uint32(h.refTableClusters))
	// nb_snapshots and snapshots_offset stay 0.
	if h.version >= 3 {
		be.PutUint64(buf[72:], h.incompatible)
		// compatible_features and autoclear_features stay 0.
		be.PutUint32(buf[96:], uint32(h.refcountOrder))
		be.PutUint32(buf[100:], wrHeaderLenV3)
		buf[104] = h.compressionType
	}
	// The header extension area that follows ends with a type 0, length 0
	// extension: those 8 bytes are already zero.
}

// header returns the first cluster of the image.
func (l *imageLayout) header() []byte {
	buf := make([]byte, l.clusterSize)
	encodeWriterHeader(buf, wrHeaderFields{
		version:          l.version,
		clusterBits:      l.clusterBits,
		size:             l.virtualSize,
		l1Size:           l.l1Size,
		l1Offset:         l.l1Offset,
		refTableOffset:   l.refTableOffset,
		refTableClusters: l.refTableClusters,
		refcountOrder:    l.refcountOrder,
	})
	return buf
}

// putRefcount stores refcount v for entry i of a refcount block of
// 1<<order-bit entries. Sub-byte entries fill each byte from its least
// significant bit; wider entries are big-endian.
func putRefcount(block []byte, order uint, i int64, v uint64) {
	switch order {
	case 0, 1, 2:
		w := uint(1) << order
		perByte := int64(8 >> order)
		shift := uint(i%perByte) * w
		mask := byte((1<<w)-1) << shift
		b := &block[i/perByte]
		*b = *b&^mask | byte(v<<shift)&mask
	case 3:
		block[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(block[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(block[i*4:], uint32(v))
	case 6:
		binary.BigEndian.PutUint64(block[i*8:], v)
	}
}

// getRefcount returns entry i of a refcount block of 1<<order-bit entries.
func getRefcount(block []byte, order uint, i int64) uint64 {
	switch order {
	case 0, 1, 2:
		w := uint(1) << order
		perByte := int64(8 >> order)
		shift := uint(i%perByte) * w
		return uint64(block[i/perByte]>>shift) & (1<<w - 1)
	case 3:
		return uint64(block[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(block[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(block[i*4:]))
	default:
		return binary.BigEndian.Uint64(block[i*8:])
	}
}

// refcountTableCluster fills buf (one zeroed cluster) with cluster i of the
// refcount table.
func (l *imageLayout) refcountTableCluster(buf []byte, i int64) {
	fillRefTableCluster(buf, i, l.refBlocks, l.refBlocksOffset)
}

// refcountBlock fills buf (one zeroed cluster) with refcount block i: 1 for
// every host cluster of the file, 0 past its end.
func (l *imageLayout) refcountBlock(buf []byte, i int64) {
	per := l.clusterSize * 8 >> l.refcountOrder
	first := i * per
	for j := int64(0); j < per && first+j < l.totalClusters; j++ {
		putRefcount(buf, l.refcountOrder, j, 1)
	}
}

// l1Cluster fills buf (one zeroed cluster) with cluster i of the L1 table.
func (l *imageLayout) l1Cluster(buf []byte, i int64) {
	per := l.clusterSize / 8
	first, last := i*per, min((i+1)*per, l.l1Size)
	k := sort.Search(len(l.l2Tables), func(k int) bool { return l.l2Tables[k] >= first })
	for ; k < len(l.l2Tables) && l.l2Tables[k] < last; k++ {
		e := uint64(l.l2Offset+int64(k)*l.clusterSize) | wrOflagCopied
		binary.BigEndian.PutUint64(buf[(l.l2Tables[k]-first)*8:], e)
	}
}

// l2Table fills buf (one zeroed cluster) with the k-th L2 table.
func (l *imageLayout) l2Table(buf []byte, k int) {
	first := l.l2Tables[k] * l.l2Entries
	last := first + l.l2Entries
	d := sort.Search(len(l.allocated), func(d int) bool { return l.allocated[d] >= first })
	for ; d < len(l.allocated) && l.allocated[d] < last; d++ {
		e := uint64(l.dataOffset+int64(d)*l.clusterSize) | wrOflagCopied
		binary.BigEndian.PutUint64(buf[(l.allocated[d]-first)*8:], e)
	}
}

// readSource fills p from src at off; src must have len(p) bytes there.
func readSource(src io.ReaderAt, p []byte, off int64) error {
	n, err := src.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow2: reading source at %d: %w", off+int64(n), err)
}

// scanAllocated returns the ascending indexes of the clusters of the first
// size bytes of src that are not all zeros.
func scanAllocated(src io.ReaderAt, size int64, cs int64) ([]int64, error) {
	chunk := max(cs, wrScanChunk)
	buf := make([]byte, chunk)
	zeros := make([]byte, cs)
	var allocated []int64
	for off := int64(0); off < size; off += chunk {
		n := min(chunk, size-off)
		if err := readSource(src, buf[:n], off); err != nil {
			return nil, err
		}
		for c := int64(0); c < n; c += cs {
			part := buf[c:min(c+cs, n)]
			if !bytes.Equal(part, zeros[:len(part)]) {
				allocated = append(allocated, (off+c)/cs)
			}
		}
	}
	return allocated, nil
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Write writes a QCOW2 image of the first size bytes of src to w,
// sequentially. It reads src twice: once to find the clusters that are all
// zeros, which stay unallocated, and once to copy the others. The virtual
// size is size rounded up to a multiple of 512 bytes (as QEMU sees a raw
// file), the extra bytes reading as zeros. The image has no backing file,
// snapshots or compressed clusters, and its refcounts are exact. Memory use
// is about 8 bytes per allocated cluster plus the metadata of one cluster.
func Write(w io.Writer, src io.ReaderAt, size int64, opts WriteOptions) (WriteStats, error) {
	var st WriteStats
	p, err := opts.params()
	if err != nil {
		return st, err
	}
	if size < 0 {
		return st, fmt.Errorf("qcow2: negative size %d", size)
	}
	if size > (1<<63-1)-wrSectorSize {
		return st, fmt.Errorf("qcow2: size %d too large", size)
	}
	vsize := ceilDiv(size, wrSectorSize) * wrSectorSize
	cs := int64(1) << p.clusterBits

	// Check the metadata sizes before reading the source.
	if _, err := newImageLayout(p, vsize, nil); err != nil {
		return st, err
	}
	allocated, err := scanAllocated(src, size, cs)
	if err != nil {
		return st, err
	}
	l, err := newImageLayout(p, vsize, allocated)
	if err != nil {
		return st, err
	}
	st.VirtualSize = vsize
	st.AllocatedClusters = int64(len(allocated))

	cw := &countingWriter{w: w}
	bw := bufio.NewWriterSize(cw, 1<<20)
	err = l.writeTo(bw, src, size)
	if err == nil {
		err = bw.Flush()
	}
	st.BytesWritten = cw.n
	if err != nil {
		return st, err
	}
	if cw.n != l.fileSize() {
		return st, fmt.Errorf("qcow2: internal error: wrote %d bytes, layout has %d", cw.n, l.fileSize())
	}
	return st, nil
}

// writeTo writes the laid-out image to w, reading data clusters from the
// first size bytes of src; bytes past size are written as zeros.
func (l *imageLayout) writeTo(w io.Writer, src io.ReaderAt, size int64) error {
	cs := l.clusterSize
	if _, err := w.Write(l.header()); err != nil {
		return err
	}
	buf := make([]byte, cs)
	emit := func(fill func([]byte)) error {
		clear(buf)
		fill(buf)
		_, err := w.Write(buf)
		return err
	}
	for i := int64(0); i < l.refTableClusters; i++ {
		if err := emit(func(b []byte) { l.refcountTableCluster(b, i) }); err != nil {
			return err
		}
	}
	for i := int64(0); i < l.refBlocks; i++ {
		if err := emit(func(b []byte) { l.refcountBlock(b, i) }); err != nil {
			return err
		}
	}
	for i := int64(0); i < l.l1Clusters; i++ {
		if err := emit(func(b []byte) { l.l1Cluster(b, i) }); err != nil {
			return err
		}
	}
	for k := range l.l2Tables {
		if err := emit(func(b []byte) { l.l2Table(b, k) }); err != nil {
			return err
		}
	}

	// Data clusters, in runs of guest-contiguous clusters read at once.
	maxRun := max(int64(1), wrScanChunk/cs)
	data := make([]byte, maxRun*cs)
	for i := 0; i < len(l.allocated); {
		j := i + 1
		for j < len(l.allocated) && int64(j-i) < maxRun && l.allocated[j] == l.allocated[j-1]+1 {
			j++
		}
		start := l.allocated[i] * cs
		n := int64(j-i) * cs
		b := data[:n]
		avail := min(n, size-start)
		if err := readSource(src, b[:avail], start); err != nil {
			return err
		}
		clear(b[avail:])
		if _, err := w.Write(b); err != nil {
			return err
		}
		i = j
	}
	return nil
}
