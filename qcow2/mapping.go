package qcow2

// Guest-to-host mapping: L1/L2 entry decoding, the lazy L2 table cache and
// the cluster lookup used by reads, Map and Info.

import (
	"container/list"
	"context"
	"encoding/binary"
	"errors"
	"strconv"
	"sync"

	"golang.org/x/sync/singleflight"
)

const (
	offsetMask     = 0x00fffffffffffe00 // bits 9-55: L1/L2 host offsets
	flagCopied     = 1 << 63
	flagCompressed = 1 << 62
	flagZero       = 1 << 0
	l1Reserved     = 0x7f000000000001ff // bits 0-8 and 56-62
	l2Reserved     = 0x3f000000000001fe // bits 1-8 and 56-61 of a standard entry
	subclusters    = 32                 // per cluster with extended L2 entries
)

// geometry is what decoding an L2 entry needs to know about the image.
type geometry struct {
	clusterBits int
	v3          bool  // the zero flag exists
	extendedL2  bool  // 128-bit entries with subcluster bitmaps
	dataFile    bool  // host offsets point into an external data file
	imageSize   int64 // bytes in the image object (compressed clusters live there)
	dataSize    int64 // bytes in the object holding uncompressed clusters
}

func (g *geometry) clusterSize() int64 { return 1 << g.clusterBits }

// nsub is the number of subclusters per cluster (1 without extended L2).
func (g *geometry) nsub() int {
	if g.extendedL2 {
		return subclusters
	}
	return 1
}

// l2Entry is a decoded and validated L2 entry.
//
// Subcluster i (0 <= i < nsub) is compressed when compressed is set,
// otherwise data at host + i*subclusterSize when alloc bit i is set, zeros
// when zero bit i is set, else unallocated (read from the backing file).
// Without extended L2 entries the whole cluster is subcluster 0.
type l2Entry struct {
	compressed bool
	hasHost    bool   // host is meaningful (a preallocated zero cluster keeps one)
	host       int64  // standard: host cluster offset; compressed: byte offset
	clen       int64  // compressed: bytes from host to the end of the last sector
	alloc      uint32 // subclusters stored at host
	zero       uint32 // subclusters that read as zeros
}

// kind returns what subcluster i holds.
func (e *l2Entry) kind(i int) ExtentKind {
	switch {
	case e.compressed:
		return Compressed
	case e.alloc&(1<<i) != 0:
		return Data
	case e.zero&(1<<i) != 0:
		return Zero
	}
	return Unallocated
}

// decodeL2Entry decodes one L2 entry (and, with extended L2, its subcluster
// bitmap) and checks it: reserved bits clear, host offsets aligned and
// inside their objects, compressed ranges inside the image, bitmaps
// consistent. The error wraps ErrCorrupt and says what is wrong.
func decodeL2Entry(raw, bitmap uint64, g *geometry) (l2Entry, error) {
	var e l2Entry
	if raw&flagCompressed != 0 {
		if g.dataFile {
			return e, corrupt("compressed cluster in an image with an external data file")
		}
		if g.extendedL2 && bitmap != 0 {
			return e, corrupt("compressed cluster with a non-zero subcluster bitmap %#x", bitmap)
		}
		x := uint(62 - (g.clusterBits - 8))
		off := int64(raw & (1<<x - 1))
		nsec := int64(raw>>x) & (1<<(62-x) - 1)
		length := nsec*512 + 512 - off&511
		// The last sector may be cut short by the end of the object.
		if off >= g.imageSize || off+length > (g.imageSize+511)&^511 {
			return e, corrupt("compressed cluster at %#x (%d bytes) extends past the end of the image (%d bytes)", off, length, g.imageSize)
		}
		e.compressed = true
		e.host = off
		e.clen = length
		return e, nil
	}
	if raw&l2Reserved != 0 {
		return e, corrupt("L2 entry %#016x has reserved bits set", raw)
	}
	host := int64(raw & offsetMask)
	zeroFlag := raw&flagZero != 0
	if zeroFlag && (!g.v3 || g.extendedL2) {
		return e, corrupt("L2 entry %#016x has reserved bit 0 set", raw)
	}
	e.hasHost = host != 0 || (g.dataFile && raw&flagCopied != 0)
	if e.hasHost {
		if host&(g.clusterSize()-1) != 0 {
			return e, corrupt("L2 entry %#016x: host offset %#x is not cluster aligned", raw, host)
		}
		e.host = host
	}
	if !g.extendedL2 {
		switch {
		case zeroFlag:
			e.zero = 1 // zero wins over a (preallocated) host offset
		case e.hasHost:
			e.alloc = 1
		}
	} else {
		e.alloc = uint32(bitmap)
		e.zero = uint32(bitmap >> 32)
		if e.alloc&e.zero != 0 {
			return e, corrupt("subcluster bitmap %#016x marks subclusters both allocated and zero", bitmap)
		}
		if !e.hasHost && e.alloc != 0 {
			return e, corrupt("subcluster bitmap %#016x marks subclusters allocated in an unallocated cluster", bitmap)
		}
	}
	if e.alloc != 0 && host >= g.dataSize {
		return e, corrupt("host offset %#x is past the end of the data file (%d bytes)", host, g.dataSize)
	}
	return e, nil
}

