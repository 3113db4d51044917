// Package fs serves the QCOW2 images under an object-store prefix as a
// read-only FUSE file system of raw disks (go-fuse/v2's fs API).
//
// Every QCOW2 object under the prefix is a regular file of the image's
// virtual size, named after its key with ".qcow2" replaced by ".raw" (or
// ".raw" appended); sub-prefixes are directories. Objects that are not
// QCOW2 are left out (or shown as they are with Options.RawObjects), and
// images that cannot be served are listed, with the reason, in the
// read-only file .snapfs-errors at the root. The listing is refreshed every
// Options.ListTTL; a file keeps serving the object version (ETag) it was
// opened with, and fails with EIO once that version is gone.
//
// Reads go through the lazy disk layer (DiskDevice: one device per open
// object version, sharing a memory cache), in requests of up to MaxRead
// with the kernel reading ahead ReadAheadKB; SEEK_DATA and SEEK_HOLE come
// from the device's extents, st_blocks from the image's allocated bytes.
//
// Typical use: New, then FS.Mount, then Mount.Wait (or Mount.Unmount on a
// signal).
package fs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sync/errgroup"

	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// ErrorsFile is the name of the root file listing the objects that cannot
// be served, one "URL: reason" line each.
const ErrorsFile = ".snapfs-errors"

// DefaultListTTL is how long a listing is used before it is refreshed.
const DefaultListTTL = 60 * time.Second

// DefaultIdleClose is how long an unused device stays open.
const DefaultIdleClose = 5 * time.Minute

// Extended attributes of every file.
const (
	XattrSource      = "user.snapfs.source"       // the object's URL, without any signature
	XattrETag        = "user.snapfs.etag"         // the ETag the file serves
	XattrFormat      = "user.snapfs.format"       // "qcow2", or "raw" for a raw object
	XattrVirtualSize = "user.snapfs.virtual_size" // bytes, decimal
	XattrAllocated   = "user.snapfs.allocated"    // allocated bytes of the disk, decimal
)

var xattrNames = []string{XattrSource, XattrETag, XattrFormat, XattrVirtualSize, XattrAllocated}

// Modes of files and directories.
const (
	FileMode = 0o444
	// WritableFileMode is the mode of files with Options.Writable.
	WritableFileMode = 0o644
	DirMode          = 0o555
)

// Options configure New. The zero value is usable (root owns the files).
type Options struct {
	// UID and GID own every file and directory.
	UID, GID uint32
	// ListTTL is how long a listing is used before it is refreshed; zero
	// means DefaultListTTL, negative never refreshes.
	ListTTL time.Duration
	// RawObjects shows objects that are not QCOW2 as they are: files of
	// the object's size and name, read straight through.
	RawObjects bool
	// AllowOther lets users other than the mounting one in (allow_other).
	AllowOther bool
	// OpenDevice makes the device of an opened image; nil means
	// DiskDevice(disk.Options{}) (the lazy disk layer without a memory
	// cache).
	OpenDevice DeviceOpener
	// Logger gets the log lines; nil means slog.Default().
	Logger *slog.Logger
	// ProbeParallelism bounds the images opened at once while listing;
	// zero means 8.
	ProbeParallelism int
	// IdleClose is how long the device of a file stays open after its
	// last handle closed (keeping its cached blocks and metadata); zero
	// means DefaultIdleClose.
	IdleClose time.Duration
	// Debug logs every FUSE request (go-fuse's debug output).
	Debug bool
	// Fixed, when set, makes New's key one file served by a given device
	// without the store: no listing, no probe and no open of the object,
	// so that a complete local volume is served with its bucket gone.
	Fixed *FixedFile
	// Writable mounts read-write: the files of writable devices
	// (Device.ReadOnly false) take writes, fsync and fallocate (mode
	// WritableFileMode); the others still refuse writes with EROFS.
	Writable bool
}

