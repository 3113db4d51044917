package qcow2

// Opening images and their chains, and the read path.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/snapfs/snapfs/internal/bufpool"
	"github.com/snapfs/snapfs/objstore"
)

const (
	defaultMaxChainDepth = 16
	defaultL2CacheBytes  = 32 << 20
	// firstHeaderRead is the prefix Open reads first: the header, and for
	// images laid out by qemu-img (L1 in the fourth cluster) the L1 table
	// too, so that opening costs one GET instead of two.
	firstHeaderRead = 256 << 10
	// maxCompressedSpan bounds one coalesced read of compressed clusters.
	maxCompressedSpan = 8 << 20
	// ioParallelism bounds the concurrent store reads of one request.
	ioParallelism = 8
)

// Image is an open QCOW2 image (with its backing chain) served as a raw
// disk of Size bytes. It is read-only and safe for concurrent use.
type Image struct {
	st   objstore.Store
	key  string
	url  string
	obj  objstore.ObjectInfo
	hdr  *header
	geo  geometry
	opts Options

	l1 []byte // the L1 table, raw big-endian
	l2 *l2Cache

	dataKey string // object holding uncompressed clusters (key itself without a data file)
	dataURL string
	dataObj objstore.ObjectInfo

	backing    layer // nil without a backing file
	backingKey string
	backingFmt string // "qcow2" or "raw" once resolved

	depth int

	// refused is set only by Inspect: why Open would refuse this image.
	// selfRefused says the reason is in this layer's own header, which is
	// then only partly parsed.
	refused     string
	selfRefused bool

	// dec keeps recently decompressed clusters, so that small sequential
	// reads of a compressed cluster decompress it once.
	dec *decCache

	closed atomic.Bool
}

// layer is one level of a backing chain: a QCOW2 image or a raw object.
type layer interface {
	Size() int64
	URL() string
	// readLayer fills p from offset off; bytes past Size read as zeros.
	readLayer(ctx context.Context, p []byte, off int64) error
	// mapLayer appends the extents of [off, off+length), which lies within
	// Size, with this layer at depth.
	mapLayer(ctx context.Context, off, length int64, depth int, out []Extent) ([]Extent, error)
	info(ctx context.Context) (*Info, error)
	Close() error
}

func (o *Options) normalized() Options {
	var n Options
	if o != nil {
		n = *o
	}
	if n.MaxChainDepth <= 0 {
		n.MaxChainDepth = defaultMaxChainDepth
	}
	if n.L2CacheBytes <= 0 {
		n.L2CacheBytes = defaultL2CacheBytes
	}
	return n
}

// Open opens the QCOW2 image stored under key, and its backing chain and
// external data file, which must be in st next to it. It reads the header
// and the L1 table; L2 tables are read on demand. It fails with an *Error
// wrapping ErrNotQCOW2, ErrCorrupt, ErrUnsupported (with the reason) or
// the store's error. opts may be nil.
func Open(ctx context.Context, st objstore.Store, key string, opts *Options) (*Image, error) {
	return openImage(ctx, st, key, opts.normalized(), 0, nil, false)
}

// Inspect parses and checks the image under key like Open, but describes an
// image that Open would refuse (Servable false, Reason set) instead of
// failing. It fails only when the header cannot be read or is malformed.
// For a servable image it walks the L2 tables to fill AllocatedBytes.
func Inspect(ctx context.Context, st objstore.Store, key string) (*Info, error) {
	im, err := openImage(ctx, st, key, (*Options)(nil).normalized(), 0, nil, true)
	if err != nil {
		return nil, err
	}
	defer im.Close()
	return im.info(ctx)
}

