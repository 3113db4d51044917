package cache

// The local-volume tier: a target (sparse regular file or block device)
// plus a presence bitmap kept in a state file beside it.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/snapfs/snapfs/internal/zeros"
)

// VolumeVersion is the format version of the state file.
const VolumeVersion = 1

// Defaults of VolumeOptions.
const (
	// DefaultGranularity is the least presence granularity; a larger
	// cluster size is used instead.
	DefaultGranularity = 64 << 10
	// DefaultFlushBytes is how many newly present bytes make the bitmap
	// be flushed: after a crash at most this much (plus the fills under
	// way) is fetched again.
	DefaultFlushBytes = 32 << 20
	// DefaultFlushInterval is the longest newly set bits wait for a flush.
	DefaultFlushInterval = time.Second
)

// stateMagic starts every state file.
var stateMagic = [8]byte{'S', 'N', 'A', 'P', 'F', 'S', 'V', 'S'}

// ErrVolumeMismatch is wrapped by the error of OpenVolume when the state
// file was made for another source (URL, ETag, size or granularity).
var ErrVolumeMismatch = errors.New("volume state belongs to another source")

// VolumeSource says what a volume holds a copy of.
type VolumeSource struct {
	URL         string // the object, without signature
	ETag        string
	VirtualSize int64
	Granularity int64 // presence granularity: a power of two of at least 512
}

// VolumeState is the content of a state file, as `snapfs status` shows it.
type VolumeState struct {
	Version      int    `json:"version"`
	URL          string `json:"url"`
	ETag         string `json:"etag"`
	VirtualSize  int64  `json:"virtual_size"`
	Granularity  int64  `json:"granularity"`
	TargetSize   int64  `json:"target_size"`
	Complete     bool   `json:"complete"`
	Modified     bool   `json:"modified"`      // written by clients (no longer a copy of the image)
	PresentBytes int64  `json:"present_bytes"` // bytes of the target marked present
	Updated      string `json:"updated"`       // RFC 3339 time of the last flush
}

// VolumeOptions tune OpenVolume. The zero value is usable.
type VolumeOptions struct {
	// StatePath is the state file; "" means TARGET.snapfs-state.
	StatePath string
	// Size is the target size wanted; 0 means the virtual size. A size
	// below the virtual size is refused.
	Size int64
	// FlushBytes and FlushInterval bound the bits set but not yet flushed
	// (zero means the defaults).
	FlushBytes    int64
	FlushInterval time.Duration
}

// Volume is a local copy of a virtual disk being filled: a target and a
// bitmap of the granules already written there. Data is made durable
// (fdatasync) before the bits that cover it reach the state file, so a
// restart never trusts a granule that was not fully written.
//
// The state file is replaced whole (temp file, fsync, rename, fsync of the
// directory) rather than updated in place: a rename is atomic on every
// local filesystem, the file is small (one bit per granule: 2 MiB for
// 1 TiB at 64 KiB), and a CRC still catches a torn or damaged file.
//
// Volume does not order writes to the same granule; its caller (disk.Local)
// locks granules. Methods are safe for concurrent use.
type Volume struct {
	f         *os.File
	df        *os.File    // the target opened O_DIRECT for fills, or nil
	noDirect  atomic.Bool // df refused a write: fills are buffered from then on
	target    string
	statePath string
	src       VolumeSource
	size      int64 // target size
	nbits     int64
	blockDev  bool
	flushAt   int64
	interval  time.Duration

	mu       sync.Mutex
	present  []uint64
	count    int64 // bits set
	pending  int64 // bytes set since the last flush began
	complete bool
	modified bool
	closed   bool
	werr     error // the last flush error

	flushMu   sync.Mutex // one flush at a time
	lastFlush time.Time
	stop      chan struct{}
	done      chan struct{}
	kick      chan struct{} // asks the flusher to flush now
}

// StatePathFor returns the default state file of target.
func StatePathFor(target string) string { return target + ".snapfs-state" }