// FixedFile is the one file of a mount that does not use the store
// (Options.Fixed), such as a local volume.
type FixedFile struct {
	// Device serves the file, whose size is the device's (a local
	// volume may be larger than the image). The FS calls its Close when
	// the file is idle; give a device whose Close does nothing when its
	// owner closes it.
	Device disk.Device
	// ETag is the object version the device holds (XattrETag).
	ETag string
	// Allocated is the XattrAllocated value and the statfs usage.
	Allocated int64
	// ModTime is the file's modification time.
	ModTime time.Time
}

// FS is the file system tree of one mount: a store and a prefix (or one
// object), listed every ListTTL. Safe for concurrent use.
type FS struct {
	st     objstore.Store
	prefix string // key prefix ("" or ending in "/"), or the object key in single mode
	single bool
	opts   Options
	log    *slog.Logger
	root   *dirNode
	start  time.Time

	mu       sync.Mutex // guards what follows, and serializes refreshes
	snap     *snapshot
	probes   map[string]probeResult // by key: the last definitive probe
	logged   map[string]bool        // key+"\x00"+etag of objects already logged as left out
	dirInos  map[string]uint64      // by directory path
	nextIno  uint64
	devices  map[*object]struct{} // objects with an open device
	closed   bool
	mount    *Mount // set once mounted, for kernel cache invalidations
	stopLoop chan struct{}
	loopDone chan struct{}

	refreshes int // completed listings, for tests

	refreshMu sync.Mutex // one listing at a time
}

// snapshot is one listing, immutable once built.
type snapshot struct {
	dirs    map[string]*dirEnt // by path; "" is the root
	objects map[string]*object // by key, the files shown
	errors  []byte             // content of ErrorsFile
	taken   time.Time
	total   int64 // sum of the allocated bytes, for statfs
}

type dirEnt struct {
	path    string
	ino     uint64
	mtime   time.Time
	names   []string // sorted
	entries map[string]dirChild
}

type dirChild struct {
	dir *dirEnt
	obj *object
}

// object is one version (key and ETag) of a file. The device is opened on
// the first open and closed once the version has left the listing and the
// last handle is released.
type object struct {
	f        *FS
	key, url string
	etag     string
	mtime    time.Time
	format   string // "qcow2" or "raw"
	size     int64  // virtual size (the object size for raw)
	objSize  int64
	alloc    int64 // allocated bytes
	ino      uint64
	path     string // in the tree

	mu      sync.Mutex
	dev     disk.Device
	opens   int
	dropped bool
	idle    *time.Timer // closes the device when it stays unused
}

// Probe outcomes.
type probeKind int

const (
	probeImage    probeKind = iota // a servable QCOW2 image
	probeNotQCOW2                  // not a QCOW2 image
	probeRefused                   // a QCOW2 image that cannot be served
	probeFailed                    // the probe failed (store error): tried again next listing
)

type probeResult struct {
	kind   probeKind
	info   objstore.ObjectInfo // as the probe saw it
	size   int64               // virtual size
	alloc  int64               // allocated bytes
	reason string
}