// l2Offset returns the L2 table offset in L1 entry i (0 when the L2
// table is unallocated), decoded and checked by decodeL1Entry.
func (im *Image) l2Offset(i int64) (int64, error) {
	return decodeL1Entry(binary.BigEndian.Uint64(im.l1[i*8:]), &im.geo)
}

// decodeL1Entry returns the L2 table offset of an L1 entry (0 when the L2
// table is unallocated), checked against the image.
func decodeL1Entry(raw uint64, g *geometry) (int64, error) {
	if raw&l1Reserved != 0 {
		return 0, corrupt("L1 entry %#016x has reserved bits set", raw)
	}
	off := int64(raw & offsetMask)
	if off == 0 {
		return 0, nil
	}
	cs := g.clusterSize()
	if off&(cs-1) != 0 {
		return 0, corrupt("L2 table offset %#x is not cluster aligned", off)
	}
	if off > g.imageSize-cs {
		return 0, corrupt("L2 table at %#x extends past the end of the image (%d bytes)", off, g.imageSize)
	}
	return off, nil
}

// l2Cache is a bounded LRU of L2 tables (raw big-endian bytes, one cluster
// each) keyed by host offset. Concurrent misses for one table share a fetch.
type l2Cache struct {
	mu    sync.Mutex
	max   int
	ll    *list.List // front = most recently used
	items map[int64]*list.Element
	sf    singleflight.Group
}

type l2Item struct {
	off   int64
	table []byte
}

func newL2Cache(maxTables int) *l2Cache {
	return &l2Cache{max: max(maxTables, 2), ll: list.New(), items: make(map[int64]*list.Element)}
}

func (c *l2Cache) peek(off int64) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[off]; ok {
		c.ll.MoveToFront(el)
		return el.Value.(*l2Item).table
	}
	return nil
}

func (c *l2Cache) add(off int64, t []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.items[off]; ok {
		return
	}
	c.items[off] = c.ll.PushFront(&l2Item{off, t})
	for c.ll.Len() > c.max {
		el := c.ll.Back()
		c.ll.Remove(el)
		delete(c.items, el.Value.(*l2Item).off)
	}
}

func (c *l2Cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}

func (c *l2Cache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ll.Init()
	clear(c.items)
}

// get returns the table at off, calling fetch on a miss. Callers missing
// the same table at once share one fetch; if that fetch fails only because
// the fetching caller's context ended, the others retry with their own.
func (c *l2Cache) get(ctx context.Context, off int64, fetch func(context.Context) ([]byte, error)) ([]byte, error) {
	for {
		if t := c.peek(off); t != nil {
			return t, nil
		}
		v, err, _ := c.sf.Do(strconv.FormatInt(off, 10), func() (any, error) {
			if t := c.peek(off); t != nil {
				return t, nil
			}
			t, err := fetch(ctx)
			if err != nil {
				return nil, err
			}
			c.add(off, t)
			return t, nil
		})
		if err != nil {
			if ctx.Err() == nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) {
				continue
			}
			return nil, err
		}
		return v.([]byte), nil
	}
}

