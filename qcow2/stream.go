package qcow2

// This file writes QCOW2 images in one pass over a raw source that is read
// once, in guest order (a pipe works), into a sink that receives the image
// in file order except for its first HeadSize bytes, which it receives
// last. That is the shape of an S3 multipart upload whose part 1 is held in
// memory and uploaded after the others.
//
// Layout, in file order:
//
//	cluster 0            header (written last, into the head)
//	data and L2 tables   data clusters in guest order; each L2 table is
//	                     placed at the next cluster boundary once the guest
//	                     scan has passed the range it maps
//	L1 table             ceil(l1Size*8 / clusterSize) clusters
//	refcount table       T clusters
//	refcount blocks      B clusters
//
// Why it is valid (every host cluster has the refcount the spec wants and
// every cluster with a non-zero refcount is used):
//
//   - Host clusters are numbered as the stream passes them. Cluster 0 (the
//     header) gets refcount 1 when the stream starts.
//   - An uncompressed data cluster or an L2 table starts at a cluster
//     boundary (padding the rest of a cluster partly filled by compressed
//     data, which already counts it) and gets refcount 1, its own host
//     cluster being fresh. Its L1/L2 entry carries OFLAG_COPIED, true
//     because the refcount is exactly 1.
//   - A compressed cluster of n bytes at byte offset o is described by o and
//     the count of 512-byte sectors from o&^511 through (o+n-1)|511;
//     qemu-img check counts that sector range, whose last byte lies in the
//     same host cluster as o+n-1 (clusters are whole sectors). So the host
//     clusters o/cs through (o+n-1)/cs each get exactly +1 for it, which is
//     what the writer adds. Every cluster after o/cs in that range is fresh
//     (the stream only moves forward), so only o/cs can be shared; when its
//     refcount is already at the width's maximum the writer pads to the next
//     boundary first. Compressed entries never carry OFLAG_COPIED.
//   - Once the source ends, the last L2 table is placed, the stream is
//     padded to a cluster boundary (so every byte of every counted sector
//     lies in a counted cluster), N clusters are used, and the remaining
//     structures take L1 clusters, then T+B refcount clusters, where
//     refcountSizes returns the smallest B, T that cover all N+L1+T+B
//     clusters (a fixed point), each of them with refcount 1. The refcount
//     blocks hold the counts gathered above, and zeros past the end.
//   - The header, written last, points at the L1 and refcount tables; it is
//     the only structure in the first HeadSize bytes that needs anything
//     learned later, so everything after the head is final when streamed.
//
// Memory: the head buffer, the batches in flight between the reader, the
// compression workers and the writer (about 2*(jobs+2) batches of
// max(clusterSize, 1 MiB) source bytes plus their compressed form), one L2
// table, the L1 table (8 bytes per 512 MiB of disk with 64 KiB clusters), and
// 2 bytes of refcount per host cluster written: never the data itself.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"github.com/snapfs/snapfs/internal/zeros"
)

// StreamSink receives the image WriteStream produces.
type StreamSink interface {
	// Write receives the bytes of the image after its head, in order.
	Write(p []byte) (int, error)
	// WriteHead receives the first StreamOptions.HeadSize bytes of the
	// image (rounded up to a cluster), or the whole image when it is
	// shorter (Write was then never called). It is called once, last, and
	// only when the image is complete.
	WriteHead(head []byte) error
}

// HoleSeeker is implemented by sources that know where their holes are
// (files, through lseek SEEK_DATA and SEEK_HOLE). WriteStream skips the
// holes without reading them.
type HoleSeeker interface {
	io.Seeker
	// NextData returns the first range [start, end) at or after off that
	// may hold data; start == end (at or past the source size) when none
	// is left.
	NextData(off int64) (start, end int64, err error)
}