// New lists the store under key and returns the file system. A key that
// is empty or ends in "/" is a prefix; any other key names one object
// (mounted as a directory holding that one file), or, when no object has
// that key but some are under key+"/", that prefix. New fails when the
// first listing does, and in single mode when the object cannot be served.
func New(ctx context.Context, st objstore.Store, key string, opts Options) (*FS, error) {
	if opts.ListTTL == 0 {
		opts.ListTTL = DefaultListTTL
	}
	if opts.OpenDevice == nil {
		opts.OpenDevice = DiskDevice(disk.Options{})
	}
	if opts.ProbeParallelism <= 0 {
		opts.ProbeParallelism = 8
	}
	if opts.IdleClose <= 0 {
		opts.IdleClose = DefaultIdleClose
	}
	f := &FS{
		st:      st,
		prefix:  key,
		opts:    opts,
		log:     opts.Logger,
		start:   time.Now(),
		probes:  map[string]probeResult{},
		logged:  map[string]bool{},
		dirInos: map[string]uint64{"": rootIno},
		nextIno: firstIno,
		devices: map[*object]struct{}{},
	}
	if f.log == nil {
		f.log = slog.Default()
	}
	f.root = &dirNode{f: f, path: ""}
	if opts.Fixed != nil {
		if key == "" || strings.HasSuffix(key, "/") {
			return nil, fmt.Errorf("%s: a fixed file needs an object key, not a prefix", st.URL(key))
		}
		f.single = true
	} else if key != "" && !strings.HasSuffix(key, "/") {
		_, err := st.Stat(ctx, key)
		switch {
		case err == nil:
			f.single = true
		case errors.Is(err, objstore.ErrNotFound):
			objs, lerr := st.List(ctx, key+"/")
			if lerr != nil || len(objs) == 0 {
				return nil, err
			}
			f.prefix = key + "/"
		default:
			return nil, err
		}
	}
	if err := f.Refresh(ctx); err != nil {
		return nil, err
	}
	if f.single {
		s := f.current()
		if len(s.objects) == 0 {
			r := f.probes[key]
			switch r.kind {
			case probeNotQCOW2:
				return nil, fmt.Errorf("%s: %w (use --raw-objects to serve it as it is)", st.URL(key), qcow2.ErrNotQCOW2)
			default:
				if len(s.errors) > 0 {
					return nil, errors.New(strings.TrimSpace(string(s.errors)))
				}
				return nil, fmt.Errorf("%s: cannot be served", st.URL(key))
			}
		}
	}
	return f, nil
}

const (
	rootIno   = 1
	errorsIno = 2
	firstIno  = 3
)

// Root returns the root directory node, to mount with go-fuse yourself
// (Mount does it all).
func (f *FS) Root() gofs.InodeEmbedder { return f.root }

// current returns the listing in use.
func (f *FS) current() *snapshot {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.snap
}

// Errors returns the content of ErrorsFile: one "URL: reason" line per
// object that cannot be served.
func (f *FS) Errors() string { return string(f.current().errors) }

// Files returns the paths of the files shown, sorted.
func (f *FS) Files() []string {
	s := f.current()
	var out []string
	for _, o := range s.objects {
		out = append(out, o.path)
	}
	slices.Sort(out)
	return out
}

// Refresh lists the store again now and swaps in the new listing: new
// objects appear, deleted and replaced ones leave (files open on them keep
// their version). On failure the previous listing stays.
func (f *FS) Refresh(ctx context.Context) error {
	f.refreshMu.Lock()
	defer f.refreshMu.Unlock()
	f.mu.Lock()
	closed := f.closed
	f.mu.Unlock()
	if closed {
		return errors.New("file system closed")
	}
	infos, err := f.list(ctx)
	if err != nil {
		return err
	}
	probes := f.probeAll(ctx, infos)

	f.mu.Lock()
	old := f.snap
	s := f.build(infos, probes)
	f.snap = s
	f.refreshes++
	m := f.mount
	f.mu.Unlock()

	dropped := diffObjects(old, s)
	for _, o := range dropped {
		o.drop()
	}
	if m != nil && old != nil {
		m.invalidate(old, s)
	}
	return nil
}

// list returns the objects to show, in key order.
func (f *FS) list(ctx context.Context) ([]objstore.ObjectInfo, error) {
	if fx := f.opts.Fixed; fx != nil {
		return []objstore.ObjectInfo{{Key: f.prefix, Size: fx.Device.Size(), ETag: fx.ETag, LastModified: fx.ModTime}}, nil
	}
	if f.single {
		info, err := f.st.Stat(ctx, f.prefix)
		if errors.Is(err, objstore.ErrNotFound) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if info.Key == "" {
			info.Key = f.prefix
		}
		return []objstore.ObjectInfo{info}, nil
	}
	infos, err := f.st.List(ctx, f.prefix)
	if err != nil {
		return nil, err
	}
	out := infos[:0]
	for _, in := range infos {
		if strings.HasPrefix(in.Key, f.prefix) && in.Key != f.prefix {
			out = append(out, in)
		}
	}
	return out, nil
}