// openImage opens key at the given depth of a chain; seen holds the keys
// above it. In lenient mode (Inspect) refusals are recorded in the Image
// instead of failing.
func openImage(ctx context.Context, st objstore.Store, key string, opts Options, depth int, seen []string, lenient bool) (*Image, error) {
	url := st.URL(key)
	obj, err := st.Stat(ctx, key)
	if err != nil {
		return nil, &Error{URL: url, Offset: -1, Err: err}
	}
	im := &Image{st: st, key: key, url: url, obj: obj, opts: opts, depth: depth}

	// The header, extensions and backing name all lie in the first cluster;
	// read a prefix and more only if the parser asks.
	n := min(int64(firstHeaderRead), obj.Size)
	var h *header
	var buf []byte
	for try := 0; ; try++ {
		buf = make([]byte, n)
		if err := im.readFull(ctx, key, buf, 0); err != nil {
			return nil, &Error{URL: url, Offset: -1, Err: err}
		}
		h, err = parseHeader(buf, obj.Size)
		var more *errNeedMore
		if errors.As(err, &more) && try < 3 && more.n > n && more.n <= obj.Size {
			n = more.n
			continue
		}
		break
	}
	if err != nil {
		var more *errNeedMore
		if errors.As(err, &more) {
			err = corrupt("header truncated")
		}
		if lenient && errors.Is(err, ErrUnsupported) && h != nil {
			im.hdr, im.refused, im.selfRefused = h, reasonOf(err), true
			return im, nil
		}
		return nil, &Error{URL: url, Offset: -1, Err: err}
	}
	im.hdr = h
	im.geo = geometry{
		clusterBits: h.clusterBits,
		v3:          h.version >= 3,
		extendedL2:  h.extendedL2(),
		dataFile:    h.hasDataFile(),
		imageSize:   obj.Size,
		dataSize:    obj.Size,
	}
	im.dataKey, im.dataURL, im.dataObj = key, url, obj
	fail := func(err error) (*Image, error) {
		if lenient && !errors.Is(err, ErrCorrupt) && errors.Is(err, ErrUnsupported) {
			im.refused, im.selfRefused = reasonOf(err), true
			return im, nil
		}
		return nil, &Error{URL: url, Offset: -1, Err: err}
	}

	if h.hasDataFile() {
		dkey, err := resolveName(key, h.dataFile, "external data file")
		if err != nil {
			return fail(err)
		}
		dobj, err := st.Stat(ctx, dkey)
		if err != nil {
			if errors.Is(err, objstore.ErrNotFound) {
				return fail(&refusal{reason: fmt.Sprintf("external data file %q (%s) not found", h.dataFile, st.URL(dkey)), cause: err})
			}
			return nil, &Error{URL: url, Offset: -1, Err: err}
		}
		im.dataKey, im.dataURL, im.dataObj = dkey, st.URL(dkey), dobj
		im.geo.dataSize = dobj.Size
	}

	// The L1 table: bounded (32 MiB) and inside the object, checked by
	// parseHeader.
	im.l1 = make([]byte, h.l1Size*8)
	if h.l1TableOffset+int64(len(im.l1)) <= int64(len(buf)) {
		copy(im.l1, buf[h.l1TableOffset:])
	} else if err := im.readFull(ctx, key, im.l1, h.l1TableOffset); err != nil {
		return nil, &Error{URL: url, Offset: -1, Err: err}
	}
	im.l2 = newL2Cache(int(opts.L2CacheBytes >> h.clusterBits))
	im.dec = newDecCache(int(min(64, max(2, decCacheBytes>>h.clusterBits))))

	if h.backingFile != "" {
		if err := im.openBacking(ctx, append(seen, key), lenient); err != nil {
			if lenient {
				if errors.Is(err, ErrUnsupported) || errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNotQCOW2) {
					im.refused = fmt.Sprintf("backing file %q: %s", h.backingFile, reasonOf(err))
					return im, nil
				}
			}
			im.Close()
			if _, ok := err.(*Error); ok {
				return nil, &Error{URL: url, Offset: -1, Err: fmt.Errorf("backing file %q: %w", h.backingFile, err)}
			}
			return nil, &Error{URL: url, Offset: -1, Err: err}
		}
	}
	return im, nil
}