// StreamOptions tune WriteStream. The zero value writes an uncompressed
// version 3 image with 64 KiB clusters and 16-bit refcounts.
type StreamOptions struct {
	WriteOptions
	// Compression is "", "none", "zlib" (raw deflate with a 4 KiB window,
	// as QEMU writes it) or "zstd" (version 3 only).
	Compression string
	// Jobs is the number of compression workers; zero means the number of
	// CPUs.
	Jobs int
	// HeadSize is how many leading bytes the sink receives last; it is
	// rounded up to a whole cluster, and is at least one cluster.
	HeadSize int64
	// Progress, when set, is called from the writing goroutine with the
	// source bytes consumed and the image bytes produced so far.
	Progress func(read, written int64)
	// ExpectSHA256, when set, is the SHA-256 the raw content must have
	// (the source hashed before): if it differs, WriteStream fails with
	// ErrSourceChanged before the sink receives the head, so the image is
	// never completed.
	ExpectSHA256 []byte
	// ExpectSums, when set, holds the checksums of the raw content from an
	// earlier read of the source (the one that hashed it): WriteStream
	// checks its own read against them instead of hashing the content a
	// second time, fails with ErrSourceChanged as for ExpectSHA256, and
	// leaves StreamStats.RawSHA256 zero (that earlier read has the
	// digest).
	ExpectSums *SourceSums
}

// ErrSourceChanged is returned by WriteStream when the raw content does not
// hash to StreamOptions.ExpectSHA256.
var ErrSourceChanged = errors.New("qcow2: the source changed while it was read")

// StreamStats describe an image written by WriteStream.
type StreamStats struct {
	// VirtualSize is the source size rounded up to a multiple of 512.
	VirtualSize int64
	// AllocatedClusters counts the guest clusters stored (not all zeros).
	AllocatedClusters int64
	// CompressedClusters counts those stored compressed.
	CompressedClusters int64
	// ClusterSize is the cluster size of the image.
	ClusterSize int64
	// ImageSize is the size of the image in bytes.
	ImageSize int64
	// RawSHA256 is the SHA-256 of the VirtualSize bytes of raw content
	// (zero when StreamOptions.ExpectSums was given).
	RawSHA256 [sha256.Size]byte
}

// Compression type codes of the header's compression_type field.
const (
	streamCompressNone      = -1
	incompatCompressionType = uint64(1) << 3 // incompatible bit: compression_type is set
	streamBatchBytes        = 1 << 20
	streamOflagCompressed   = uint64(1) << 62
)

// streamBatch is a guest-contiguous run of source clusters on its way from
// the reader through a worker to the writer.
type streamBatch struct {
	guestOff int64
	data     []byte // whole clusters; the source bytes, zero-padded
	// Per cluster: -1 zero, 0 store raw, > 0 length of the compressed form
	// at comp[i*cs:].
	kind []int
	comp []byte
	done chan struct{}
}

// compressor compresses one cluster into dst (of capacity at least
// len(src)); ok is false when the result is not smaller than len(src)-1.
type compressor func(dst, src []byte) (n int, ok bool)

// newCompressor returns a per-worker compressor for ctype.
func newCompressor(ctype int, zenc *zstd.Encoder) (compressor, error) {
	switch ctype {
	case compressionZlib:
		var lw limitedBuf
		fw, err := flate.NewWriterWindow(&lw, 4096) // QEMU inflates with 12 window bits
		if err != nil {
			return nil, err
		}
		return func(dst, src []byte) (int, bool) {
			lw.b, lw.full = dst[:0], false
			lw.max = len(src) - 1
			fw.Reset(&lw)
			if _, err := fw.Write(src); err != nil || lw.full {
				return 0, false
			}
			if err := fw.Close(); err != nil || lw.full {
				return 0, false
			}
			return len(lw.b), true
		}, nil
	case compressionZstd:
		return func(dst, src []byte) (int, bool) {
			out := zenc.EncodeAll(src, dst[:0])
			if len(out) == 0 || len(out) >= len(src) || &out[0] != &dst[0] {
				return 0, false
			}
			return len(out), true
		}, nil
	}
	return nil, fmt.Errorf("qcow2: unknown compression type %d", ctype)
}

// limitedBuf collects up to max bytes, and notes when more were offered.
type limitedBuf struct {
	b    []byte
	max  int
	full bool
}

func (l *limitedBuf) Write(p []byte) (int, error) {
	if len(l.b)+len(p) > l.max {
		l.full = true
		return 0, errors.New("qcow2: compressed cluster not smaller")
	}
	l.b = append(l.b, p...)
	return len(p), nil
}

// streamState is the writer side of WriteStream: it places data and
// metadata and feeds the sink.
type streamState struct {
	p        writeParams
	cs       int64
	sink     StreamSink
	head     []byte
	off      int64 // image bytes produced
	maxRef   uint64
	refs     []uint16 // per host cluster
	l1       []uint64
	l2       []byte // the L2 table being filled
	l2Index  int64  // its L1 index, or -1
	zeroPad  []byte
	csShift  uint // x of the compressed cluster descriptor
	progress func(read, written int64)
}

