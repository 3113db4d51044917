package fs

import (
	"context"
	"fmt"
	"io"

	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// DeviceOpener turns an opened QCOW2 image into the device that serves its
// reads. The device owns im from then on: its Close closes the image.
type DeviceOpener func(ctx context.Context, im *qcow2.Image) (disk.Device, error)

// ImageDevice is the DeviceOpener used when Options.OpenDevice is nil: a
// read-only disk.Device straight over the image, without a cache of its
// own (the image keeps its metadata caches and the kernel the page cache).
func ImageDevice(_ context.Context, im *qcow2.Image) (disk.Device, error) {
	return &imageDevice{im: im}, nil
}

type imageDevice struct{ im *qcow2.Image }

func (d *imageDevice) Size() int64 { return d.im.Size() }

func (d *imageDevice) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > d.im.Size() {
		return 0, fmt.Errorf("read [%d, %d) of %d bytes: %w", off, off+int64(len(p)), d.im.Size(), disk.ErrOutOfRange)
	}
	n, err := d.im.ReadAtContext(ctx, p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

func (d *imageDevice) WriteAt(context.Context, []byte, int64) (int, error) {
	return 0, disk.ErrReadOnly
}
func (d *imageDevice) Flush(context.Context) error                     { return nil }
func (d *imageDevice) Trim(context.Context, int64, int64) error        { return disk.ErrReadOnly }
func (d *imageDevice) WriteZeroes(context.Context, int64, int64) error { return disk.ErrReadOnly }
func (d *imageDevice) Prefetch(context.Context, int64, int64) error    { return nil }
func (d *imageDevice) ReadOnly() bool                                  { return true }
func (d *imageDevice) Close() error                                    { return d.im.Close() }

func (d *imageDevice) Extents(ctx context.Context, off, n int64) ([]disk.Extent, error) {
	if off < 0 || n < 0 || off+n > d.im.Size() {
		return nil, fmt.Errorf("extents [%d, %d) of %d bytes: %w", off, off+n, d.im.Size(), disk.ErrOutOfRange)
	}
	if n == 0 {
		return nil, nil
	}
	m, err := d.im.Map(ctx, off, n)
	if err != nil {
		return nil, err
	}
	out := make([]disk.Extent, 0, len(m))
	for _, e := range m {
		x := disk.Extent{Offset: e.Start, Length: e.Length}
		switch e.Kind {
		case qcow2.Unallocated:
			x.Hole, x.Zero = true, true
		case qcow2.Zero:
			x.Zero = true
		}
		if k := len(out) - 1; k >= 0 && out[k].Hole == x.Hole && out[k].Zero == x.Zero && out[k].Offset+out[k].Length == x.Offset {
			out[k].Length += x.Length
			continue
		}
		out = append(out, x)
	}
	return out, nil
}

// rawDevice serves a non-QCOW2 object as it is (--raw-objects): reads go
// straight to the store, pinned to the ETag the object was listed with.
type rawDevice struct {
	st   objstore.Store
	key  string
	etag string
	size int64
}

func (d *rawDevice) Size() int64 { return d.size }

func (d *rawDevice) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("read [%d, %d) of %d bytes: %w", off, off+int64(len(p)), d.size, disk.ErrOutOfRange)
	}
	n, err := d.st.ReadAt(ctx, d.key, p, off, objstore.ReadOptions{IfMatch: d.etag})
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

func (d *rawDevice) Extents(_ context.Context, off, n int64) ([]disk.Extent, error) {
	if off < 0 || n < 0 || off+n > d.size {
		return nil, fmt.Errorf("extents [%d, %d) of %d bytes: %w", off, off+n, d.size, disk.ErrOutOfRange)
	}
	if n == 0 {
		return nil, nil
	}
	return []disk.Extent{{Offset: off, Length: n}}, nil
}

func (d *rawDevice) WriteAt(context.Context, []byte, int64) (int, error) { return 0, disk.ErrReadOnly }
func (d *rawDevice) Flush(context.Context) error                         { return nil }
func (d *rawDevice) Trim(context.Context, int64, int64) error            { return disk.ErrReadOnly }
func (d *rawDevice) WriteZeroes(context.Context, int64, int64) error     { return disk.ErrReadOnly }
func (d *rawDevice) Prefetch(context.Context, int64, int64) error        { return nil }
func (d *rawDevice) ReadOnly() bool                                      { return true }
func (d *rawDevice) Close() error                                        { return nil }