// openBacking resolves, checks and opens the backing file. seen holds the
// keys of the chain down to this image.
func (im *Image) openBacking(ctx context.Context, seen []string, lenient bool) error {
	h := im.hdr
	bkey, err := resolveName(im.key, h.backingFile, "backing file")
	if err != nil {
		return err
	}
	im.backingKey = bkey
	for _, k := range seen {
		if k == bkey {
			return refuse("backing loop: %s appears twice in the chain", im.st.URL(bkey))
		}
	}
	if im.depth+1 > im.opts.MaxChainDepth {
		return refuse("backing chain deeper than %d", im.opts.MaxChainDepth)
	}
	burl := im.st.URL(bkey)
	bobj, err := im.st.Stat(ctx, bkey)
	if err != nil {
		if errors.Is(err, objstore.ErrNotFound) {
			return &refusal{reason: fmt.Sprintf("backing file %q (%s) not found", h.backingFile, burl), cause: err}
		}
		return err
	}
	format := h.backingFormat
	switch format {
	case "qcow2", "raw":
	case "":
		// No format recorded: probe the magic.
		format = "raw"
		if bobj.Size >= 4 {
			var magic [4]byte
			if err := im.readFull(ctx, bkey, magic[:], 0); err != nil {
				return &Error{URL: burl, Offset: -1, Err: err}
			}
			if string(magic[:]) == "QFI\xfb" {
				format = "qcow2"
			}
		}
	default:
		return refuse("backing format %q is not supported", format)
	}
	im.backingFmt = format
	if format == "raw" {
		im.backing = &rawLayer{st: im.st, key: bkey, url: burl, obj: bobj}
		return nil
	}
	b, err := openImage(ctx, im.st, bkey, im.opts, im.depth+1, seen, lenient)
	if err != nil {
		return err
	}
	im.backing = b
	if b.refused != "" {
		return &refusal{reason: b.refused}
	}
	return nil
}

// resolveName turns a backing or data file name from the header into a key
// of the same store, relative to the directory of key. Absolute names,
// names leaving that directory and protocol-like names ("http://...",
// "nbd:...", "json:{...}") are refused.
func resolveName(key, name, what string) (string, error) {
	switch {
	case strings.HasPrefix(name, "json:"):
		return "", refuse("%s name %q is a json: pseudo-protocol", what, name)
	case strings.HasPrefix(name, "/"):
		return "", refuse("%s name %q is absolute", what, name)
	case strings.IndexByte(name, 0) >= 0:
		return "", refuse("%s name %q contains a NUL byte", what, name)
	}
	if i := strings.IndexByte(name, ':'); i >= 0 {
		if j := strings.IndexByte(name, '/'); j < 0 || i < j {
			return "", refuse("%s name %q looks like a protocol", what, name)
		}
	}
	c := path.Clean(name)
	if c == "." || c == ".." || strings.HasPrefix(c, "../") {
		return "", refuse("%s name %q escapes the image's directory", what, name)
	}
	if dir := path.Dir(key); dir != "." {
		return dir + "/" + c, nil
	}
	return c, nil
}

// readFull reads len(p) bytes of key at off; the range must exist.
func (im *Image) readFull(ctx context.Context, key string, p []byte, off int64) error {
	return readFull(ctx, im.st, key, p, off)
}

// readFull reads len(p) bytes of key in st at off; the range must exist.
func readFull(ctx context.Context, st objstore.Store, key string, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	n, err := st.ReadAt(ctx, key, p, off, objstore.ReadOptions{})
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// readZeroFill reads p from key in st at off, where the object holds size
// bytes; bytes past size read as zeros.
func readZeroFill(ctx context.Context, st objstore.Store, key string, size int64, p []byte, off int64) error {
	if off >= size {
		clear(p)
		return nil
	}
	if avail := size - off; int64(len(p)) > avail {
		clear(p[avail:])
		p = p[:avail]
	}
	return readFull(ctx, st, key, p, off)
}

// Size returns the virtual size of the disk in bytes.
func (im *Image) Size() int64 { return im.hdr.size }

// ClusterSize returns the image's cluster size in bytes.
func (im *Image) ClusterSize() int64 { return im.hdr.clusterSize() }

// Object returns the image object as Open found it (size, ETag).
func (im *Image) Object() objstore.ObjectInfo { return im.obj }

// URL names the image object, as the store's URL gives it.
func (im *Image) URL() string { return im.url }

// Close releases the caches of the image and its chain. Reads after Close
// fail.
func (im *Image) Close() error {
	if im.closed.Swap(true) {
		return nil
	}
	if im.l2 != nil {
		im.l2.clear()
	}
	if im.dec != nil {
		im.dec.clear()
	}
	if im.backing != nil {
		im.backing.Close()
	}
	return nil
}

// ReadAt implements io.ReaderAt over the virtual disk.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	return im.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads len(p) bytes of the virtual disk at off. Like
// io.ReaderAt it returns io.EOF with the bytes up to the virtual size when
// the range runs past it. Errors are *Error; a corrupt mapping fails the
// read with the guest offset where it was found.
func (im *Image) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, &Error{URL: im.url, Offset: off, Err: errors.New("negative offset")}
	}
	if im.closed.Load() {
		return 0, &Error{URL: im.url, Offset: off, Err: os.ErrClosed}
	}
	size := im.hdr.size
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p = p[:size-off]
		eof = io.EOF
	}
	if err := im.readLayer(ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), eof
}