// put appends p to the image.
func (s *streamState) put(p []byte) error {
	if h := int64(len(s.head)); s.off < h {
		n := copy(s.head[s.off:], p)
		s.off += int64(n)
		p = p[n:]
	}
	if len(p) == 0 {
		return nil
	}
	if _, err := s.sink.Write(p); err != nil {
		return err
	}
	s.off += int64(len(p))
	return nil
}

// ref adds one to the refcount of host cluster c.
func (s *streamState) ref(c int64) {
	for int64(len(s.refs)) <= c {
		s.refs = append(s.refs, 0)
	}
	s.refs[c]++
}

// align pads the image with zeros to the next cluster boundary.
func (s *streamState) align() error {
	if r := s.off % s.cs; r != 0 {
		return s.put(s.zeroPad[:s.cs-r])
	}
	return nil
}

// cluster places one whole cluster (data or an L2 table) and returns its
// host offset.
func (s *streamState) cluster(b []byte) (int64, error) {
	if err := s.align(); err != nil {
		return 0, err
	}
	host := s.off
	if host >= wrMaxHostOffset {
		return 0, fmt.Errorf("qcow2: image beyond the 64 PiB host offset limit")
	}
	s.ref(host / s.cs)
	return host, s.put(b)
}

// compressed places a compressed cluster and returns its L2 entry.
func (s *streamState) compressed(b []byte) (uint64, error) {
	if s.off%s.cs != 0 && uint64(s.refs[s.off/s.cs]) >= s.maxRef {
		if err := s.align(); err != nil {
			return 0, err
		}
	}
	o := s.off
	if o >= int64(1)<<s.csShift {
		return 0, fmt.Errorf("qcow2: compressed cluster at %d beyond the descriptor's offset range", o)
	}
	end := o + int64(len(b)) - 1
	sectors := end>>9 - o>>9 + 1
	for c := o / s.cs; c <= end/s.cs; c++ {
		s.ref(c)
	}
	if err := s.put(b); err != nil {
		return 0, err
	}
	return streamOflagCompressed | uint64(sectors-1)<<s.csShift | uint64(o), nil
}

// setL2 records entry e for guest cluster g, placing the previous L2 table
// when g belongs to another.
func (s *streamState) setL2(g int64, e uint64) error {
	per := s.cs / 8
	if t := g / per; t != s.l2Index {
		if err := s.flushL2(); err != nil {
			return err
		}
		s.l2Index = t
	}
	binary.BigEndian.PutUint64(s.l2[(g%per)*8:], e)
	return nil
}

// flushL2 places the L2 table being filled, if any.
func (s *streamState) flushL2() error {
	if s.l2Index < 0 {
		return nil
	}
	host, err := s.cluster(s.l2)
	if err != nil {
		return err
	}
	s.l1[s.l2Index] = uint64(host) | wrOflagCopied
	clear(s.l2)
	s.l2Index = -1
	return nil
}

// emit places the clusters of a finished batch.
func (s *streamState) emit(b *streamBatch) (alloc, comp int64, err error) {
	for i, k := range b.kind {
		g := b.guestOff/s.cs + int64(i)
		var e uint64
		switch {
		case k < 0:
			continue
		case k == 0:
			host, err := s.cluster(b.data[int64(i)*s.cs : int64(i+1)*s.cs])
			if err != nil {
				return alloc, comp, err
			}
			e = uint64(host) | wrOflagCopied
		default:
			e, err = s.compressed(b.comp[int64(i)*s.cs : int64(i)*s.cs+int64(k)])
			if err != nil {
				return alloc, comp, err
			}
			comp++
		}
		alloc++
		if err := s.setL2(g, e); err != nil {
			return alloc, comp, err
		}
	}
	return alloc, comp, nil
}

