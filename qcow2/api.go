// Package qcow2 reads (and writes) QCOW2 images held in an object store, as
// specified by QEMU's docs/interop/qcow2.rst. Every header field is checked
// before use; metadata is fetched lazily into bounded caches.
package qcow2

import (
	"errors"
	"fmt"
	"time"
)

// Options tune Open. The zero value is usable.
type Options struct {
	// MaxChainDepth bounds the backing chain (the image itself is depth 0).
	// Zero means 16.
	MaxChainDepth int
	// L2CacheBytes bounds the L2 tables kept in memory per image layer.
	// Zero means 32 MiB.
	L2CacheBytes int64
}

// ExtentKind says what a guest range of an image holds.
type ExtentKind int

const (
	// Unallocated ranges are in no layer of the chain and read as zeros.
	Unallocated ExtentKind = iota
	// Zero ranges are marked zero in some layer (v3 zero flag or subcluster
	// zero bit) and read as zeros.
	Zero
	// Data ranges are stored uncompressed at HostOffset in the layer's data file.
	Data
	// Compressed ranges are stored as compressed clusters.
	Compressed
)

// String returns "unallocated", "zero", "data" or "compressed".
func (k ExtentKind) String() string {
	switch k {
	case Zero:
		return "zero"
	case Data:
		return "data"
	case Compressed:
		return "compressed"
	default:
		return "unallocated"
	}
}

// Extent is one run of guest bytes with the same mapping, as `qemu-img map`
// reports it.
type Extent struct {
	Start  int64      // guest offset
	Length int64      // bytes
	Kind   ExtentKind // what the range holds
	// Depth is the chain layer that answers for the range (0 = this image).
	// For Unallocated it is the number of backing files (the depth of the
	// last layer), or the depth of the layer whose backing file ends before
	// the range, as qemu-img map reports it.
	Depth int
	// HostOffset is where a Data range starts in File; -1 otherwise.
	HostOffset int64
	// File is the URL of the object holding the data (Data and Compressed).
	File string
}

// Feature is one named feature bit.
type Feature struct {
	Bit  int
	Name string
}

// Snapshot is one internal snapshot, as `qemu-img snapshot -l` lists it.
type Snapshot struct {
	ID          string
	Name        string
	VMStateSize uint64
	Date        time.Time
	VMClockNS   uint64
	DiskSize    uint64 // virtual size at the time of the snapshot (v3), or 0
}

// Bitmap is one persistent dirty bitmap.
type Bitmap struct {
	Name        string
	Granularity int64
	Flags       []string // "in-use", "auto"
}

// Info is what `qemu-img info` tells about an image, plus the object facts.
type Info struct {
	URL              string // the object, without signature
	Format           string // "qcow2"
	Version          int    // 2 or 3
	Compat           string // "0.10" or "1.1"
	VirtualSize      int64
	ClusterSize      int64
	RefcountBits     int
	CompressionType  string // "zlib" or "zstd"
	ExtendedL2       bool
	LazyRefcounts    bool
	Dirty            bool
	Corrupt          bool
	DataFile         string // external data file name as written in the header, or ""
	DataFileRaw      bool
	BackingFile      string // as written in the header, or ""
	BackingFormat    string // from the header extension, or ""
	FullBackingFile  string // resolved URL, or ""
	Backing          *Info  // the next layer's info, or nil
	Incompatible     []Feature
	Compatible       []Feature
	Autoclear        []Feature
	UnknownCompat    uint64 // compatible bits without a known meaning
	UnknownAutoclear uint64 // autoclear bits without a known meaning
	Snapshots        []Snapshot
	Bitmaps          []Bitmap
	ObjectSize       int64 // bytes stored in the object
	ETag             string
	LastModified     time.Time
	AllocatedBytes   int64 // guest bytes allocated in this layer (data, compressed)
	// Servable is false when Open refuses the image; Reason then says why
	// ("encrypted with LUKS", "unknown incompatible feature bit 7 (foo)", ...).
	Servable bool
	Reason   string
}

// Sentinel errors, wrapped in *Error.
var (
	// ErrNotQCOW2: the object does not start with the QCOW2 magic.
	ErrNotQCOW2 = errors.New("not a QCOW2 image")
	// ErrUnsupported: a valid image uses something snapfs refuses to serve
	// (encryption, unknown incompatible features, unsafe backing names...).
	ErrUnsupported = errors.New("cannot be served")
	// ErrCorrupt: the image's metadata is malformed.
	ErrCorrupt = errors.New("corrupt image")
)

// Refused reports whether err says that the object was read and refused
// (ErrNotQCOW2, ErrUnsupported or ErrCorrupt), as opposed to a failure to
// read it, which may heal.
func Refused(err error) bool {
	return errors.Is(err, ErrNotQCOW2) || errors.Is(err, ErrUnsupported) || errors.Is(err, ErrCorrupt)
}

// Error names the object, and the guest offset when a read failed there.
type Error struct {
	URL    string // the object, without signature
	Offset int64  // guest offset of the failed read, or -1
	Err    error  // wraps ErrNotQCOW2, ErrUnsupported, ErrCorrupt or a store error
}

func (e *Error) Error() string {
	if e.Offset >= 0 {
		return fmt.Sprintf("%s: guest offset %d: %v", e.URL, e.Offset, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.URL, e.Err)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// The Image API, implemented in reader.go:
//
//	func Inspect(ctx context.Context, st objstore.Store, key string) (*Info, error)
//	    // parses and checks the header like Open, but describes an image that
//	    // Open would refuse (Servable false, Reason set) instead of failing;
//	    // it fails only when the header itself cannot be read or is malformed.
//	func Open(ctx context.Context, st objstore.Store, key string, opts *Options) (*Image, error)
//	func (im *Image) Size() int64                      // virtual size
//	func (im *Image) ClusterSize() int64
//	func (im *Image) URL() string
//	func (im *Image) Info(ctx context.Context) (*Info, error) // walks L1/L2 for AllocatedBytes
//	func (im *Image) ReadAt(p []byte, off int64) (int, error) // io.ReaderAt
//	func (im *Image) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
//	func (im *Image) Map(ctx context.Context, off, length int64) ([]Extent, error)
//	func (im *Image) Close() error
//
// and in check.go:
//
//	func (im *Image) Check(ctx context.Context) (*CheckReport, error)
