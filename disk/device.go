// Package disk is the virtual raw device that fs and nbd serve: an opened
// image plus its cache tiers, safe for many concurrent readers.
package disk

import (
	"context"
	"errors"
)

// Device is a raw virtual disk. All methods are safe for concurrent use.
// Offsets and lengths are in bytes; callers keep them inside Size (the
// methods return ErrOutOfRange otherwise).
type Device interface {
	// Size is the virtual size in bytes.
	Size() int64
	// ReadAt fills p from offset off.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	// WriteAt writes p at off; ErrReadOnly on a read-only device.
	WriteAt(ctx context.Context, p []byte, off int64) (int, error)
	// Flush makes completed writes durable; a no-op when read-only.
	Flush(ctx context.Context) error
	// Trim discards [off, off+n); reads may then return anything the
	// device chooses, zeros on this project's devices. ErrReadOnly when read-only.
	Trim(ctx context.Context, off, n int64) error
	// WriteZeroes makes [off, off+n) read as zeros. ErrReadOnly when read-only.
	WriteZeroes(ctx context.Context, off, n int64) error
	// Extents describes [off, off+n) without reading data: consecutive,
	// covering the range exactly.
	Extents(ctx context.Context, off, n int64) ([]Extent, error)
	// Prefetch brings [off, off+n) into the cache ahead of reads.
	Prefetch(ctx context.Context, off, n int64) error
	// ReadOnly reports whether writes are refused.
	ReadOnly() bool
	// Close releases the device.
	Close() error
}

// Extent is a run of the device with the same allocation status, as NBD's
// base:allocation context and SEEK_DATA/SEEK_HOLE need it.
type Extent struct {
	Offset, Length int64
	Hole           bool // not allocated in the image (reads as zeros)
	Zero           bool // reads as zeros
}

// Errors of Device methods; wrap them so errors.Is works.
var (
	ErrReadOnly   = errors.New("device is read-only")
	ErrOutOfRange = errors.New("range outside the device")
)
