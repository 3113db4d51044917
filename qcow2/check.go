package qcow2

// Consistency check of an image's metadata, like `qemu-img check`: every
// structure is walked, the expected reference count of each host cluster is
// rebuilt from the references found and compared with the stored refcounts.
// L1/L2 entries are decoded with the read path's decodeL2Entry, so that Check
// and reads agree on what is valid.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
)

// Problem kinds, in Problem.Kind.
const (
	// ProblemHeader is a problem with the header or its feature bits.
	ProblemHeader = "header"
	// ProblemL1 is a bad L1 table entry or L1 table placement.
	ProblemL1 = "l1"
	// ProblemL2 is a bad L2 table entry.
	ProblemL2 = "l2"
	// ProblemCopied is an L1 or L2 entry whose "copied" flag (bit 63)
	// disagrees with the stored refcount being exactly one.
	ProblemCopied = "copied-flag"
	// ProblemRefcountTable is a bad refcount table entry or table placement.
	ProblemRefcountTable = "refcount-table"
	// ProblemRefcount is a stored refcount lower than the references found
	// (an error), or a reference count beyond what refcount_bits can hold.
	ProblemRefcount = "refcount"
	// ProblemLeak is a cluster whose stored refcount is higher than the
	// references found.
	ProblemLeak = "leak"
	// ProblemSnapshot is a bad snapshot table or snapshot table entry.
	ProblemSnapshot = "snapshot"
	// ProblemBitmap is a bad bitmap directory or bitmap table.
	ProblemBitmap = "bitmap"
	// ProblemLimit is a part of the check skipped to bound time or memory.
	ProblemLimit = "limit"
)

// Problem is one finding of Check.
type Problem struct {
	// Kind classifies the problem: one of the Problem* constants.
	Kind string
	// HostOffset is the byte offset in the image file of the faulty entry
	// or cluster, or -1.
	HostOffset int64
	// GuestOffset is the guest offset the entry maps, or -1 if none.
	GuestOffset int64
	// Message says what is wrong, in words.
	Message string
}

func (p Problem) String() string { return p.Message }

// CheckReport is the result of Check, with the counts `qemu-img check`
// reports.
type CheckReport struct {
	// Errors are corruptions: metadata that is malformed or refcounts lower
	// than the references to a cluster.
	Errors []Problem
	// Leaks are clusters with a refcount higher than the references to them
	// (one Problem per cluster): wasted space, harmless for reads.
	Leaks []Problem
	// Warnings are oddities that are not corruptions, and parts of the check
	// that were skipped.
	Warnings []Problem
	// CheckedClusters is the number of guest clusters of the virtual disk
	// ("total-clusters").
	CheckedClusters int64
	// AllocatedClusters counts the guest clusters with a host cluster or
	// compressed data in the active L1 table.
	AllocatedClusters int64
	// FragmentedClusters counts the allocated clusters not stored right
	// after the previous one (compressed clusters always count).
	FragmentedClusters int64
	// CompressedClusters counts the compressed clusters in the active L1
	// table.
	CompressedClusters int64
	// ImageEndOffset is the end of the last cluster that is in use or has a
	// non-zero refcount.
	ImageEndOffset int64
}

// Corrupt reports whether the check found errors.
func (r *CheckReport) Corrupt() bool { return len(r.Errors) > 0 }

// Clean reports whether the check found neither errors nor leaks.
func (r *CheckReport) Clean() bool { return len(r.Errors) == 0 && len(r.Leaks) == 0 }

// Bounds of a check.
var (
	// maxCheckClusters is the largest number of host clusters whose
	// refcounts Check compares (two bytes of memory each).
	maxCheckClusters int64 = 64 << 20
	// maxCheckProblems bounds each list of a CheckReport.
	maxCheckProblems = 100000
)

const (
	checkMaxRefTable    = 8 << 20  // QEMU's QCOW_MAX_REFTABLE_SIZE
	checkReadSpan       = 8 << 20  // largest coalesced metadata read
	checkReadGap        = 64 << 10 // bytes read over between two tables to save a request
	checkMaxBitmapTable = 64 << 20 // bitmap table bytes Check reads
	checkReftReserved   = 0x1ff
	checkBMEReserved    = 0xff000000000001fe // bitmap table entry: bits 1-8, 56-63
	checkBMEOffset      = 0x00fffffffffffe00
)