// Read plan of one request: runs of data clusters contiguous on the host
// become one store read, adjacent compressed clusters one read too.
type dataRun struct {
	guest, host int64
	dst         []byte
}

type compItem struct {
	m      mapping // the compressed cluster
	within int64   // offset in the cluster of dst[0]
	guest  int64
	dst    []byte
}

type compGroup struct {
	start, end int64 // host range in the image
	items      []compItem
}

type backRun struct {
	guest int64
	dst   []byte
}

type readPlan struct {
	data []dataRun
	comp []compGroup
	back []backRun
}

func (im *Image) readLayer(ctx context.Context, p []byte, off int64) error {
	size := im.hdr.size
	if off >= size {
		clear(p)
		return nil
	}
	if int64(len(p)) > size-off {
		clear(p[size-off:])
		p = p[:size-off]
	}
	pl, err := im.plan(ctx, p, off)
	if err != nil {
		return err
	}
	return im.execute(ctx, pl)
}

// plan maps p (guest offset off, inside the virtual size) cluster by
// cluster, clears the zero parts and collects the I/O to do.
func (im *Image) plan(ctx context.Context, p []byte, off int64) (*readPlan, error) {
	pl := &readPlan{}
	end := off + int64(len(p))
	for pos := off; pos < end; {
		m, err := im.lookup(ctx, pos)
		if err != nil {
			return nil, err
		}
		l := min(m.length, end-pos)
		dst := p[pos-off : pos-off+l]
		switch m.kind {
		case Zero:
			clear(dst)
		case Unallocated:
			if im.backing == nil {
				clear(dst)
				break
			}
			if n := len(pl.back); n > 0 {
				b := &pl.back[n-1]
				if b.guest+int64(len(b.dst)) == pos {
					b.dst = p[b.guest-off : pos-off+l]
					break
				}
			}
			pl.back = append(pl.back, backRun{guest: pos, dst: dst})
		case Data:
			if n := len(pl.data); n > 0 {
				d := &pl.data[n-1]
				dl := int64(len(d.dst))
				if d.guest+dl == pos && d.host+dl == m.host {
					d.dst = p[d.guest-off : pos-off+l]
					break
				}
			}
			pl.data = append(pl.data, dataRun{guest: pos, host: m.host, dst: dst})
		case Compressed:
			within := pos - m.clusterStart
			if int64(len(dst)) < im.geo.clusterSize() {
				if c := im.dec.get(m.host); c != nil {
					copy(dst, c[within:])
					break
				}
			}
			it := compItem{m: m, within: within, guest: pos, dst: dst}
			cend := m.host + m.clen
			if n := len(pl.comp); n > 0 {
				g := &pl.comp[n-1]
				if m.host >= g.start && m.host <= g.end && max(g.end, cend)-g.start <= maxCompressedSpan {
					g.end = max(g.end, cend)
					g.items = append(g.items, it)
					break
				}
			}
			pl.comp = append(pl.comp, compGroup{start: m.host, end: cend, items: []compItem{it}})
		}
		pos += l
	}
	return pl, nil
}

// execute runs the store reads of a plan, in parallel when there are
// several.
func (im *Image) execute(ctx context.Context, pl *readPlan) error {
	var tasks []func(context.Context) error
	for _, d := range pl.data {
		tasks = append(tasks, func(ctx context.Context) error {
			if err := readZeroFill(ctx, im.st, im.dataKey, im.dataObj.Size, d.dst, d.host); err != nil {
				return &Error{URL: im.dataURL, Offset: d.guest, Err: err}
			}
			return nil
		})
	}
	for _, g := range pl.comp {
		tasks = append(tasks, func(ctx context.Context) error { return im.readCompressed(ctx, g) })
	}
	for _, b := range pl.back {
		tasks = append(tasks, func(ctx context.Context) error { return im.backing.readLayer(ctx, b.dst, b.guest) })
	}
	switch len(tasks) {
	case 0:
		return nil
	case 1:
		return tasks[0](ctx)
	}
	eg, ctx := errgroup.WithContext(ctx)
	eg.SetLimit(ioParallelism)
	for _, t := range tasks {
		eg.Go(func() error { return t(ctx) })
	}
	return eg.Wait()
}