// probeAll probes the objects whose key and ETag have no definitive probe
// yet, a few at a time, and returns the probes of every listed object.
func (f *FS) probeAll(ctx context.Context, infos []objstore.ObjectInfo) map[string]probeResult {
	out := make(map[string]probeResult, len(infos))
	var todo []objstore.ObjectInfo
	f.mu.Lock()
	for _, in := range infos {
		if strings.HasSuffix(in.Key, "/") {
			continue // a directory marker
		}
		if r, ok := f.probes[in.Key]; ok && r.info.ETag == in.ETag && in.ETag != "" {
			out[in.Key] = r
			continue
		}
		todo = append(todo, in)
	}
	f.mu.Unlock()

	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(f.opts.ProbeParallelism)
	for _, in := range todo {
		g.Go(func() error {
			r := f.probe(gctx, in)
			mu.Lock()
			out[in.Key] = r
			mu.Unlock()
			return nil
		})
	}
	_ = g.Wait()

	f.mu.Lock()
	listed := make(map[string]bool, len(infos))
	for _, in := range infos {
		listed[in.Key] = true
	}
	for k := range f.probes {
		if !listed[k] {
			delete(f.probes, k)
		}
	}
	for k, r := range out {
		if r.kind != probeFailed {
			f.probes[k] = r
		}
	}
	f.mu.Unlock()
	return out
}

// probe opens one object as a QCOW2 image (pinned to the ETag it has now)
// and walks its mapping for the allocated bytes; a fixed file is described
// by its Options.Fixed alone.
func (f *FS) probe(ctx context.Context, in objstore.ObjectInfo) probeResult {
	if fx := f.opts.Fixed; fx != nil {
		return probeResult{kind: probeImage, info: in, size: fx.Device.Size(), alloc: fx.Allocated}
	}
	url := f.st.URL(in.Key)
	p := objstore.WithPinning(f.st)
	info, err := p.Stat(ctx, in.Key)
	if err != nil {
		return probeResult{kind: probeFailed, info: in, reason: storeReason(err, url)}
	}
	if info.Key == "" {
		info.Key = in.Key
	}
	r := probeResult{info: info, size: info.Size, alloc: info.Size}
	im, err := qcow2.Open(ctx, p, in.Key, nil)
	if err != nil {
		r.reason = imageReason(err, url)
		switch {
		case notQCOW2(err):
			r.kind = probeNotQCOW2
		case qcow2.Refused(err):
			r.kind = probeRefused
		default:
			r.kind = probeFailed
		}
		return r
	}
	defer im.Close()
	r.size = im.Size()
	var alloc int64
	if r.size > 0 {
		ext, err := im.Map(ctx, 0, r.size)
		if err != nil {
			r.reason = imageReason(err, url)
			r.kind = probeFailed
			if qcow2.Refused(err) {
				r.kind = probeRefused
			}
			return r
		}
		for _, e := range ext {
			if e.Kind == qcow2.Data || e.Kind == qcow2.Compressed {
				alloc += e.Length
			}
		}
	}
	r.alloc = alloc
	r.kind = probeImage
	return r
}

// notQCOW2 reports whether err says that the object itself (not a file
// of its chain) is not a QCOW2 image.
func notQCOW2(err error) bool {
	if !errors.Is(err, qcow2.ErrNotQCOW2) {
		return false
	}
	var qe *qcow2.Error
	if !errors.As(err, &qe) {
		return true
	}
	var inner *qcow2.Error
	return !errors.As(qe.Err, &inner)
}

