package fs

import (
	"context"
	"errors"
	"strconv"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/snapfs/snapfs/disk"
)

// blockSize is the st_blksize of files: large reads suit the device.
const blockSize = 1 << 20

// dirNode is a directory: the root or a sub-prefix. It reads the current
// listing on every call, so a refresh shows at once.
type dirNode struct {
	gofs.Inode
	f    *FS
	path string
}

var (
	_ gofs.NodeLookuper  = (*dirNode)(nil)
	_ gofs.NodeReaddirer = (*dirNode)(nil)
	_ gofs.NodeGetattrer = (*dirNode)(nil)
	_ gofs.NodeStatfser  = (*dirNode)(nil)
)

func (n *dirNode) dir() *dirEnt { return n.f.current().dirs[n.path] }

// Lookup finds a child in the current listing.
func (n *dirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	s := n.f.current()
	if n.path == "" && name == ErrorsFile {
		n.f.errorsAttr(s, &out.Attr)
		out.SetAttrTimeout(errorsAttrTimeout)
		out.SetEntryTimeout(errorsAttrTimeout)
		return n.NewInode(ctx, &errorsNode{f: n.f}, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: errorsIno}), 0
	}
	d := s.dirs[n.path]
	if d == nil {
		return nil, syscall.ENOENT
	}
	c, ok := d.entries[name]
	switch {
	case !ok:
		return nil, syscall.ENOENT
	case c.dir != nil:
		n.f.dirAttr(c.dir, &out.Attr)
		return n.NewInode(ctx, &dirNode{f: n.f, path: c.dir.path}, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: c.dir.ino}), 0
	default:
		n.f.fileAttr(c.obj, &out.Attr)
		return n.NewInode(ctx, &fileNode{f: n.f, obj: c.obj}, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: c.obj.ino}), 0
	}
}

// Readdir lists the directory in the current listing.
func (n *dirNode) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	d := n.dir()
	var out []fuse.DirEntry
	if n.path == "" {
		out = append(out, fuse.DirEntry{Name: ErrorsFile, Mode: syscall.S_IFREG, Ino: errorsIno})
	}
	if d != nil {
		for _, name := range d.names {
			c := d.entries[name]
			if c.dir != nil {
				out = append(out, fuse.DirEntry{Name: name, Mode: syscall.S_IFDIR, Ino: c.dir.ino})
			} else {
				out = append(out, fuse.DirEntry{Name: name, Mode: syscall.S_IFREG, Ino: c.obj.ino})
			}
		}
	}
	return gofs.NewListDirStream(out), 0
}

// Getattr describes the directory: mode 0555, the newest Last-Modified
// below it as mtime.
func (n *dirNode) Getattr(ctx context.Context, fh gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d := n.dir()
	if d == nil {
		d = &dirEnt{path: n.path, ino: n.StableAttr().Ino, mtime: n.f.start}
	}
	n.f.dirAttr(d, &out.Attr)
	return 0
}

// Statfs reports the allocated bytes of all files as the used space.
func (n *dirNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	s := n.f.current()
	const bs = 4096
	*out = fuse.StatfsOut{}
	out.Bsize = bs
	out.Frsize = bs
	out.Blocks = uint64((s.total + bs - 1) / bs)
	out.Files = uint64(len(s.objects) + len(s.dirs) + 1)
	out.NameLen = 255
	return 0
}

func (f *FS) dirAttr(d *dirEnt, a *fuse.Attr) {
	a.Mode = syscall.S_IFDIR | DirMode
	a.Ino = d.ino
	a.Nlink = 2
	for _, c := range d.entries {
		if c.dir != nil {
			a.Nlink++
		}
	}
	a.Size = 4096
	a.Blocks = 8
	a.Blksize = 4096
	a.Owner = fuse.Owner{Uid: f.opts.UID, Gid: f.opts.GID}
	t := d.mtime
	a.SetTimes(&t, &t, &t)
}