// checkRefs holds one reference count per host cluster: a byte each, with
// larger counts in a map.
type checkRefs struct {
	c   []uint8
	big map[int64]uint64
}

func newCheckRefs(n int64) checkRefs { return checkRefs{c: make([]uint8, n), big: map[int64]uint64{}} }

func (r *checkRefs) get(k int64) uint64 {
	if v := r.c[k]; v != 0xff {
		return uint64(v)
	}
	return r.big[k]
}

func (r *checkRefs) set(k int64, v uint64) {
	if v >= 0xff {
		r.c[k] = 0xff
		r.big[k] = v
		return
	}
	if r.c[k] == 0xff {
		delete(r.big, k)
	}
	r.c[k] = uint8(v)
}

func (r *checkRefs) inc(k int64) {
	if v := r.get(k); v != ^uint64(0) {
		r.set(k, v+1)
	}
}

// imageChecker is the state of one Check.
type imageChecker struct {
	im        *Image
	h         *header
	cb        int
	cs        int64
	objSize   int64
	nClusters int64 // host clusters of the image object (the last may be partial)
	rep       *CheckReport
	omitted   [3]int64 // problems not listed: errors, leaks, warnings

	track    bool      // refcounts are compared
	expected checkRefs // references found
	stored   checkRefs // refcounts in the image
}

func (c *imageChecker) add(list *[]Problem, n int, p Problem) {
	if len(*list) >= maxCheckProblems {
		c.omitted[n]++
		return
	}
	*list = append(*list, p)
}

func (c *imageChecker) errorf(kind string, host, guest int64, format string, args ...any) {
	c.add(&c.rep.Errors, 0, Problem{Kind: kind, HostOffset: host, GuestOffset: guest, Message: fmt.Sprintf(format, args...)})
}

func (c *imageChecker) warnf(kind string, host, guest int64, format string, args ...any) {
	c.add(&c.rep.Warnings, 2, Problem{Kind: kind, HostOffset: host, GuestOffset: guest, Message: fmt.Sprintf(format, args...)})
}

// ref counts one reference to every host cluster of [off, off+length). A
// range past the end of the image is an error of the given kind, and its
// clusters there are not counted.
func (c *imageChecker) ref(kind string, off, length, guest int64, what string) {
	if length <= 0 {
		return
	}
	if off < 0 || off >= c.nClusters*c.cs || length > c.nClusters*c.cs-off {
		c.errorf(kind, off, guest, "%s at %#x (%d bytes) extends past the end of the image (%d bytes)", what, off, length, c.objSize)
	}
	if !c.track || off < 0 {
		return
	}
	first, last := off>>c.cb, (off+length-1)>>c.cb
	for k := first; k <= last && k < c.nClusters; k++ {
		c.expected.inc(k)
	}
}

// storedRef returns the stored refcount of the cluster at host offset off,
// and false when refcounts are not tracked or off is outside the image.
func (c *imageChecker) storedRef(off int64) (uint64, bool) {
	if !c.track || off < 0 || off>>c.cb >= c.nClusters {
		return 0, false
	}
	return c.stored.get(off >> c.cb), true
}

// checkMessage is the message of a decoding error, without the ErrCorrupt
// prefix.
func checkMessage(err error) string {
	return strings.TrimPrefix(err.Error(), ErrCorrupt.Error()+": ")
}

// Check verifies every metadata structure of the image (not its backing
// chain) and its refcounts, like `qemu-img check`: the header, the active
// and snapshot L1 tables, every L2 entry, the refcount table and blocks,
// the snapshot table and the bitmap directory and tables. It lists every
// problem found, up to 100000 per list. It fails only when the store
// cannot be read; a malformed image gives a report with Errors. For images
// of more than 64Mi host clusters the refcount comparison is skipped, with
// a Warning.
func (im *Image) Check(ctx context.Context) (*CheckReport, error) {
	if im.closed.Load() {
		return nil, &Error{URL: im.url, Offset: -1, Err: os.ErrClosed}
	}
	h := im.hdr
	c := &imageChecker{
		im:      im,
		h:       h,
		cb:      h.clusterBits,
		cs:      h.clusterSize(),
		objSize: im.obj.Size,
		rep:     &CheckReport{},
	}
	c.nClusters = ceilDiv(c.objSize, c.cs)
	c.rep.CheckedClusters = ceilDiv(h.size, c.cs)
	if err := c.run(ctx); err != nil {
		var e *Error
		if errors.As(err, &e) {
			return nil, err
		}
		return nil, &Error{URL: im.url, Offset: -1, Err: err}
	}
	if n := c.omitted; n[0]+n[1]+n[2] > 0 {
		c.rep.Warnings = append(c.rep.Warnings, Problem{Kind: ProblemLimit, HostOffset: -1, GuestOffset: -1,
			Message: fmt.Sprintf("%d more errors, %d more leaks and %d more warnings not listed", n[0], n[1], n[2])})
	}
	return c.rep, nil
}

