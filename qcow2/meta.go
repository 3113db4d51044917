package qcow2

// Info: header facts, the snapshot table, the bitmap directory and the
// allocation walk over the L1/L2 tables.

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

const (
	maxSnapshotExtra = 1024     // QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
	maxSnapshotTable = 64 << 20 // bound on bytes read for the snapshot table
)

// Info describes the image and its chain. It walks every L2 table of this
// layer (and of the qcow2 layers below) to sum AllocatedBytes.
func (im *Image) Info(ctx context.Context) (*Info, error) {
	return im.info(ctx)
}

func (im *Image) info(ctx context.Context) (*Info, error) {
	h := im.hdr
	in := &Info{
		URL:          im.url,
		Format:       "qcow2",
		Version:      h.version,
		ObjectSize:   im.obj.Size,
		ETag:         im.obj.ETag,
		LastModified: im.obj.LastModified,
		Servable:     im.refused == "",
		Reason:       im.refused,
		BackingFile:  h.backingFile,
	}
	switch h.version {
	case 2:
		in.Compat = "0.10"
	case 3:
		in.Compat = "1.1"
	}
	if h.clusterBits > 0 {
		in.ClusterSize = h.clusterSize()
	}
	in.VirtualSize = h.size
	in.RefcountBits = 1 << h.refcountOrder
	in.CompressionType = "zlib"
	if h.compressionType == compressionZstd {
		in.CompressionType = "zstd"
	}
	in.ExtendedL2 = h.extendedL2()
	in.LazyRefcounts = h.compatible&compatLazyRefcounts != 0
	in.Dirty = h.incompatible&incDirty != 0
	in.Corrupt = h.incompatible&incCorrupt != 0
	if h.hasDataFile() {
		in.DataFile = h.dataFile
		in.DataFileRaw = h.dataFileRaw()
	}
	in.BackingFormat = h.backingFormat
	in.Incompatible = h.features(0, h.incompatible)
	in.Compatible = h.features(1, h.compatible)
	in.Autoclear = h.features(2, h.autoclear)
	in.UnknownCompat = h.compatible &^ compatLazyRefcounts
	in.UnknownAutoclear = h.autoclear &^ (autoBitmaps | autoDataFileRaw)
	if im.selfRefused {
		return in, nil
	}
	if im.backingKey != "" {
		in.FullBackingFile = im.st.URL(im.backingKey)
	}
	var err error
	if in.Snapshots, err = im.readSnapshots(ctx); err != nil {
		return nil, &Error{URL: im.url, Offset: -1, Err: err}
	}
	if in.Bitmaps, err = im.readBitmaps(ctx); err != nil {
		return nil, &Error{URL: im.url, Offset: -1, Err: err}
	}
	if in.AllocatedBytes, err = im.allocatedBytes(ctx); err != nil {
		return nil, err
	}
	if im.backing != nil {
		if in.Backing, err = im.backing.info(ctx); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// allocatedBytes sums the guest bytes this layer stores (data and
// compressed clusters or subclusters). L2 tables not in the cache are read
// without being cached; entries that fail validation are not counted.
func (im *Image) allocatedBytes(ctx context.Context) (int64, error) {
	h := im.hdr
	cs := h.clusterSize()
	span := int64(1) << (h.clusterBits + h.l2Bits())
	sub := cs / int64(im.geo.nsub())
	var total atomic.Int64
	eg, ctx := errgroup.WithContext(ctx)
	eg.SetLimit(ioParallelism)
	for i := int64(0); i < h.l1Size && i*span < h.size; i++ {
		l2off, err := im.l2Offset(i)
		if err != nil || l2off == 0 {
			continue
		}
		eg.Go(func() error {
			t := im.l2.peek(l2off)
			if t == nil {
				var err error
				if t, err = im.readL2(ctx, l2off); err != nil {
					return &Error{URL: im.url, Offset: i * span, Err: err}
				}
			}
			es := h.l2EntrySize()
			var n int64
			for j := int64(0); j < span/cs; j++ {
				g := i*span + j*cs
				if g >= h.size {
					break
				}
				raw := binary.BigEndian.Uint64(t[j*es:])
				var bm uint64
				if es == 16 {
					bm = binary.BigEndian.Uint64(t[j*es+8:])
				}
				e, err := decodeL2Entry(raw, bm, &im.geo)
				if err != nil {
					continue
				}
				valid := min(cs, h.size-g)
				switch {
				case e.compressed:
					n += valid
				case im.geo.extendedL2:
					for a := e.alloc; a != 0; a &= a - 1 {
						k := int64(bits.TrailingZeros32(a))
						n += max(0, min(sub, valid-k*sub))
					}
				case e.alloc != 0:
					n += valid
				}
			}
			total.Add(n)
			return nil
		})
	}
	if err := eg.Wait(); err != nil {
		return 0, err
	}
	return total.Load(), nil
}

// metaReader reads a bounded metadata area of the image sequentially in
// chunks, never past the object or the limit.
type metaReader struct {
	im    *Image
	off   int64 // next byte to return
	limit int64 // end of the readable area
	buf   []byte
	bufAt int64
}

func (r *metaReader) next(ctx context.Context, n int64) ([]byte, error) {
	if n < 0 || r.off+n > r.limit {
		return nil, corrupt("metadata at %#x (%d bytes) extends past the end of the image", r.off, n)
	}
	if r.off < r.bufAt || r.off+n > r.bufAt+int64(len(r.buf)) {
		l := min(max(n, 64<<10), r.limit-r.off)
		r.buf = make([]byte, l)
		r.bufAt = r.off
		if err := r.im.readFull(ctx, r.im.key, r.buf, r.off); err != nil {
			return nil, err
		}
	}
	b := r.buf[r.off-r.bufAt : r.off-r.bufAt+n]
	r.off += n
	return b, nil
}

// readSnapshots parses the snapshot table (internal snapshots).
func (im *Image) readSnapshots(ctx context.Context) ([]Snapshot, error) {
	h := im.hdr
	if h.nbSnapshots == 0 {
		return nil, nil
	}
	be := binary.BigEndian
	r := &metaReader{im: im, off: h.snapshotsOffset, limit: min(im.obj.Size, h.snapshotsOffset+maxSnapshotTable)}
	out := make([]Snapshot, 0, h.nbSnapshots)
	for i := 0; i < h.nbSnapshots; i++ {
		start := r.off
		e, err := r.next(ctx, 40)
		if err != nil {
			return nil, fmt.Errorf("snapshot %d: %w", i, err)
		}
		idLen := int64(be.Uint16(e[12:]))
		nameLen := int64(be.Uint16(e[14:]))
		s := Snapshot{
			Date:        time.Unix(int64(be.Uint32(e[16:])), int64(be.Uint32(e[20:]))).UTC(),
			VMClockNS:   be.Uint64(e[24:]),
			VMStateSize: uint64(be.Uint32(e[32:])),
		}
		extraLen := int64(be.Uint32(e[36:]))
		if extraLen > maxSnapshotExtra {
			return nil, corrupt("snapshot %d: extra data too large (%d bytes)", i, extraLen)
		}
		extra, err := r.next(ctx, extraLen)
		if err != nil {
			return nil, fmt.Errorf("snapshot %d: %w", i, err)
		}
		if len(extra) >= 8 {
			s.VMStateSize = be.Uint64(extra)
		}
		if len(extra) >= 16 {
			s.DiskSize = be.Uint64(extra[8:])
		}
		id, err := r.next(ctx, idLen)
		if err != nil {
			return nil, fmt.Errorf("snapshot %d: %w", i, err)
		}
		s.ID = string(id)
		name, err := r.next(ctx, nameLen)
		if err != nil {
			return nil, fmt.Errorf("snapshot %d: %w", i, err)
		}
		s.Name = string(name)
		if pad := (8 - (r.off-start)%8) % 8; pad > 0 {
			if _, err := r.next(ctx, pad); err != nil {
				return nil, fmt.Errorf("snapshot %d: %w", i, err)
			}
		}
		out = append(out, s)
	}
	return out, nil
}

// readBitmaps parses the bitmap directory of persistent dirty bitmaps.
func (im *Image) readBitmaps(ctx context.Context) ([]Bitmap, error) {
	h := im.hdr
	if !h.hasBitmaps {
		return nil, nil
	}
	be := binary.BigEndian
	dir := make([]byte, h.bitmapDirSize) // bounded (64 MiB) and inside the object
	if err := im.readFull(ctx, im.key, dir, h.bitmapDirOffset); err != nil {
		return nil, err
	}
	var out []Bitmap
	off := 0
	for i := 0; i < h.nbBitmaps; i++ {
		if len(dir)-off < 24 {
			return nil, corrupt("bitmap directory truncated at entry %d", i)
		}
		e := dir[off:]
		flags := be.Uint32(e[12:])
		gran := int(e[17])
		nameLen := int(be.Uint16(e[18:]))
		extraLen := int64(be.Uint32(e[20:]))
		if extraLen > int64(len(dir)) || 24+extraLen+int64(nameLen) > int64(len(e)) {
			return nil, corrupt("bitmap directory entry %d overflows the directory", i)
		}
		if gran > 62 {
			return nil, corrupt("bitmap %d: granularity_bits %d", i, gran)
		}
		name := e[24+extraLen : 24+extraLen+int64(nameLen)]
		b := Bitmap{Name: string(name), Granularity: 1 << gran}
		if flags&1 != 0 {
			b.Flags = append(b.Flags, "in-use")
		}
		if flags&2 != 0 {
			b.Flags = append(b.Flags, "auto")
		}
		out = append(out, b)
		off += int((24 + extraLen + int64(nameLen) + 7) &^ 7)
	}
	return out, nil
}