// OpenVolume opens or creates the volume at target for src. A new regular
// file is created sparse; an existing regular file without a state file is
// emptied (truncated to zero, then to the size) so that all of it is a
// hole; a block device is used as it is and must hold the size. An
// existing state file must match src, or the volume is refused.
func OpenVolume(target string, src VolumeSource, opts VolumeOptions) (*Volume, error) {
	g := src.Granularity
	if g < 512 || g&(g-1) != 0 {
		return nil, fmt.Errorf("volume %s: granularity %d is not a power of two of at least 512", target, g)
	}
	if src.VirtualSize <= 0 {
		return nil, fmt.Errorf("volume %s: virtual size %d", target, src.VirtualSize)
	}
	size := opts.Size
	if size == 0 {
		size = src.VirtualSize
	}
	if size < src.VirtualSize {
		return nil, fmt.Errorf("volume %s: size %d is smaller than the image's virtual size %d", target, size, src.VirtualSize)
	}
	statePath := opts.StatePath
	if statePath == "" {
		statePath = StatePathFor(target)
	}
	st, stErr := readState(statePath)
	if stErr != nil && !errors.Is(stErr, os.ErrNotExist) {
		return nil, stErr
	}
	haveState := stErr == nil
	if haveState {
		if err := st.matches(src, statePath); err != nil {
			return nil, err
		}
		if opts.Size == 0 {
			size = st.TargetSize
		} else if size != st.TargetSize {
			return nil, fmt.Errorf("volume %s: --size %d differs from the size %d it was created with (%s)", target, size, st.TargetSize, statePath)
		}
	}

	v := &Volume{
		target:    target,
		statePath: statePath,
		src:       src,
		size:      size,
		nbits:     (size + g - 1) / g,
		flushAt:   opts.FlushBytes,
		interval:  opts.FlushInterval,
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
		kick:      make(chan struct{}, 1),
		lastFlush: time.Now(),
	}
	if v.flushAt <= 0 {
		v.flushAt = DefaultFlushBytes
	}
	if v.interval <= 0 {
		v.interval = DefaultFlushInterval
	}
	reset := false // an existing file without state: emptied once locked
	fi, err := os.Stat(target)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if haveState {
			return nil, fmt.Errorf("volume %s: the target is missing but its state file %s exists; remove the state file to start over", target, statePath)
		}
		v.f, err = os.OpenFile(target, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", target, err)
		}
		if err := v.f.Truncate(size); err != nil {
			v.f.Close()
			os.Remove(target)
			return nil, fmt.Errorf("volume %s: size %d: %w", target, size, err)
		}
	case err != nil:
		return nil, fmt.Errorf("volume %s: %w", target, err)
	case fi.Mode()&os.ModeDevice != 0:
		v.blockDev = true
		if v.f, err = os.OpenFile(target, os.O_RDWR, 0); err != nil {
			return nil, fmt.Errorf("volume %s: %w", target, err)
		}
		end, err := v.f.Seek(0, io.SeekEnd)
		if err != nil {
			v.f.Close()
			return nil, fmt.Errorf("volume %s: size of the device: %w", target, err)
		}
		if end < size {
			v.f.Close()
			return nil, fmt.Errorf("volume %s: the device holds %d bytes, smaller than the %d needed", target, end, size)
		}
	case fi.Mode().IsRegular():
		if v.f, err = os.OpenFile(target, os.O_RDWR, 0); err != nil {
			return nil, fmt.Errorf("volume %s: %w", target, err)
		}
		if haveState {
			if fi.Size() < size {
				v.f.Close()
				return nil, fmt.Errorf("volume %s: the file holds %d bytes, smaller than the %d its state file %s says", target, fi.Size(), size, statePath)
			}
		} else {
			reset = true
		}
	default:
		return nil, fmt.Errorf("volume %s: not a regular file or a block device", target)
	}

	// One process at a time: two fillers would each trust bits the other
	// flushed for data it may not have synced.
	if err := unix.Flock(int(v.f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		v.f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("volume %s: in use by another process (import, serve or mount --volume)", target)
		}
		return nil, fmt.Errorf("volume %s: lock: %w", target, err)
	}
	if reset {
		if err := errors.Join(v.f.Truncate(0), v.f.Truncate(size)); err != nil {
			v.f.Close()
			return nil, fmt.Errorf("volume %s: size %d: %w", target, size, err)
		}
	}
	v.present = make([]uint64, (v.nbits+63)/64)
	if haveState {
		if int64(len(st.bitmap)) != (v.nbits+7)/8 {
			v.f.Close()
			return nil, fmt.Errorf("volume %s: state file %s: bitmap of %d bytes for %d granules", target, statePath, len(st.bitmap), v.nbits)
		}
		for i, b := range st.bitmap {
			v.present[i/8] |= uint64(b) << (8 * (i % 8))
		}
		v.clearTail()
		for _, w := range v.present {
			v.count += int64(bits.OnesCount64(w))
		}
		v.complete = st.Complete
		v.modified = st.Modified
	} else if err := v.Sync(); err != nil {
		// Write the state at once: a later open then knows the source.
		v.f.Close()
		return nil, err
	}
	// Fills of whole aligned blocks skip the page cache: a copy into it
	// costs more CPU than the fetch, and an import would flush the
	// machine's cache out for data nobody reads soon.
	//
	// A page that a buffered read cached before a direct write and that
	// is still locked when the kernel invalidates the range after it
	// would stay stale. The volume reads only present granules, which no
	// fill writes any more, so the one way in is readahead past them:
	// while fills run, the buffered descriptor reads no more than it is
	// asked (FADV_RANDOM), and once the volume is complete (no more
	// fills) it reads ahead again.
	if df, err := os.OpenFile(target, os.O_RDWR|unix.O_DIRECT, 0); err == nil && !v.complete {
		if unix.Fadvise(int(v.f.Fd()), 0, 0, unix.FADV_RANDOM) == nil {
			v.df = df
		} else {
			df.Close()
		}
	} else if err == nil {
		df.Close()
	}
	go v.flusher()
	return v, nil
}