func (c *imageChecker) run(ctx context.Context) error {
	h := c.h
	if h.incompatible&incDirty != 0 {
		c.warnf(ProblemHeader, 72, -1, "the image is marked dirty: its refcounts may be out of date")
	}
	if h.incompatible&incCorrupt != 0 {
		c.warnf(ProblemHeader, 72, -1, "the image is marked corrupt")
	}
	if c.nClusters <= maxCheckClusters {
		c.track = true
		c.expected = newCheckRefs(c.nClusters)
		c.stored = newCheckRefs(c.nClusters)
	} else {
		c.warnf(ProblemLimit, -1, -1, "refcounts and copied flags not compared: the image has %d host clusters, more than the %d this check holds in memory",
			c.nClusters, maxCheckClusters)
	}

	// The header cluster.
	c.ref(ProblemHeader, 0, c.cs, -1, "header")

	if err := c.checkRefcountTable(ctx); err != nil {
		return err
	}

	// The active L1 table (already in memory) and its L2 tables.
	if h.l1Size > 0 {
		c.ref(ProblemL1, h.l1TableOffset, h.l1Size*8, -1, "active L1 table")
	}
	if err := c.walkL1(ctx, c.im.l1, h.l1TableOffset, true, "active L1 table"); err != nil {
		return err
	}
	if err := c.checkSnapshots(ctx); err != nil {
		return err
	}
	if err := c.checkBitmaps(ctx); err != nil {
		return err
	}
	c.compare()
	return nil
}

// readMeta reads len(p) bytes of the image object at off.
func (c *imageChecker) readMeta(ctx context.Context, p []byte, off int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return c.im.readFull(ctx, c.im.key, p, off)
}

// checkSpan is a cluster-sized table to fetch: its host offset and an index
// meaningful to the caller.
type checkSpan struct {
	off int64
	idx int64
}

// readTables reads the cluster-sized tables at the given offsets, each
// inside the image, coalescing nearby ones into one read, and calls fn with
// each. spans is sorted in place.
func (c *imageChecker) readTables(ctx context.Context, spans []checkSpan, fn func(s checkSpan, table []byte)) error {
	sort.Slice(spans, func(i, j int) bool {
		if spans[i].off != spans[j].off {
			return spans[i].off < spans[j].off
		}
		return spans[i].idx < spans[j].idx
	})
	for i := 0; i < len(spans); {
		start := spans[i].off
		end := start + c.cs
		j := i + 1
		for j < len(spans) && spans[j].off <= end+checkReadGap && spans[j].off+c.cs-start <= checkReadSpan {
			end = max(end, spans[j].off+c.cs)
			j++
		}
		buf := make([]byte, end-start)
		if err := c.readMeta(ctx, buf, start); err != nil {
			return err
		}
		for _, s := range spans[i:j] {
			fn(s, buf[s.off-start:s.off-start+c.cs])
		}
		i = j
	}
	return nil
}