// readCompressed fetches a group of compressed clusters with one read and
// decompresses them, in parallel when there are several.
func (im *Image) readCompressed(ctx context.Context, g compGroup) error {
	end := min(g.end, im.obj.Size)
	bp := bufpool.Get(int(end - g.start))
	defer bufpool.Put(bp)
	buf := *bp
	if err := im.readFull(ctx, im.key, buf, g.start); err != nil {
		return &Error{URL: im.url, Offset: g.items[0].guest, Err: err}
	}
	one := func(it compItem) error {
		src := buf[it.m.host-g.start : min(it.m.host+it.m.clen, end)-g.start]
		if err := im.decompressInto(src, it.dst, it.within, it.m.host); err != nil {
			return &Error{URL: im.url, Offset: it.guest, Err: fmt.Errorf("%w: compressed cluster at host offset %#x: %v", ErrCorrupt, it.m.host, err)}
		}
		return nil
	}
	if len(g.items) == 1 {
		return one(g.items[0])
	}
	var eg errgroup.Group
	eg.SetLimit(runtime.GOMAXPROCS(0))
	for _, it := range g.items {
		eg.Go(func() error { return one(it) })
	}
	return eg.Wait()
}

// decompressInto decodes the compressed cluster src (at host offset host)
// and copies its bytes from offset within into dst. Partly read clusters
// are kept in the decompressed-cluster cache.
func (im *Image) decompressInto(src, dst []byte, within, host int64) error {
	cs := im.hdr.clusterSize()
	if within == 0 && int64(len(dst)) == cs {
		return decompressCluster(im.hdr.compressionType, src, dst)
	}
	c := make([]byte, cs)
	if err := decompressCluster(im.hdr.compressionType, src, c); err != nil {
		return err
	}
	copy(dst, c[within:])
	im.dec.add(host, c)
	return nil
}

// decCacheBytes bounds the decompressed clusters kept per image.
const decCacheBytes = 16 << 20

// decCache is a small LRU of decompressed clusters keyed by the host
// offset of their compressed data.
type decCache struct {
	mu   sync.Mutex
	max  int
	keys []int64 // most recent last
	m    map[int64][]byte
}

func newDecCache(n int) *decCache { return &decCache{max: n, m: make(map[int64][]byte)} }

func (c *decCache) get(host int64) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.m[host]
	if ok {
		c.touch(host)
	}
	return b
}

func (c *decCache) touch(host int64) {
	for i, k := range c.keys {
		if k == host {
			copy(c.keys[i:], c.keys[i+1:])
			c.keys[len(c.keys)-1] = host
			return
		}
	}
}

func (c *decCache) add(host int64, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[host]; ok {
		c.touch(host)
		return
	}
	if len(c.keys) >= c.max {
		delete(c.m, c.keys[0])
		c.keys = append(c.keys[:0], c.keys[1:]...)
	}
	c.keys = append(c.keys, host)
	c.m[host] = b
}

func (c *decCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.keys = nil
	clear(c.m)
}

// Map returns the extents of the guest range [off, off+length) across the
// whole chain, merged like `qemu-img map --output=json` does. The range is
// clamped to the virtual size.
func (im *Image) Map(ctx context.Context, off, length int64) ([]Extent, error) {
	if im.closed.Load() {
		return nil, &Error{URL: im.url, Offset: off, Err: os.ErrClosed}
	}
	off = max(off, 0)
	end := min(off+max(length, 0), im.hdr.size)
	if off >= end {
		return nil, nil
	}
	return im.mapLayer(ctx, off, end-off, 0, nil)
}