func (f *FS) fileAttr(o *object, a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | FileMode
	if f.opts.Writable {
		a.Mode = syscall.S_IFREG | WritableFileMode
	}
	a.Ino = o.ino
	a.Nlink = 1
	a.Size = uint64(o.size)
	a.Blocks = uint64((o.alloc + 511) / 512)
	a.Blksize = blockSize
	a.Owner = fuse.Owner{Uid: f.opts.UID, Gid: f.opts.GID}
	t := o.mtime
	a.SetTimes(&t, &t, &t)
}

// fileNode is one version of an image (or raw object).
type fileNode struct {
	gofs.Inode
	f   *FS
	obj *object
}

var (
	_ gofs.NodeGetattrer   = (*fileNode)(nil)
	_ gofs.NodeOpener      = (*fileNode)(nil)
	_ gofs.NodeReader      = (*fileNode)(nil)
	_ gofs.NodeReleaser    = (*fileNode)(nil)
	_ gofs.NodeWriter      = (*fileNode)(nil)
	_ gofs.NodeFsyncer     = (*fileNode)(nil)
	_ gofs.NodeAllocater   = (*fileNode)(nil)
	_ gofs.NodeLseeker     = (*fileNode)(nil)
	_ gofs.NodeGetxattrer  = (*fileNode)(nil)
	_ gofs.NodeListxattrer = (*fileNode)(nil)
)

// handle is an open file: it holds the version's device.
type handle struct {
	obj *object
	dev disk.Device
}

func (n *fileNode) Getattr(ctx context.Context, fh gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.f.fileAttr(n.obj, &out.Attr)
	return 0
}

// Open opens the version's device (once per version) for direct I/O
// (FOPEN_DIRECT_IO), as QEMU's FUSE export does: reads and writes go to
// the device, whose memory tier is the cache, and the kernel keeps no
// second copy in its page cache. That copy could cost more than the rest
// of a cold scan: a dd of a 4 GiB image through the page cache spent
// 3.2-8.3 s of CPU in snapfs (in the slow runs 60% of it in the kernel's
// copy of each reply into freshly allocated pages), against 2.7-3.4 s
// with direct I/O. The device's own read-ahead (its stream detection)
// replaces the kernel's. Writers (NBD clients of a writable device) stay
// coherent with FUSE readers, and on kernels that allow it (6.6) mmap
// still works.
func (n *fileNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	write := flags&syscall.O_ACCMODE != syscall.O_RDONLY
	if write && !n.f.opts.Writable {
		return nil, 0, syscall.EROFS
	}
	dev, err := n.obj.acquire(uninterrupted(ctx))
	if err != nil {
		n.f.log.Error("cannot open image", "object", n.obj.url, "etag", n.obj.etag, "err", err)
		return nil, 0, errnoOf(err)
	}
	if write && dev.ReadOnly() {
		n.obj.release()
		return nil, 0, syscall.EROFS
	}
	return &handle{obj: n.obj, dev: dev}, fuse.FOPEN_DIRECT_IO, 0
}

// Read reads the device; a failure is EIO, with a log line naming the object.
func (n *fileNode) Read(ctx context.Context, fh gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := fh.(*handle)
	if !ok {
		return nil, syscall.EBADF
	}
	size := n.obj.size
	if off >= size || len(dest) == 0 {
		return fuse.ReadResultData(nil), 0
	}
	buf := dest[:min(int64(len(dest)), size-off)]
	if _, err := h.dev.ReadAt(uninterrupted(ctx), buf, off); err != nil {
		errno := errnoOf(err)
		if errno != syscall.EINTR {
			n.f.log.Error("read failed", "object", n.obj.url, "offset", off, "length", len(buf), "err", err)
		}
		return nil, errno
	}
	return fuse.ReadResultData(buf), 0
}