// checkRefcountTable validates the refcount table, counts the references to
// it and to the refcount blocks, and loads the stored refcounts.
func (c *imageChecker) checkRefcountTable(ctx context.Context) error {
	h := c.h
	cs := c.cs
	perBlock := cs * 8 >> h.refcountOrder
	tableBytes := h.refcountClusters * cs
	c.ref(ProblemRefcountTable, h.refcountOffset, tableBytes, -1, "refcount table")
	// Entries that describe clusters of the image; any other non-zero entry
	// only references a block.
	needed := ceilDiv(c.nClusters, perBlock)
	readBytes := tableBytes
	if tableBytes > checkMaxRefTable {
		c.errorf(ProblemRefcountTable, h.refcountOffset, -1, "refcount table of %d bytes exceeds QEMU's limit of %d bytes", tableBytes, checkMaxRefTable)
		readBytes = min(tableBytes, max(needed*8, checkMaxRefTable))
		c.warnf(ProblemLimit, h.refcountOffset+readBytes, -1, "refcount table entries past byte %d not checked", readBytes)
	}
	if needed*8 > tableBytes {
		// Not an error in itself: clusters past the table have refcount 0,
		// which the comparison reports when they are used.
		c.warnf(ProblemRefcountTable, h.refcountOffset, -1, "refcount table (%d entries) does not cover the %d clusters of the image", tableBytes/8, c.nClusters)
	}

	var blocks []checkSpan
	const chunk = 1 << 20
	buf := make([]byte, min(readBytes, chunk))
	for pos := int64(0); pos < readBytes; pos += chunk {
		b := buf[:min(chunk, readBytes-pos)]
		if err := c.readMeta(ctx, b, h.refcountOffset+pos); err != nil {
			return err
		}
		for j := int64(0); j < int64(len(b)); j += 8 {
			i := (pos + j) / 8
			at := h.refcountOffset + pos + j
			raw := binary.BigEndian.Uint64(b[j:])
			if raw&checkReftReserved != 0 {
				c.errorf(ProblemRefcountTable, at, -1, "refcount table entry %d (%#016x) has reserved bits set", i, raw)
			}
			off := int64(raw &^ checkReftReserved)
			if off == 0 {
				continue
			}
			if off < 0 || off&(cs-1) != 0 {
				c.errorf(ProblemRefcountTable, at, -1, "refcount block %d at %#x is not cluster aligned", i, off)
				continue
			}
			if off >= c.nClusters*cs || off+cs > c.objSize {
				c.errorf(ProblemRefcountTable, at, -1, "refcount block %d at %#x is outside the image (%d bytes)", i, off, c.objSize)
				continue
			}
			c.ref(ProblemRefcountTable, off, cs, -1, "refcount block")
			if c.track && i < needed {
				blocks = append(blocks, checkSpan{off: off, idx: i})
			}
		}
	}
	if !c.track {
		return nil
	}
	order := uint(h.refcountOrder)
	return c.readTables(ctx, blocks, func(s checkSpan, block []byte) {
		first := s.idx * perBlock
		n := min(perBlock, c.nClusters-first)
		for k := int64(0); k < n; k++ {
			if v := getRefcount(block, order, k); v != 0 {
				c.stored.set(first+k, v)
			}
		}
	})
}

// walkL1 checks an L1 table (raw big-endian bytes at host offset l1Off)
// and every L2 table it points to. Only the active table counts allocation
// statistics and has meaningful "copied" flags.
func (c *imageChecker) walkL1(ctx context.Context, l1 []byte, l1Off int64, active bool, what string) error {
	h := c.h
	cs := c.cs
	span64 := int64(1) << (c.cb + h.l2Bits())
	var tables []checkSpan
	for i := int64(0); i < int64(len(l1))/8; i++ {
		raw := binary.BigEndian.Uint64(l1[i*8:])
		at := l1Off + i*8
		guest := i * span64
		if raw&l1Reserved != 0 {
			c.errorf(ProblemL1, at, guest, "%s entry %d (%#016x, guest offset %#x) has reserved bits set", what, i, raw, guest)
		}
		off := int64(raw & offsetMask)
		if off == 0 {
			continue
		}
		if off&(cs-1) != 0 {
			c.errorf(ProblemL1, at, guest, "%s entry %d (guest offset %#x): L2 table offset %#x is not cluster aligned", what, i, guest, off)
			c.ref(ProblemL1, off, 1, guest, "L2 table")
			continue
		}
		if off+cs > c.objSize {
			c.errorf(ProblemL1, at, guest, "%s entry %d (guest offset %#x): L2 table at %#x is past the end of the image (%d bytes)", what, i, guest, off, c.objSize)
			continue
		}
		c.ref(ProblemL1, off, cs, guest, "L2 table")
		if active {
			if ref, ok := c.storedRef(off); ok && (ref == 1) != (raw&flagCopied != 0) {
				c.errorf(ProblemCopied, at, guest, "%s entry %d (guest offset %#x): copied flag is %v but the L2 table at %#x has refcount %d",
					what, i, guest, raw&flagCopied != 0, off, ref)
			}
		}
		tables = append(tables, checkSpan{off: off, idx: i})
	}

	return c.readTables(ctx, tables, func(s checkSpan, t []byte) {
		c.walkL2(t, s.off, s.idx, active)
	})
}