// finish places the L1 and refcount structures and hands the head over.
func (s *streamState) finish(vsize int64, ctype int) error {
	if err := s.flushL2(); err != nil {
		return err
	}
	if err := s.align(); err != nil {
		return err
	}
	cs := s.cs
	n := s.off / cs
	l1Size := int64(len(s.l1))
	l1Clusters := ceilDiv(l1Size*8, cs)
	blocks, tableClusters := refcountSizes(s.p.clusterBits, s.p.refcountOrder, n+l1Clusters)
	if tableClusters*cs > wrMaxRefTableBytes {
		return fmt.Errorf("qcow2: image needs a %d-byte refcount table; QEMU allows at most %d: use larger clusters",
			tableClusters*cs, wrMaxRefTableBytes)
	}
	total := n + l1Clusters + tableClusters + blocks
	if total > wrMaxHostOffset/cs {
		return fmt.Errorf("qcow2: image of %d clusters is beyond the 64 PiB host offset limit", total)
	}
	l1Offset := n * cs
	if l1Size == 0 {
		l1Offset = 0
	}
	tableOffset := (n + l1Clusters) * cs
	blocksOffset := tableOffset + tableClusters*cs
	for c := n; c < total; c++ {
		s.ref(c)
	}
	buf := make([]byte, cs)
	for i := int64(0); i < l1Clusters; i++ {
		clear(buf)
		per := cs / 8
		for j := int64(0); j < per && i*per+j < l1Size; j++ {
			binary.BigEndian.PutUint64(buf[j*8:], s.l1[i*per+j])
		}
		if err := s.put(buf); err != nil {
			return err
		}
	}
	for i := int64(0); i < tableClusters; i++ {
		clear(buf)
		fillRefTableCluster(buf, i, blocks, blocksOffset)
		if err := s.put(buf); err != nil {
			return err
		}
	}
	perBlock := cs * 8 >> s.p.refcountOrder
	for b := int64(0); b < blocks; b++ {
		clear(buf)
		for j := int64(0); j < perBlock && b*perBlock+j < total; j++ {
			putRefcount(buf, s.p.refcountOrder, j, uint64(s.refs[b*perBlock+j]))
		}
		if err := s.put(buf); err != nil {
			return err
		}
	}
	if s.off != total*cs {
		return fmt.Errorf("qcow2: internal error: image ends at %d, expected %d", s.off, total*cs)
	}
	h := wrHeaderFields{
		version:          s.p.version,
		clusterBits:      s.p.clusterBits,
		size:             vsize,
		l1Size:           l1Size,
		l1Offset:         l1Offset,
		refTableOffset:   tableOffset,
		refTableClusters: tableClusters,
		refcountOrder:    s.p.refcountOrder,
	}
	if ctype == compressionZstd {
		h.incompatible |= incompatCompressionType
		h.compressionType = byte(compressionZstd)
	}
	clear(s.head[:cs])
	encodeWriterHeader(s.head[:cs], h)
	if s.progress != nil {
		s.progress(vsize, s.off)
	}
	return s.sink.WriteHead(s.head[:min(int64(len(s.head)), s.off)])
}

// fillRefTableCluster fills buf (one zeroed cluster) with cluster i of a
// refcount table whose blocks (blocks of them) start at blocksOffset.
func fillRefTableCluster(buf []byte, i, blocks, blocksOffset int64) {
	cs := int64(len(buf))
	per := cs / 8
	for j := int64(0); j < per && i*per+j < blocks; j++ {
		binary.BigEndian.PutUint64(buf[j*8:], uint64(blocksOffset+(i*per+j)*cs))
	}
}

// parseCompression maps a StreamOptions.Compression name to a type code.
func parseCompression(name string, version uint32) (int, error) {
	switch name {
	case "", "none":
		return streamCompressNone, nil
	case "zlib":
		return compressionZlib, nil
	case "zstd":
		if version < 3 {
			return 0, errors.New("qcow2: zstd compression needs compat 1.1 (version 3)")
		}
		return compressionZstd, nil
	}
	return 0, fmt.Errorf("qcow2: compression %q is none of none, zlib, zstd", name)
}

// Validate reports whether opts can write an image of a size-byte source
// (cluster size, compat, compression, QEMU's metadata size limits), so a
// caller can refuse bad options before it sets up a sink.
func (opts StreamOptions) Validate(size int64) error {
	p, err := opts.params()
	if err != nil {
		return err
	}
	if _, err := parseCompression(opts.Compression, p.version); err != nil {
		return err
	}
	if size < 0 || size > (1<<62) {
		return fmt.Errorf("qcow2: source size %d out of range", size)
	}
	_, err = newImageLayout(p, ceilDiv(size, wrSectorSize)*wrSectorSize, nil)
	return err
}