// clearTail clears the bits past nbits.
func (v *Volume) clearTail() {
	if r := v.nbits % 64; r != 0 {
		v.present[len(v.present)-1] &= 1<<r - 1
	}
}

// flusher flushes newly set bits every interval, and when kicked.
func (v *Volume) flusher() {
	defer close(v.done)
	t := time.NewTicker(v.interval)
	defer t.Stop()
	for {
		select {
		case <-v.stop:
			return
		case <-v.kick:
			_ = v.Sync() // as below
		case <-t.C:
			v.mu.Lock()
			p := v.pending
			v.mu.Unlock()
			if p > 0 {
				_ = v.Sync() // a failure is kept in werr and returned by the next Sync
			}
		}
	}
}

// Source returns what the volume holds a copy of.
func (v *Volume) Source() VolumeSource { return v.src }

// Target returns the target path.
func (v *Volume) Target() string { return v.target }

// StatePath returns the state file path.
func (v *Volume) StatePath() string { return v.statePath }

// Size returns the target size in bytes (at least the virtual size).
func (v *Volume) Size() int64 { return v.size }

// VirtualSize returns the virtual size of the image the volume copies.
func (v *Volume) VirtualSize() int64 { return v.src.VirtualSize }

// Granularity returns the bytes one bit covers.
func (v *Volume) Granularity() int64 { return v.src.Granularity }

// Granules returns the number of bits.
func (v *Volume) Granules() int64 { return v.nbits }

// BlockDevice reports whether the target is a block device (holes are
// then written as zeros, not punched).
func (v *Volume) BlockDevice() bool { return v.blockDev }

// Present reports whether granule i is local.
func (v *Volume) Present(i int64) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.has(i)
}

func (v *Volume) has(i int64) bool { return v.present[i>>6]&(1<<(i&63)) != 0 }

// NextMissing returns the first granule at or after i that is not
// present, or Granules() when there is none.
func (v *Volume) NextMissing(i int64) int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	for ; i < v.nbits; i++ {
		w := ^v.present[i>>6] >> (i & 63)
		if w != 0 {
			return min(i+int64(bits.TrailingZeros64(w)), v.nbits)
		}
		i |= 63
	}
	return v.nbits
}

// NextPresent returns the first granule at or after i that is present, or
// Granules() when there is none.
func (v *Volume) NextPresent(i int64) int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	for ; i < v.nbits; i++ {
		w := v.present[i>>6] >> (i & 63)
		if w != 0 {
			return min(i+int64(bits.TrailingZeros64(w)), v.nbits)
		}
		i |= 63
	}
	return v.nbits
}