// walkL2 checks the L2 table t at host offset l2Off, which L1 entry l1i
// points to. For the active table it counts allocated, compressed and
// fragmented clusters like `qemu-img check`: a standard cluster is
// fragmented when it does not follow the previous one of the same L2 table
// on the host; compressed clusters always are.
func (c *imageChecker) walkL2(t []byte, l2Off, l1i int64, active bool) {
	h := c.h
	cs := c.cs
	g := &c.im.geo
	es := h.l2EntrySize()
	n := cs / es
	base := l1i << (c.cb + h.l2Bits())
	var next int64 // host offset after the previous standard cluster, or 0
	allocated := func(host int64) {
		if !active {
			return
		}
		c.rep.AllocatedClusters++
		if next != 0 && host != next {
			c.rep.FragmentedClusters++
		}
		next = host + cs
	}
	for j := int64(0); j < n; j++ {
		raw := binary.BigEndian.Uint64(t[j*es:])
		var bm uint64
		if es == 16 {
			bm = binary.BigEndian.Uint64(t[j*es+8:])
		}
		if raw == 0 && bm == 0 {
			continue
		}
		at := l2Off + j*es
		guest := base + j*cs
		compressed := raw&flagCompressed != 0
		if compressed && raw&flagCopied != 0 {
			c.errorf(ProblemCopied, at, guest, "L2 entry for guest offset %#x (%#016x): copied flag set on a compressed cluster", guest, raw)
			raw &^= flagCopied
		}
		e, err := decodeL2Entry(raw, bm, g)
		if err != nil {
			c.errorf(ProblemL2, at, guest, "L2 entry for guest offset %#x: %s", guest, checkMessage(err))
			// Still count a plausible host cluster, so that one bad entry does
			// not also show up as a leak, and count it as allocated like
			// qemu-img does.
			if host := int64(raw & offsetMask); !compressed && host != 0 && host&(cs-1) == 0 {
				allocated(host)
				if !g.dataFile && host < c.objSize {
					c.ref(ProblemL2, host, cs, guest, "data cluster")
				}
			}
			continue
		}
		switch {
		case e.compressed:
			// Every host cluster the compressed bytes touch is referenced
			// once by this cluster; the last sector may end past the object.
			c.ref(ProblemL2, e.host, min(e.clen, c.objSize-e.host), guest, "compressed cluster")
			if active {
				c.rep.AllocatedClusters++
				c.rep.CompressedClusters++
				c.rep.FragmentedClusters++
			}
		case e.hasHost:
			allocated(e.host)
			if g.dataFile {
				if active && raw&flagCopied == 0 {
					c.errorf(ProblemCopied, at, guest, "L2 entry for guest offset %#x (%#016x): copied flag clear in an image with an external data file", guest, raw)
				}
				break
			}
			if e.host >= c.objSize {
				// decodeL2Entry lets unallocated (zero) clusters keep any host
				// offset; a reference must still be inside the image.
				c.errorf(ProblemL2, at, guest, "L2 entry for guest offset %#x: host offset %#x is past the end of the image (%d bytes)", guest, e.host, c.objSize)
				break
			}
			c.ref(ProblemL2, e.host, cs, guest, "data cluster")
			if active {
				if ref, ok := c.storedRef(e.host); ok && (ref == 1) != (raw&flagCopied != 0) {
					c.errorf(ProblemCopied, at, guest, "L2 entry for guest offset %#x: copied flag is %v but the cluster at %#x has refcount %d",
						guest, raw&flagCopied != 0, e.host, ref)
				}
			}
		}
	}
}