// mapping describes the guest range [start, start+length), which lies in
// one cluster and has one kind in this layer.
type mapping struct {
	kind   ExtentKind
	start  int64 // guest offset
	length int64
	// Data: host offset of start in the data file.
	// Compressed: byte offset of the compressed cluster in the image.
	host         int64
	clen         int64 // Compressed: length of the compressed range
	clusterStart int64 // guest offset of the cluster
}

// lookup maps the guest offset g (0 <= g < size) of this layer: the
// returned mapping starts at g and runs to the end of the cluster, or of
// the run of subclusters of the same kind, clamped to the virtual size.
// Errors are *Error with Offset g and wrap ErrCorrupt or a store error.
func (im *Image) lookup(ctx context.Context, g int64) (mapping, error) {
	e, noL2, err := im.entryAt(ctx, g)
	if err != nil {
		return mapping{}, err
	}
	cs := im.geo.clusterSize()
	cstart := g &^ (cs - 1)
	m := mapping{start: g, clusterStart: cstart, host: -1}
	if noL2 {
		// The whole range of the missing L2 table is unallocated.
		span := int64(1) << (im.geo.clusterBits + im.hdr.l2Bits())
		m.kind = Unallocated
		m.length = min(g&^(span-1)+span, im.hdr.size) - g
		return m, nil
	}
	cend := min(cstart+cs, im.hdr.size)
	if e.compressed {
		m.kind, m.length, m.host, m.clen = Compressed, cend-g, e.host, e.clen
		return m, nil
	}
	sub := cs / int64(im.geo.nsub())
	i := int((g - cstart) / sub)
	m.kind = e.kind(i)
	j := i + 1
	for j < im.geo.nsub() && e.kind(j) == m.kind {
		j++
	}
	m.length = min(cstart+int64(j)*sub, cend) - g
	if m.kind == Data {
		m.host = e.host + (g - cstart)
	}
	return m, nil
}

// entryAt returns the decoded L2 entry for the cluster holding guest
// offset g, or noL2 when the L1 entry has no L2 table.
func (im *Image) entryAt(ctx context.Context, g int64) (e l2Entry, noL2 bool, err error) {
	cb := im.geo.clusterBits
	l2Bits := im.hdr.l2Bits()
	l1i := g >> (cb + l2Bits)
	l2i := (g >> cb) & (1<<l2Bits - 1)
	if g < 0 || l1i >= im.hdr.l1Size {
		return e, false, &Error{URL: im.url, Offset: g, Err: corrupt("guest offset outside the L1 table")}
	}
	l2off, err := im.l2Offset(l1i)
	if err != nil {
		return e, false, &Error{URL: im.url, Offset: g, Err: err}
	}
	if l2off == 0 {
		return e, true, nil
	}
	t, err := im.l2Table(ctx, l2off)
	if err != nil {
		return e, false, &Error{URL: im.url, Offset: g, Err: err}
	}
	es := im.hdr.l2EntrySize()
	raw := binary.BigEndian.Uint64(t[l2i*es:])
	var bitmap uint64
	if es == 16 {
		bitmap = binary.BigEndian.Uint64(t[l2i*es+8:])
	}
	e, err = decodeL2Entry(raw, bitmap, &im.geo)
	if err != nil {
		return e, false, &Error{URL: im.url, Offset: g, Err: err}
	}
	return e, false, nil
}

// l2Table returns the L2 table at host offset off (already checked by
// decodeL1Entry), from the cache or the store.
func (im *Image) l2Table(ctx context.Context, off int64) ([]byte, error) {
	return im.l2.get(ctx, off, func(ctx context.Context) ([]byte, error) {
		return im.readL2(ctx, off)
	})
}

// readL2 reads the L2 table at off from the store, bypassing the cache.
func (im *Image) readL2(ctx context.Context, off int64) ([]byte, error) {
	t := make([]byte, im.geo.clusterSize())
	if err := im.readFull(ctx, im.key, t, off); err != nil {
		return nil, err
	}
	return t, nil
}