// imageReason is the reason part of an image error (the text after the URL).
func imageReason(err error, url string) string {
	var qe *qcow2.Error
	if errors.As(err, &qe) && qe.URL == url && qe.Offset < 0 {
		return qe.Err.Error()
	}
	return storeReason(err, url)
}

// storeReason is err's text without a leading mention of url.
func storeReason(err error, url string) string {
	s := err.Error()
	if i := strings.Index(s, url+": "); i >= 0 && i < 16 {
		return s[i+len(url)+2:]
	}
	return s
}

// build makes the snapshot of a listing; f.mu is held.
func (f *FS) build(infos []objstore.ObjectInfo, probes map[string]probeResult) *snapshot {
	s := &snapshot{dirs: map[string]*dirEnt{}, objects: map[string]*object{}, taken: time.Now()}
	var errs []string
	fail := func(key, reason string) {
		errs = append(errs, f.st.URL(key)+": "+reason)
	}
	f.dirEntFor(s, "")

	// Directories first, so that a file cannot take a directory's name.
	type candidate struct {
		key   string
		dir   string
		name  string
		probe probeResult
	}
	var files []candidate
	for _, in := range infos {
		rel := path.Base(in.Key)
		if !f.single {
			rel = strings.TrimPrefix(in.Key, f.prefix)
		}
		isMarker := strings.HasSuffix(rel, "/")
		rel = strings.TrimSuffix(rel, "/")
		parts := strings.Split(rel, "/")
		ok := true
		for _, p := range parts {
			if !validName(p) {
				ok = false
			}
		}
		if !ok {
			if !isMarker {
				fail(in.Key, fmt.Sprintf("the key cannot be shown as a path (%q)", rel))
			}
			continue
		}
		dirs := parts[:len(parts)-1]
		if isMarker {
			dirs = parts
		}
		dir := ""
		for _, d := range dirs {
			dir = path.Join(dir, d)
			f.dirEntFor(s, dir)
		}
		if isMarker {
			continue
		}
		r, ok := probes[in.Key]
		if !ok {
			continue
		}
		switch r.kind {
		case probeFailed:
			f.log.Warn("cannot list object", "object", f.st.URL(in.Key), "err", r.reason)
			fail(in.Key, r.reason)
			continue
		case probeRefused:
			if f.logOnce(in.Key, r.info.ETag) {
				f.log.Warn("image left out: it cannot be served", "object", f.st.URL(in.Key), "reason", r.reason)
			}
			fail(in.Key, r.reason)
			continue
		case probeNotQCOW2:
			if !f.opts.RawObjects {
				if f.logOnce(in.Key, r.info.ETag) {
					f.log.Warn("object left out: not a QCOW2 image (--raw-objects shows it as it is)", "object", f.st.URL(in.Key))
				}
				continue
			}
		}
		name := parts[len(parts)-1]
		if r.kind == probeImage {
			name = rawName(name)
		}
		if !validName(name) {
			fail(in.Key, fmt.Sprintf("the name %q is too long", name))
			continue
		}
		files = append(files, candidate{key: in.Key, dir: dir, name: name, probe: r})
	}

	var old map[string]*object
	if f.snap != nil {
		old = f.snap.objects
	}
	for _, c := range files {
		d := s.dirs[c.dir]
		p := path.Join(c.dir, c.name)
		if _, taken := d.entries[c.name]; taken || (c.dir == "" && c.name == ErrorsFile) {
			what := "another object"
			if c.dir == "" && c.name == ErrorsFile {
				what = "the errors file"
			} else if d.entries[c.name].dir != nil {
				what = "a directory"
			}
			fail(c.key, fmt.Sprintf("its name %s is taken by %s", p, what))
			continue
		}
		format := "qcow2"
		if c.probe.kind == probeNotQCOW2 {
			format = "raw"
		}
		info := c.probe.info
		o := old[c.key]
		if o == nil || o.etag != info.ETag || o.path != p || o.format != format || o.size != c.probe.size {
			o = &object{
				f: f, key: c.key, url: f.st.URL(c.key), etag: info.ETag, mtime: info.LastModified,
				format: format, size: c.probe.size, objSize: info.Size, alloc: c.probe.alloc,
				ino: f.nextIno, path: p,
			}
			f.nextIno++
		}
		d.entries[c.name] = dirChild{obj: o}
		s.objects[c.key] = o
		s.total += o.alloc
		for dp := c.dir; ; dp = parentPath(dp) {
			if de := s.dirs[dp]; o.mtime.After(de.mtime) {
				de.mtime = o.mtime
			}
			if dp == "" {
				break
			}
		}
	}
	for _, d := range s.dirs {
		for n := range d.entries {
			d.names = append(d.names, n)
		}
		slices.Sort(d.names)
		if d.mtime.IsZero() {
			d.mtime = f.start
		}
	}
	for p := range f.dirInos {
		if _, ok := s.dirs[p]; !ok && p != "" {
			delete(f.dirInos, p)
		}
	}
	// Forget what was logged about versions no longer listed.
	current := make(map[string]bool, len(probes))
	for k, r := range probes {
		current[k+"\x00"+r.info.ETag] = true
	}
	for k := range f.logged {
		if !current[k] {
			delete(f.logged, k)
		}
	}
	slices.SortFunc(errs, cmp.Compare)
	var b strings.Builder
	for _, e := range errs {
		b.WriteString(strings.ReplaceAll(e, "\n", " "))
		b.WriteByte('\n')
	}
	s.errors = []byte(b.String())
	return s
}