// Write writes the device (writable devices only); a failure is EIO, with
// a log line, or ENOSPC past the end.
func (n *fileNode) Write(ctx context.Context, fh gofs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, ok := fh.(*handle)
	if !ok {
		return 0, syscall.EBADF
	}
	if off < 0 || off+int64(len(data)) > h.dev.Size() {
		return 0, syscall.ENOSPC
	}
	if _, err := h.dev.WriteAt(uninterrupted(ctx), data, off); err != nil {
		n.f.log.Error("write failed", "object", n.obj.url, "offset", off, "length", len(data), "err", err)
		return 0, errnoOf(err)
	}
	return uint32(len(data)), 0
}

// Fsync makes the device's writes durable.
func (n *fileNode) Fsync(ctx context.Context, fh gofs.FileHandle, flags uint32) syscall.Errno {
	h, ok := fh.(*handle)
	if !ok {
		return 0 // fsync of a read-only file
	}
	if err := h.dev.Flush(uninterrupted(ctx)); err != nil {
		n.f.log.Error("fsync failed", "object", n.obj.url, "err", err)
		return errnoOf(err)
	}
	return 0
}

// Allocate handles fallocate's punch-hole and zero-range modes (with
// keep-size) as Trim and WriteZeroes; plain allocation is a no-op since
// the file already has its size.
func (n *fileNode) Allocate(ctx context.Context, fh gofs.FileHandle, off uint64, size uint64, mode uint32) syscall.Errno {
	const punch, zero, keep = 0x02, 0x10, 0x01 // FALLOC_FL_PUNCH_HOLE, _ZERO_RANGE, _KEEP_SIZE
	h, ok := fh.(*handle)
	if !ok {
		return syscall.EBADF
	}
	if h.dev.ReadOnly() {
		return syscall.EROFS
	}
	if int64(off) < 0 || int64(off+size) > h.dev.Size() || off+size < off {
		return syscall.EINVAL
	}
	var err error
	switch {
	case mode == 0:
	case mode == punch|keep:
		err = h.dev.Trim(uninterrupted(ctx), int64(off), int64(size))
	case mode&^keep == zero:
		err = h.dev.WriteZeroes(uninterrupted(ctx), int64(off), int64(size))
	default:
		return syscall.EOPNOTSUPP
	}
	if err != nil {
		n.f.log.Error("fallocate failed", "object", n.obj.url, "offset", off, "length", size, "err", err)
		return errnoOf(err)
	}
	return 0
}

func (n *fileNode) Release(ctx context.Context, fh gofs.FileHandle) syscall.Errno {
	if h, ok := fh.(*handle); ok && h.dev != nil {
		h.dev = nil
		h.obj.release()
	}
	return 0
}

// Lseek answers SEEK_DATA and SEEK_HOLE from the device's extents: what
// is unallocated or reads as zeros is a hole.
func (n *fileNode) Lseek(ctx context.Context, fh gofs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	const seekData, seekHole = 3, 4
	if whence != seekData && whence != seekHole {
		return 0, syscall.EINVAL
	}
	size := n.obj.size
	if off >= uint64(size) {
		return 0, syscall.ENXIO
	}
	ctx = uninterrupted(ctx)
	dev, release, errno := n.device(ctx, fh)
	if errno != 0 {
		return 0, errno
	}
	defer release()
	pos, err := seekExtents(ctx, dev, int64(off), size, whence == seekData)
	if err != nil {
		n.f.log.Error("lseek failed", "object", n.obj.url, "offset", off, "err", err)
		return 0, errnoOf(err)
	}
	if pos < 0 {
		return 0, syscall.ENXIO
	}
	return uint64(pos), 0
}

// seekWindow bounds one Extents query of a seek.
const seekWindow = 1 << 30

// seekExtents returns the first offset at or after off that is data (or a
// hole), size for a hole at the end, and -1 when no data follows.
func seekExtents(ctx context.Context, dev disk.Device, off, size int64, data bool) (int64, error) {
	for pos := off; pos < size; {
		n := min(seekWindow, size-pos)
		ext, err := dev.Extents(ctx, pos, n)
		if err != nil {
			return 0, err
		}
		for _, e := range ext {
			if e.Offset+e.Length <= off {
				continue
			}
			if hole := e.Hole || e.Zero; hole != data {
				return max(e.Offset, off), nil
			}
		}
		pos += n
	}
	if data {
		return -1, nil
	}
	return size, nil
}