func (im *Image) mapLayer(ctx context.Context, off, length int64, depth int, out []Extent) ([]Extent, error) {
	end := off + length
	warm := off // L2 tables of [off, warm) were prefetched
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if pos >= warm {
			var err error
			if warm, err = im.prefetchL2(ctx, pos, end); err != nil {
				return nil, err
			}
		}
		m, err := im.lookup(ctx, pos)
		if err != nil {
			return nil, err
		}
		l := min(m.length, end-pos)
		switch m.kind {
		case Data:
			out = appendExtent(out, Extent{Start: pos, Length: l, Kind: Data, Depth: depth, HostOffset: m.host, File: im.dataURL})
		case Compressed:
			out = appendExtent(out, Extent{Start: pos, Length: l, Kind: Compressed, Depth: depth, HostOffset: -1, File: im.url})
		case Zero:
			out = appendExtent(out, Extent{Start: pos, Length: l, Kind: Zero, Depth: depth, HostOffset: -1})
		case Unallocated:
			if im.backing == nil {
				out = appendExtent(out, Extent{Start: pos, Length: l, Kind: Unallocated, Depth: depth, HostOffset: -1})
				break
			}
			bs := im.backing.Size()
			if pos < bs {
				bl := min(pos+l, bs) - pos
				if out, err = im.backing.mapLayer(ctx, pos, bl, depth+1, out); err != nil {
					return nil, err
				}
			}
			if pos+l > bs {
				// Past the end of a shorter backing file: in no layer, at
				// this layer's depth, as qemu-img map reports it.
				s := max(pos, bs)
				out = appendExtent(out, Extent{Start: s, Length: pos + l - s, Kind: Unallocated, Depth: depth, HostOffset: -1})
			}
		}
		pos += l
	}
	return out, nil
}

// prefetchL2 reads the L2 tables of the guest range [off, end) that the
// cache lacks, ioParallelism at a time, so that a walk of a large range
// waits for one round trip per batch instead of one per table. It stops at
// half the cache's tables (so that none is evicted before use) and returns
// the guest offset up to which the tables are now cached. Entries that do
// not decode are left for lookup to report.
func (im *Image) prefetchL2(ctx context.Context, off, end int64) (int64, error) {
	span := int64(1) << (im.hdr.clusterBits + im.hdr.l2Bits())
	i0 := off / span
	i1 := min((end+span-1)/span, im.hdr.l1Size, i0+int64(max(1, im.l2.max/2)))
	type table struct{ i, off int64 } // L1 index, L2 table offset
	var miss []table                  // not cached
	for i := i0; i < i1; i++ {
		l2off, err := im.l2Offset(i)
		if err == nil && l2off != 0 && im.l2.peek(l2off) == nil {
			miss = append(miss, table{i, l2off})
		}
	}
	if len(miss) > 1 {
		eg, ectx := errgroup.WithContext(ctx)
		eg.SetLimit(ioParallelism)
		for _, m := range miss {
			eg.Go(func() error {
				if _, err := im.l2Table(ectx, m.off); err != nil {
					return &Error{URL: im.url, Offset: max(off, m.i*span), Err: err}
				}
				return nil
			})
		}
		if err := eg.Wait(); err != nil {
			return 0, err
		}
	}
	return i1 * span, nil
}

// appendExtent appends e, merging it into the last extent when both have the
// same kind, depth and file and (for data) are contiguous on the host.
func appendExtent(out []Extent, e Extent) []Extent {
	if n := len(out); n > 0 {
		last := &out[n-1]
		if last.Kind == e.Kind && last.Depth == e.Depth && last.File == e.File &&
			last.Start+last.Length == e.Start &&
			(e.Kind != Data || last.HostOffset+last.Length == e.HostOffset) {
			last.Length += e.Length
			return out
		}
	}
	return append(out, e)
}

// rawLayer is a raw backing file.
type rawLayer struct {
	st  objstore.Store
	key string
	url string
	obj objstore.ObjectInfo
}

func (r *rawLayer) Size() int64  { return r.obj.Size }
func (r *rawLayer) URL() string  { return r.url }
func (r *rawLayer) Close() error { return nil }

func (r *rawLayer) readLayer(ctx context.Context, p []byte, off int64) error {
	if err := readZeroFill(ctx, r.st, r.key, r.obj.Size, p, off); err != nil {
		return &Error{URL: r.url, Offset: off, Err: err}
	}
	return nil
}

func (r *rawLayer) mapLayer(ctx context.Context, off, length int64, depth int, out []Extent) ([]Extent, error) {
	return appendExtent(out, Extent{Start: off, Length: length, Kind: Data, Depth: depth, HostOffset: off, File: r.url}), nil
}

func (r *rawLayer) info(ctx context.Context) (*Info, error) {
	return &Info{
		URL:            r.url,
		Format:         "raw",
		VirtualSize:    r.obj.Size,
		ObjectSize:     r.obj.Size,
		ETag:           r.obj.ETag,
		LastModified:   r.obj.LastModified,
		AllocatedBytes: r.obj.Size,
		Servable:       true,
	}, nil
}