// dirEntFor returns the directory at p in s, making it (and linking it
// into its parent) if needed; f.mu is held.
func (f *FS) dirEntFor(s *snapshot, p string) *dirEnt {
	if d := s.dirs[p]; d != nil {
		return d
	}
	ino, ok := f.dirInos[p]
	if !ok {
		ino = f.nextIno
		f.nextIno++
		f.dirInos[p] = ino
	}
	d := &dirEnt{path: p, ino: ino, entries: map[string]dirChild{}}
	s.dirs[p] = d
	if p != "" {
		parent := f.dirEntFor(s, parentPath(p))
		parent.entries[path.Base(p)] = dirChild{dir: d}
	}
	return d
}

func parentPath(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// logOnce reports whether the object version was not logged yet, and
// marks it logged; f.mu is held.
func (f *FS) logOnce(key, etag string) bool {
	k := key + "\x00" + etag
	if f.logged[k] {
		return false
	}
	f.logged[k] = true
	return true
}

// rawName is the file name of a QCOW2 object's base name.
func rawName(base string) string {
	if len(base) > len(".qcow2") && strings.EqualFold(base[len(base)-len(".qcow2"):], ".qcow2") {
		return base[:len(base)-len(".qcow2")] + ".raw"
	}
	return base + ".raw"
}

// validName reports whether s can be a file name.
func validName(s string) bool {
	return s != "" && s != "." && s != ".." && len(s) <= 255 && !strings.ContainsRune(s, 0)
}

// diffObjects returns the objects of old that s no longer shows.
func diffObjects(old, s *snapshot) []*object {
	if old == nil {
		return nil
	}
	var out []*object
	for k, o := range old.objects {
		if s.objects[k] != o {
			out = append(out, o)
		}
	}
	return out
}

// loop refreshes the listing every ListTTL until stopped.
func (f *FS) loop(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(f.opts.ListTTL)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), max(5*time.Minute, 2*f.opts.ListTTL))
		go func() {
			select {
			case <-stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		if err := f.Refresh(ctx); err != nil && ctx.Err() == nil {
			f.log.Warn("listing failed; keeping the previous listing", "prefix", f.st.URL(f.prefix), "err", err)
		}
		cancel()
	}
}