// device returns the device of an open handle, or opens it for the call.
func (n *fileNode) device(ctx context.Context, fh gofs.FileHandle) (disk.Device, func(), syscall.Errno) {
	if h, ok := fh.(*handle); ok && h.dev != nil {
		return h.dev, func() {}, 0
	}
	dev, err := n.obj.acquire(ctx)
	if err != nil {
		n.f.log.Error("cannot open image", "object", n.obj.url, "etag", n.obj.etag, "err", err)
		return nil, nil, errnoOf(err)
	}
	return dev, n.obj.release, 0
}

func (n *fileNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	v, ok := n.obj.xattr(attr)
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *fileNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	var b []byte
	for _, name := range xattrNames {
		b = append(append(b, name...), 0)
	}
	if len(dest) < len(b) {
		return uint32(len(b)), syscall.ERANGE
	}
	return uint32(copy(dest, b)), 0
}

func (o *object) xattr(name string) (string, bool) {
	switch name {
	case XattrSource:
		return o.url, true
	case XattrETag:
		return o.etag, true
	case XattrFormat:
		return o.format, true
	case XattrVirtualSize:
		return strconv.FormatInt(o.size, 10), true
	case XattrAllocated:
		return strconv.FormatInt(o.alloc, 10), true
	}
	return "", false
}

// uninterrupted drops the cancellation of a request's context. The kernel
// interrupts a request whenever its caller gets a signal, fatal or not (Go
// programs get them all the time), and answering EINTR would fail reads and
// seeks that most programs do not retry; a fatal signal needs no answer.
// The store's retry policy bounds how long a request can take.
func uninterrupted(ctx context.Context) context.Context { return context.WithoutCancel(ctx) }

// errnoOf maps a device error to an errno: EINTR for an interrupted
// request, EIO otherwise.
func errnoOf(err error) syscall.Errno {
	switch {
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	case errors.Is(err, syscall.ENOSPC):
		return syscall.ENOSPC
	case errors.Is(err, disk.ErrReadOnly):
		return syscall.EROFS
	}
	return syscall.EIO
}

// errorsAttrTimeout is the attribute timeout of the errors file, whose
// size changes with the listing.
const errorsAttrTimeout = time.Second

// errorsNode is ErrorsFile: the current listing's errors, read-only.
type errorsNode struct {
	gofs.Inode
	f *FS
}

var (
	_ gofs.NodeGetattrer = (*errorsNode)(nil)
	_ gofs.NodeOpener    = (*errorsNode)(nil)
	_ gofs.NodeReader    = (*errorsNode)(nil)
)

type errorsHandle struct{ b []byte }

func (f *FS) errorsAttr(s *snapshot, a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | FileMode
	a.Ino = errorsIno
	a.Nlink = 1
	a.Size = uint64(len(s.errors))
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
	a.Owner = fuse.Owner{Uid: f.opts.UID, Gid: f.opts.GID}
	t := s.taken
	a.SetTimes(&t, &t, &t)
}

func (n *errorsNode) Getattr(ctx context.Context, fh gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.f.errorsAttr(n.f.current(), &out.Attr)
	out.SetTimeout(errorsAttrTimeout)
	return 0
}

// Open takes the errors as they are now; reads bypass the page cache.
func (n *errorsNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	return &errorsHandle{b: n.f.current().errors}, fuse.FOPEN_DIRECT_IO, 0
}

func (n *errorsNode) Read(ctx context.Context, fh gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := fh.(*errorsHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	if off >= int64(len(h.b)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(h.b[off:min(int64(len(h.b)), off+int64(len(dest)))]), 0
}