// checkSnapshots parses the snapshot table, counts the references to it and
// to each snapshot's L1 table, and walks those tables.
func (c *imageChecker) checkSnapshots(ctx context.Context) error {
	h := c.h
	if h.nbSnapshots == 0 {
		return nil
	}
	if c.im.geo.dataFile {
		c.errorf(ProblemSnapshot, h.snapshotsOffset, -1, "%d internal snapshots in an image with an external data file", h.nbSnapshots)
	}
	be := binary.BigEndian
	r := &metaReader{im: c.im, off: h.snapshotsOffset, limit: min(c.objSize, h.snapshotsOffset+maxSnapshotTable)}
	type snap struct {
		name    string
		at      int64
		l1Off   int64
		l1Size  int64
		entries int
	}
	var snaps []snap
	bad := func(i int, at int64, err error) error {
		if !errors.Is(err, ErrCorrupt) {
			return err
		}
		c.errorf(ProblemSnapshot, at, -1, "snapshot table entry %d: %s", i, checkMessage(err))
		return nil
	}
	parsed := true
	for i := 0; i < h.nbSnapshots; i++ {
		start := r.off
		e, err := r.next(ctx, 40)
		if err != nil {
			parsed = false
			if err := bad(i, start, err); err != nil {
				return err
			}
			break
		}
		s := snap{at: start, l1Off: int64(be.Uint64(e)), l1Size: int64(be.Uint32(e[8:]))}
		idLen, nameLen := int64(be.Uint16(e[12:])), int64(be.Uint16(e[14:]))
		extraLen := int64(be.Uint32(e[36:]))
		if extraLen > maxSnapshotExtra {
			c.errorf(ProblemSnapshot, start, -1, "snapshot table entry %d: extra data of %d bytes exceeds %d", i, extraLen, maxSnapshotExtra)
		} else if h.version >= 3 && extraLen < 16 {
			c.errorf(ProblemSnapshot, start, -1, "snapshot table entry %d: extra data of %d bytes lacks the version 3 fields", i, extraLen)
		}
		rest := extraLen + idLen + nameLen
		rest += (8 - (40+rest)%8) % 8
		body, err := r.next(ctx, rest)
		if err != nil {
			parsed = false
			if err := bad(i, start, err); err != nil {
				return err
			}
			break
		}
		if extraLen+idLen+nameLen <= int64(len(body)) {
			s.name = string(body[extraLen+idLen : extraLen+idLen+nameLen])
		}
		snaps = append(snaps, s)
	}
	if parsed {
		c.ref(ProblemSnapshot, h.snapshotsOffset, r.off-h.snapshotsOffset, -1, "snapshot table")
	} else {
		// Count what could be parsed, so that only the error is reported.
		c.ref(ProblemSnapshot, h.snapshotsOffset, max(r.off-h.snapshotsOffset, 1), -1, "snapshot table")
	}

	for i, s := range snaps {
		what := fmt.Sprintf("L1 table of snapshot %d (%q)", i, s.name)
		if s.l1Size*8 > maxL1Bytes {
			c.errorf(ProblemSnapshot, s.at, -1, "%s: %d entries exceed the 32 MiB limit", what, s.l1Size)
			continue
		}
		if s.l1Size == 0 {
			continue
		}
		if s.l1Off <= 0 || s.l1Off&(c.cs-1) != 0 {
			c.errorf(ProblemSnapshot, s.at, -1, "%s: offset %#x is not cluster aligned", what, s.l1Off)
			continue
		}
		if s.l1Off > c.objSize || s.l1Size*8 > c.objSize-s.l1Off {
			c.errorf(ProblemSnapshot, s.at, -1, "%s (%d entries at %#x) extends past the end of the image (%d bytes)", what, s.l1Size, s.l1Off, c.objSize)
			continue
		}
		c.ref(ProblemSnapshot, s.l1Off, s.l1Size*8, -1, what)
		l1 := make([]byte, s.l1Size*8)
		if err := c.readMeta(ctx, l1, s.l1Off); err != nil {
			return err
		}
		if err := c.walkL1(ctx, l1, s.l1Off, false, what); err != nil {
			return err
		}
	}
	return nil
}