// WriteStream writes a QCOW2 image of the size bytes read from src into
// sink, in one pass: clusters that read as all zeros (and holes, when src
// is a HoleSeeker) stay unallocated, the others go out in guest order,
// compressed when asked (by opts.Jobs workers; a cluster whose compressed
// form is not smaller is stored as it is), and the metadata follows them.
// The virtual size is size rounded up to a multiple of 512. src must yield
// exactly size bytes. On error nothing more is written to sink and
// WriteHead is not called. ctx cancels the work.
func WriteStream(ctx context.Context, sink StreamSink, src io.Reader, size int64, opts StreamOptions) (StreamStats, error) {
	var st StreamStats
	p, err := opts.params()
	if err != nil {
		return st, err
	}
	ctype, err := parseCompression(opts.Compression, p.version)
	if err != nil {
		return st, err
	}
	if size < 0 || size > (1<<62) {
		return st, fmt.Errorf("qcow2: source size %d out of range", size)
	}
	vsize := ceilDiv(size, wrSectorSize) * wrSectorSize
	// Check the metadata sizes before reading the source.
	lay, err := newImageLayout(p, vsize, nil)
	if err != nil {
		return st, err
	}
	cs := int64(1) << p.clusterBits
	st.VirtualSize, st.ClusterSize = vsize, cs
	jobs := opts.Jobs
	if jobs <= 0 {
		jobs = runtime.NumCPU()
	}
	var zenc *zstd.Encoder
	if ctype == compressionZstd {
		zenc, err = zstd.NewWriter(nil, zstd.WithEncoderConcurrency(jobs), zstd.WithWindowSize(max(int(cs), zstd.MinWindowSize)))
		if err != nil {
			return st, err
		}
		defer zenc.Close()
	}
	headSize := max(ceilDiv(opts.HeadSize, cs)*cs, cs)
	s := &streamState{
		p: p, cs: cs, sink: sink,
		head:     make([]byte, headSize),
		maxRef:   min(uint64(1)<<(uint(1)<<p.refcountOrder)-1, 65535),
		l1:       make([]uint64, lay.l1Size),
		l2:       make([]byte, cs),
		l2Index:  -1,
		zeroPad:  make([]byte, cs),
		csShift:  62 - (p.clusterBits - 8),
		progress: opts.Progress,
	}
	if p.refcountOrder == 6 {
		s.maxRef = 65535
	}
	s.off = cs // cluster 0, the header, is filled in last
	s.ref(0)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batchBytes := max(cs, streamBatchBytes)
	inflight := 2*jobs + 2
	free := make(chan *streamBatch, inflight)
	for range inflight {
		b := &streamBatch{data: make([]byte, batchBytes), kind: make([]int, batchBytes/cs)}
		if ctype != streamCompressNone {
			b.comp = make([]byte, batchBytes)
		}
		free <- b
	}
	work := make(chan *streamBatch, inflight)
	order := make(chan *streamBatch, inflight)

	// Workers: find the zero clusters and compress the others.
	var wg sync.WaitGroup
	for range jobs {
		var comp compressor
		if ctype != streamCompressNone {
			if comp, err = newCompressor(ctype, zenc); err != nil {
				return st, err
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range work {
				for i := range b.kind {
					c := b.data[int64(i)*cs : int64(i+1)*cs]
					switch {
					case zeros.Is(c):
						b.kind[i] = -1
					case comp != nil:
						n, ok := comp(b.comp[int64(i)*cs:int64(i+1)*cs:int64(i+1)*cs], c)
						if ok {
							b.kind[i] = n
						} else {
							b.kind[i] = 0
						}
					default:
						b.kind[i] = 0
					}
				}
				close(b.done)
			}
		}()
	}

	// Reader: the source in guest order, hashed (or checksummed against
	// ExpectSums), zeros for holes.
	var h hash.Hash
	var rec contentRecorder
	var sums *SourceSums
	if opts.ExpectSums != nil {
		sums = &SourceSums{}
		rec = sums
	} else {
		h = sha256.New()
		rec = hashRecorder{h}
	}
	readErr := make(chan error, 1)
	go func() {
		defer close(order)
		defer close(work)
		readErr <- readStream(ctx, src, size, vsize, cs, batchBytes, rec, free, work, order)
	}()

	// Writer: batches in guest order.
	var read int64
	for {
		var b *streamBatch
		select {
		case b = <-order:
		case <-ctx.Done():
			err = ctx.Err()
		}
		if b == nil && err == nil {
			break // the reader is done
		}
		if err == nil {
			select {
			case <-b.done:
			case <-ctx.Done():
				err = ctx.Err()
			}
		}
		if err == nil {
			var a, c int64
			a, c, err = s.emit(b)
			st.AllocatedClusters += a
			st.CompressedClusters += c
			read = b.guestOff + int64(len(b.data))
			if err == nil && s.progress != nil {
				s.progress(min(read, vsize), s.off)
			}
		}
		if err != nil {
			cancel()
			// The reader may be blocked in src.Read (a pipe): do not wait
			// for it, nor for the workers it feeds.
			return st, err
		}
		free <- b
	}
	wg.Wait()
	if err := <-readErr; err != nil {
		return st, err
	}
	if err := ctx.Err(); err != nil {
		return st, err
	}
	if sums != nil {
		if ok, at := sums.Equal(opts.ExpectSums); !ok {
			return st, fmt.Errorf("%w: its raw content differs from the first read in the MiB at byte %d", ErrSourceChanged, at)
		}
	} else {
		h.Sum(st.RawSHA256[:0])
		if want := opts.ExpectSHA256; want != nil && !bytes.Equal(want, st.RawSHA256[:]) {
			return st, fmt.Errorf("%w: its raw content hashes to %x now, %x before", ErrSourceChanged, st.RawSHA256, want)
		}
	}
	if err := s.finish(vsize, ctype); err != nil {
		return st, err
	}
	st.ImageSize = s.off
	return st, nil
}

// contentRecorder takes the raw content in order: the bytes read, and
// runs of zeros for holes.
type contentRecorder interface {
	io.Writer
	WriteZeros(n int64)
}

// hashRecorder records content into a hash.
type hashRecorder struct{ hash.Hash }

func (h hashRecorder) WriteZeros(n int64) { zeros.Write(h.Hash, n) }

// readStream reads the source into batches, skipping holes when src is a
// HoleSeeker, and records the raw content (vsize bytes) into h.
func readStream(ctx context.Context, src io.Reader, size, vsize, cs, batchBytes int64, h contentRecorder,
	free, work, order chan *streamBatch) error {
	hs, _ := src.(HoleSeeker)
	pos := int64(0)
	for pos < size {
		limit := size
		if hs != nil {
			start, end, err := hs.NextData(pos)
			if err != nil {
				return fmt.Errorf("qcow2: finding data in the source at %d: %w", pos, err)
			}
			// No data left: test before rounding start down to a
			// cluster, which would read the tail of an unaligned source.
			if start >= size || end <= start {
				h.WriteZeros(size - pos)
				break
			}
			start = max(pos, start/cs*cs)
			limit = min(size, ceilDiv(end, cs)*cs)
			if start > pos {
				h.WriteZeros(start - pos)
				pos = start
			}
			if _, err := hs.Seek(pos, io.SeekStart); err != nil {
				return fmt.Errorf("qcow2: seeking the source to %d: %w", pos, err)
			}
		}
		for pos < limit {
			var b *streamBatch
			select {
			case b = <-free:
			case <-ctx.Done():
				return ctx.Err()
			}
			n := min(batchBytes, limit-pos)
			if _, err := io.ReadFull(src, b.data[:n]); err != nil {
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("qcow2: reading the source at %d of %d bytes: %w", pos, size, err)
			}
			h.Write(b.data[:n])
			clusters := ceilDiv(n, cs)
			clear(b.data[n : clusters*cs])
			b.guestOff = pos
			b.data = b.data[:clusters*cs]
			b.kind = b.kind[:clusters]
			b.done = make(chan struct{})
			pos += n
			order <- b
			work <- b
		}
	}
	if hs == nil {
		// A stream must end where its size says: more bytes mean the size
		// given is wrong, and the image would silently miss them.
		var one [1]byte
		if n, _ := io.ReadFull(src, one[:]); n > 0 {
			return fmt.Errorf("qcow2: the source has more than its size of %d bytes", size)
		}
	}
	h.WriteZeros(vsize - size)
	return nil
}
