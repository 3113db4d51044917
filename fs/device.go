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

// DiskDevice returns the DeviceOpener that serves images through the lazy
// disk layer (disk.New with opts: concurrent, cached in opts.Cache, which
// all images may share, fetches coalesced and read ahead). Options.OpenDevice
// nil means DiskDevice(disk.Options{}), without a memory cache.
func DiskDevice(opts disk.Options) DeviceOpener {
	return func(_ context.Context, im *qcow2.Image) (disk.Device, error) {
		d, err := disk.New(im, opts)
		if err != nil {
			return nil, err
		}
		return &diskDevice{Disk: d, im: im}, nil
	}
}

// diskDevice is a Disk that closes its image.
type diskDevice struct {
	*disk.Disk
	im *qcow2.Image
}

func (d *diskDevice) Close() error {
	err := d.Disk.Close()
	if cerr := d.im.Close(); err == nil {
		err = cerr
	}
	return err
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