// MarkPresent sets the bits of granules [i, j), whose data the caller has
// written to the target (the bits reach the state file only after a
// fdatasync of the target). When more than the flush batch is pending it
// has the flusher flush, so that the caller goes on copying meanwhile;
// while twice that is pending it flushes itself and waits, which bounds
// what a crash can lose.
func (v *Volume) MarkPresent(i, j int64) error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return fmt.Errorf("volume %s: %w", v.target, os.ErrClosed)
	}
	for k := i; k < j; k++ {
		if !v.has(k) {
			v.present[k>>6] |= 1 << (k & 63)
			v.count++
			v.pending += v.src.Granularity
		}
	}
	p := v.pending
	v.mu.Unlock()
	switch {
	case p >= 2*v.flushAt:
		return v.Sync()
	case p >= v.flushAt:
		select {
		case v.kick <- struct{}{}:
		default: // already asked
		}
	}
	return nil
}

// MarkHoles sets the bits of granules [i, j), which the caller has made
// holes (Zero). Unlike MarkPresent it never flushes at once: losing these
// bits in a crash costs no fetch, so they go with the next flush (the
// flusher's, within the flush interval).
func (v *Volume) MarkHoles(i, j int64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return fmt.Errorf("volume %s: %w", v.target, os.ErrClosed)
	}
	set := false
	for k := i; k < j; k++ {
		if !v.has(k) {
			v.present[k>>6] |= 1 << (k & 63)
			v.count++
			set = true
		}
	}
	if set {
		v.pending++ // makes the flusher write them
	}
	return nil
}

// PresentBytes returns the bytes marked present.
func (v *Volume) PresentBytes() int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.presentBytesLocked()
}

func (v *Volume) presentBytesLocked() int64 {
	n := v.count * v.src.Granularity
	if last := v.nbits - 1; v.has(last) {
		n -= v.nbits*v.src.Granularity - v.size
	}
	return n
}

// AllPresent reports whether every granule is present.
func (v *Volume) AllPresent() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.count == v.nbits
}

// Complete reports whether the volume was recorded complete.
func (v *Volume) Complete() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.complete
}

// Modified reports whether clients wrote to the volume (recorded with the
// next flush), which makes it differ from the image.
func (v *Volume) Modified() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.modified
}

// SetModified records that clients wrote to the volume.
func (v *Volume) SetModified() {
	v.mu.Lock()
	if !v.modified {
		v.modified = true
		v.pending++ // makes the flusher write it
	}
	v.mu.Unlock()
}

// SetComplete records the volume complete (durably, with Sync). It fails
// unless every granule is present.
func (v *Volume) SetComplete() error {
	v.mu.Lock()
	if v.count != v.nbits {
		v.mu.Unlock()
		return fmt.Errorf("volume %s: %d of %d granules missing", v.target, v.nbits-v.count, v.nbits)
	}
	v.complete = true
	v.mu.Unlock()
	if v.df != nil {
		_ = unix.Fadvise(int(v.f.Fd()), 0, 0, unix.FADV_NORMAL) // readahead again: no fill races it now
	}
	return v.Sync()
}

// ReadAt reads the target.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	n, err := v.f.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("volume %s: read of %d bytes at %d: %w", v.target, len(p), off, err)
	}
	return n, nil
}

// WriteAt writes the target. Zeros are written as they are; see WriteData.
func (v *Volume) WriteAt(p []byte, off int64) error {
	if _, err := v.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("volume %s: write of %d bytes at %d: %w", v.target, len(p), off, err)
	}
	return nil
}

// zeroBlock is the granularity at which WriteData leaves zeros as holes.
const zeroBlock = 4096