// startLoop starts the refresh loop (once).
func (f *FS) startLoop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stopLoop != nil || f.opts.ListTTL < 0 || f.closed {
		return
	}
	f.stopLoop, f.loopDone = make(chan struct{}), make(chan struct{})
	go f.loop(f.stopLoop, f.loopDone)
}

// Close stops the refreshes and closes every open device.
func (f *FS) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	stop, done := f.stopLoop, f.loopDone
	f.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
	f.mu.Lock()
	objs := make([]*object, 0, len(f.devices))
	for o := range f.devices {
		objs = append(objs, o)
	}
	f.mu.Unlock()
	var first error
	for _, o := range objs {
		if err := o.closeDevice(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// acquire returns the object's device, opening it if needed, for one more
// open handle.
func (o *object) acquire(ctx context.Context) (disk.Device, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.idle != nil {
		o.idle.Stop()
		o.idle = nil
	}
	if o.dev == nil {
		dev, err := o.f.openDevice(ctx, o)
		if err != nil {
			return nil, err
		}
		o.dev = dev
		o.f.mu.Lock()
		o.f.devices[o] = struct{}{}
		o.f.mu.Unlock()
	}
	o.opens++
	return o.dev, nil
}

// release gives back a handle's hold on the device. The device of a
// version that left the listing closes at once, others after IdleClose.
func (o *object) release() {
	o.mu.Lock()
	o.opens--
	now := o.opens == 0 && o.dropped
	if o.opens == 0 && !o.dropped && o.dev != nil && o.idle == nil {
		var t *time.Timer
		t = time.AfterFunc(o.f.opts.IdleClose, func() {
			o.mu.Lock()
			mine := o.idle == t && o.opens == 0
			if mine {
				o.idle = nil
			}
			o.mu.Unlock()
			if mine {
				o.closeDevice()
			}
		})
		o.idle = t
	}
	o.mu.Unlock()
	if now {
		o.closeDevice()
	}
}

// drop marks the version as gone from the listing; its device closes when
// no handle holds it.
func (o *object) drop() {
	o.mu.Lock()
	o.dropped = true
	idle := o.opens == 0
	o.mu.Unlock()
	if idle {
		o.closeDevice()
	}
}

func (o *object) closeDevice() error {
	o.mu.Lock()
	dev := o.dev
	if o.opens > 0 && !o.f.isClosed() {
		dev = nil
	}
	if dev != nil {
		o.dev = nil
	}
	if o.idle != nil {
		o.idle.Stop()
		o.idle = nil
	}
	o.mu.Unlock()
	if dev == nil {
		return nil
	}
	o.f.mu.Lock()
	delete(o.f.devices, o)
	o.f.mu.Unlock()
	return dev.Close()
}

func (f *FS) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// openDevice opens the device of an object version, pinned to its ETag.
func (f *FS) openDevice(ctx context.Context, o *object) (disk.Device, error) {
	if f.isClosed() {
		return nil, errors.New("file system closed")
	}
	if fx := f.opts.Fixed; fx != nil {
		return fx.Device, nil
	}
	if o.format == "raw" {
		return &rawDevice{st: f.st, key: o.key, etag: o.etag, size: o.size}, nil
	}
	p := objstore.WithPinning(f.st)
	info, err := p.Stat(ctx, o.key)
	if err != nil {
		return nil, err
	}
	if info.ETag != o.etag {
		return nil, &objstore.Error{Op: "open", URL: o.url, Err: objstore.ErrChanged}
	}
	im, err := qcow2.Open(ctx, p, o.key, nil)
	if err != nil {
		return nil, err
	}
	if im.Size() != o.size {
		im.Close()
		return nil, &objstore.Error{Op: "open", URL: o.url, Err: objstore.ErrChanged}
	}
	dev, err := f.opts.OpenDevice(ctx, im)
	if err != nil {
		im.Close()
		return nil, err
	}
	return dev, nil
}