// checkBitmaps checks the bitmap directory and bitmap tables of persistent
// dirty bitmaps and counts the references to them and to bitmap data.
func (c *imageChecker) checkBitmaps(ctx context.Context) error {
	h := c.h
	if !h.hasBitmaps {
		return nil
	}
	be := binary.BigEndian
	cs := c.cs
	c.ref(ProblemBitmap, h.bitmapDirOffset, h.bitmapDirSize, -1, "bitmap directory")
	dir := make([]byte, h.bitmapDirSize) // bounded and inside the object (parseHeader)
	if err := c.readMeta(ctx, dir, h.bitmapDirOffset); err != nil {
		return err
	}
	off := int64(0)
	for i := 0; i < h.nbBitmaps; i++ {
		at := h.bitmapDirOffset + off
		if int64(len(dir))-off < 24 {
			c.errorf(ProblemBitmap, at, -1, "bitmap directory truncated at entry %d", i)
			return nil
		}
		e := dir[off:]
		tOff := int64(be.Uint64(e))
		tSize := int64(be.Uint32(e[8:]))
		nameLen := int64(be.Uint16(e[18:]))
		extraLen := int64(be.Uint32(e[20:]))
		entLen := (24 + extraLen + nameLen + 7) &^ 7
		if entLen > int64(len(dir))-off {
			c.errorf(ProblemBitmap, at, -1, "bitmap directory entry %d overflows the directory", i)
			return nil
		}
		name := string(e[24+extraLen : 24+extraLen+nameLen])
		off += entLen
		what := fmt.Sprintf("bitmap %d (%q)", i, name)
		if tSize == 0 {
			continue
		}
		if tOff <= 0 || tOff&(cs-1) != 0 {
			c.errorf(ProblemBitmap, at, -1, "%s: table offset %#x is not cluster aligned", what, tOff)
			continue
		}
		if tOff > c.objSize || tSize*8 > c.objSize-tOff {
			c.errorf(ProblemBitmap, at, -1, "%s: table (%d entries at %#x) extends past the end of the image (%d bytes)", what, tSize, tOff, c.objSize)
			continue
		}
		c.ref(ProblemBitmap, tOff, tSize*8, -1, what+" table")
		if tSize*8 > checkMaxBitmapTable {
			c.warnf(ProblemLimit, tOff, -1, "%s: table of %d entries not read", what, tSize)
			continue
		}
		t := make([]byte, tSize*8)
		if err := c.readMeta(ctx, t, tOff); err != nil {
			return err
		}
		for j := int64(0); j < tSize; j++ {
			raw := be.Uint64(t[j*8:])
			eat := tOff + j*8
			if raw&checkBMEReserved != 0 {
				c.errorf(ProblemBitmap, eat, -1, "%s: table entry %d (%#016x) has reserved bits set", what, j, raw)
			}
			doff := int64(raw & checkBMEOffset)
			if doff == 0 {
				continue
			}
			if raw&1 != 0 {
				c.errorf(ProblemBitmap, eat, -1, "%s: table entry %d (%#016x) has bit 0 set with a data offset", what, j, raw)
			}
			if doff&(cs-1) != 0 {
				c.errorf(ProblemBitmap, eat, -1, "%s: table entry %d: data offset %#x is not cluster aligned", what, j, doff)
				continue
			}
			c.ref(ProblemBitmap, doff, cs, -1, what+" data cluster")
		}
	}
	return nil
}

// compare reports the clusters whose stored refcount differs from the
// references found, and sets ImageEndOffset.
func (c *imageChecker) compare() {
	if !c.track {
		c.rep.ImageEndOffset = c.nClusters * c.cs
		return
	}
	maxRef := uint64(1)<<(1<<c.h.refcountOrder) - 1
	if c.h.refcountOrder >= 6 {
		maxRef = ^uint64(0)
	}
	highest := int64(-1)
	for k := int64(0); k < c.nClusters; k++ {
		s, e := c.stored.get(k), c.expected.get(k)
		if s == 0 && e == 0 {
			continue
		}
		highest = k
		off := k << c.cb
		switch {
		case e > maxRef:
			c.errorf(ProblemRefcount, off, -1, "cluster %d (offset %#x) has %d references, more than %d-bit refcounts can hold", k, off, e, 1<<c.h.refcountOrder)
		case s < e:
			c.errorf(ProblemRefcount, off, -1, "cluster %d (offset %#x) has refcount %d but %d references", k, off, s, e)
		case s > e:
			c.add(&c.rep.Leaks, 1, Problem{Kind: ProblemLeak, HostOffset: off, GuestOffset: -1,
				Message: fmt.Sprintf("cluster %d (offset %#x) is leaked: refcount %d, %d references", k, off, s, e)})
		}
	}
	c.rep.ImageEndOffset = (highest + 1) * c.cs
}