// WriteData writes p at off, leaving aligned all-zero 4 KiB blocks as
// holes in a file target (punched, since the range may hold bytes of an
// earlier unfinished fill) so that the volume stays sparse.
func (v *Volume) WriteData(p []byte, off int64) error {
	if v.blockDev {
		return v.WriteAt(p, off)
	}
	for len(p) > 0 {
		n := min(len(p), zeroBlock-int(off%zeroBlock))
		zero := zeros.Is(p[:n]) && n == zeroBlock
		for n < len(p) {
			m := min(len(p)-n, zeroBlock)
			if (m == zeroBlock && zeros.Is(p[n:n+m])) != zero {
				break
			}
			n += m
		}
		var err error
		if zero {
			err = v.Zero(off, int64(n))
		} else {
			err = v.writeFill(p[:n], off)
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// directAlign is the alignment of memory, offset and length that an
// O_DIRECT write needs (4096 covers 512-byte and 4 KiB logical blocks).
const directAlign = 4096

// writeFill writes fill data: through the O_DIRECT descriptor when p and
// off are aligned (the hydration buffers are), else buffered. The bits
// still wait for Sync's fdatasync, which also flushes the device's cache.
func (v *Volume) writeFill(p []byte, off int64) error {
	if v.df == nil || v.noDirect.Load() || len(p) == 0 || len(p)%directAlign != 0 || off%directAlign != 0 ||
		uintptr(unsafe.Pointer(&p[0]))%directAlign != 0 {
		return v.WriteAt(p, off)
	}
	if _, err := v.df.WriteAt(p, off); err != nil {
		if errors.Is(err, unix.EINVAL) {
			v.noDirect.Store(true) // the filesystem wants another alignment, or none
			return v.WriteAt(p, off)
		}
		return fmt.Errorf("volume %s: write of %d bytes at %d: %w", v.target, len(p), off, err)
	}
	return nil
}

// zeroBuf is written where holes cannot be punched.
var zeroBuf = make([]byte, 1<<20)

// Zero makes [off, off+n) read as zeros: a punched hole in a file, zeros
// written on a block device.
func (v *Volume) Zero(off, n int64) error {
	if n <= 0 {
		return nil
	}
	if !v.blockDev {
		err := unix.Fallocate(int(v.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("volume %s: punch hole of %d bytes at %d: %w", v.target, n, off, err)
		}
	}
	for n > 0 {
		k := min(n, int64(len(zeroBuf)))
		if err := v.WriteAt(zeroBuf[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// SeekData returns the next data offset at or after off in a file target
// (SEEK_DATA), or the end when only a hole follows. A block device is all data.
func (v *Volume) SeekData(off int64) (int64, error) {
	if v.blockDev {
		return off, nil
	}
	n, err := unix.Seek(int(v.f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return v.size, nil
	}
	return n, err
}

// SeekHole returns the next hole offset at or after off (SEEK_HOLE).
func (v *Volume) SeekHole(off int64) (int64, error) {
	if v.blockDev {
		return v.size, nil
	}
	n, err := unix.Seek(int(v.f.Fd()), off, unix.SEEK_HOLE)
	if errors.Is(err, unix.ENXIO) {
		return v.size, nil
	}
	return n, err
}

// Sync makes the target's data durable, then writes the bitmap as it was
// before the fdatasync to the state file (temp file, fsync, rename, fsync
// of the directory).
func (v *Volume) Sync() error {
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return fmt.Errorf("volume %s: %w", v.target, os.ErrClosed)
	}
	st := VolumeState{
		Version:      VolumeVersion,
		URL:          v.src.URL,
		ETag:         v.src.ETag,
		VirtualSize:  v.src.VirtualSize,
		Granularity:  v.src.Granularity,
		TargetSize:   v.size,
		Complete:     v.complete,
		Modified:     v.modified,
		PresentBytes: v.presentBytesLocked(),
		Updated:      time.Now().UTC().Format(time.RFC3339),
	}
	bm := make([]byte, (v.nbits+7)/8)
	for i := range bm {
		bm[i] = byte(v.present[i/8] >> (8 * (i % 8)))
	}
	pending := v.pending
	v.pending = 0
	v.mu.Unlock()

	err := unix.Fdatasync(int(v.f.Fd()))
	if err != nil {
		err = fmt.Errorf("volume %s: fdatasync: %w", v.target, err)
	} else {
		err = writeState(v.statePath, &st, bm)
	}
	v.mu.Lock()
	if err != nil {
		v.pending += pending // still not durable
		v.werr = err
	} else {
		v.werr = nil
	}
	v.mu.Unlock()
	v.lastFlush = time.Now()
	return err
}

// Close flushes and closes the volume.
func (v *Volume) Close() error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return nil
	}
	v.mu.Unlock()
	close(v.stop)
	<-v.done
	err := v.Sync()
	v.mu.Lock()
	v.closed = true
	v.mu.Unlock()
	if v.df != nil {
		v.df.Close()
	}
	if cerr := v.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("volume %s: %w", v.target, cerr)
	}
	return err
}

// State file layout: magic (8 bytes), JSON length (uint32 LE), JSON
// (VolumeState), bitmap length (uint64 LE), bitmap (bit i of byte i/8
// is granule i), CRC-32C of everything before it (uint32 LE).
type stateFile struct {
	VolumeState
	bitmap []byte
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func writeState(path string, st *VolumeState, bm []byte) error {
	js, err := json.Marshal(st)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	b.Write(stateMagic[:])
	b.Write(binary.LittleEndian.AppendUint32(nil, uint32(len(js))))
	b.Write(js)
	b.Write(binary.LittleEndian.AppendUint64(nil, uint64(len(bm))))
	b.Write(bm)
	b.Write(binary.LittleEndian.AppendUint32(nil, crc32.Checksum(b.Bytes(), crcTable)))

	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("state file %s: %w", path, err)
	}
	fail := func(err error) error {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("state file %s: %w", path, err)
	}
	if _, err := tmp.Write(b.Bytes()); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("state file %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("state file %s: fsync of %s: %w", path, dir, err)
		}
	}
	return nil
}

// maxStateFile bounds what readState reads: the bitmap of a 1 PiB disk at
// 512-byte granules would be 256 GiB, so cap at what a real volume needs
// (64 MiB: 32 TiB at 64 KiB) plus the JSON.
const maxStateFile = 64<<20 + 1<<20

// ReadVolumeState reads the state file at path (for `snapfs status`).
func ReadVolumeState(path string) (*VolumeState, error) {
	st, err := readState(path)
	if err != nil {
		return nil, err
	}
	return &st.VolumeState, nil
}

func readState(path string) (*stateFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxStateFile+1))
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	bad := func(why string) error { return fmt.Errorf("state file %s: %s", path, why) }
	if len(data) > maxStateFile {
		return nil, bad("too large")
	}
	if len(data) < 8+4+8+4 || !bytes.Equal(data[:8], stateMagic[:]) {
		return nil, bad("not a snapfs state file")
	}
	body, sum := data[:len(data)-4], binary.LittleEndian.Uint32(data[len(data)-4:])
	if crc32.Checksum(body, crcTable) != sum {
		return nil, bad("checksum mismatch (damaged); remove it and the target to start over")
	}
	jl := int64(binary.LittleEndian.Uint32(body[8:12]))
	if 12+jl+8 > int64(len(body)) {
		return nil, bad("truncated")
	}
	st := &stateFile{}
	if err := json.Unmarshal(body[12:12+jl], &st.VolumeState); err != nil {
		return nil, bad("header: " + err.Error())
	}
	bl := binary.LittleEndian.Uint64(body[12+jl : 20+jl])
	if bl != uint64(int64(len(body))-20-jl) {
		return nil, bad("bitmap length mismatch")
	}
	st.bitmap = body[20+jl:]
	if st.Version != VolumeVersion {
		return nil, bad(fmt.Sprintf("format version %d, this snapfs reads %d", st.Version, VolumeVersion))
	}
	return st, nil
}

// matches checks that the state was made for src.
func (st *stateFile) matches(src VolumeSource, path string) error {
	var diff []string
	if st.URL != src.URL {
		diff = append(diff, fmt.Sprintf("URL %s, now %s", st.URL, src.URL))
	}
	if st.ETag != src.ETag {
		diff = append(diff, fmt.Sprintf("ETag %q, now %q (the object changed)", st.ETag, src.ETag))
	}
	if st.VirtualSize != src.VirtualSize {
		diff = append(diff, fmt.Sprintf("virtual size %d, now %d", st.VirtualSize, src.VirtualSize))
	}
	if st.Granularity != src.Granularity {
		diff = append(diff, fmt.Sprintf("granularity %d, now %d", st.Granularity, src.Granularity))
	}
	if len(diff) == 0 {
		return nil
	}
	msg := diff[0]
	for _, d := range diff[1:] {
		msg += "; " + d
	}
	return fmt.Errorf("%w: %s was made with %s; refusing to mix versions (remove it and the target to start over)", ErrVolumeMismatch, path, msg)
}
