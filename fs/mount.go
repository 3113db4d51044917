package fs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Transfer sizes of the mount.
const (
	// MaxRead is the largest read request (max_read, and max_write).
	MaxRead = 1 << 20
	// ReadAheadKB is the kernel readahead window set for the mount's
	// backing device: 16 MiB, the disk layer's largest fetch window. Files
	// are opened for direct I/O, so it serves mmap readers only (before
	// direct I/O it beat 4 MiB and 1 MiB for dd bs=1M, bench/RESULTS.md,
	// 2026-12-01 readahead sweep).
	ReadAheadKB = 16384
	// maxBackground bounds the kernel's asynchronous (readahead) requests.
	maxBackground = 64
)

// FSType is the file system type the mounts show ("fuse.snapfs").
const FSType = "fuse.snapfs"

// Mount is a mounted FS.
type Mount struct {
	f    *FS
	srv  *fuse.Server
	dir  string
	dev  uint64 // st_dev of the mount's root
	done chan struct{}
}

// Mount mounts the file system on dir, read-only, and serves it until it
// is unmounted (see Mount.Done). fsName is the source shown in the mount
// table (the URL, without any signature). The listing is refreshed every
// ListTTL from then on.
func (f *FS) Mount(dir, fsName string) (*Mount, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if f.isClosed() {
		return nil, errors.New("file system closed")
	}
	ttl := f.opts.ListTTL
	if ttl < 0 {
		ttl = time.Hour
	}
	neg := time.Duration(0)
	opts := &gofs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:           f.opts.AllowOther,
			Options:              []string{"ro", "default_permissions"},
			MaxWrite:             MaxRead,
			MaxReadAhead:         MaxRead,
			MaxBackground:        maxBackground,
			FsName:               mountSource(fsName),
			Name:                 strings.TrimPrefix(FSType, "fuse."),
			DirectMount:          os.Geteuid() == 0,
			DirectMountFlags:     syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_RDONLY,
			IgnoreSecurityLabels: true,
			DisableSplice:        true, // replies are in memory: splicing gains nothing, and 1 MiB replies exceed the pipe size
			// Files are opened for direct I/O (fileNode.Open): mmap is
			// allowed all the same (kernels from 6.6), and asynchronous
			// reads (io_uring, aio) go out together instead of one at a
			// time (TestConcurrentAsyncReads).
			ExtraCapabilities: fuse.CAP_DIRECT_IO_ALLOW_MMAP | fuse.CAP_ASYNC_DIO,
			Debug:             f.opts.Debug,
			Logger:            log.New(os.Stderr, "fuse: ", log.LstdFlags),
		},
		EntryTimeout:    &ttl,
		AttrTimeout:     &ttl,
		NegativeTimeout: &neg,
		UID:             f.opts.UID,
		GID:             f.opts.GID,
		RootStableAttr:  &gofs.StableAttr{Ino: rootIno},
	}
	if f.opts.Writable {
		opts.MountOptions.Options[0] = "rw"
		opts.MountOptions.DirectMountFlags &^= syscall.MS_RDONLY
	}
	srv, err := gofs.Mount(abs, f.root, opts)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", abs, err)
	}
	m := &Mount{f: f, srv: srv, dir: abs, done: make(chan struct{})}
	var st unix.Stat_t
	if err := unix.Stat(abs, &st); err == nil {
		m.dev = st.Dev
		if err := setReadAhead(st.Dev, ReadAheadKB); err != nil {
			f.log.Debug("cannot set the readahead window", "err", err)
		}
	}
	go func() {
		srv.Wait()
		close(m.done)
	}()
	f.mu.Lock()
	f.mount = m
	f.mu.Unlock()
	f.startLoop()
	return m, nil
}

// mountSource makes s usable as a mount source (fusermount splits options
// on commas).
func mountSource(s string) string {
	if s == "" {
		return "snapfs"
	}
	return strings.NewReplacer(",", "%2C", " ", "%20", "\n", "").Replace(s)
}

// setReadAhead sets the readahead window of the FUSE backing device.
func setReadAhead(dev uint64, kb int) error {
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(dev), unix.Minor(dev))
	return os.WriteFile(p, []byte(strconv.Itoa(kb)), 0)
}

// Dir returns the mount point (absolute).
func (m *Mount) Dir() string { return m.dir }

// Done is closed when the kernel has let go of the mount: it was unmounted
// (lazily: and its last file closed), and serving has ended.
func (m *Mount) Done() <-chan struct{} { return m.done }

// Unmount detaches the mount lazily (new opens fail at once; files open
// now are served until they close), waits until serving ends or ctx is
// done, and closes the file system. When ctx ends first, the caller should
// exit: open files then fail with ENOTCONN.
func (m *Mount) Unmount(ctx context.Context) error {
	select {
	case <-m.done:
	default:
		if typ, ok, _ := MountType(m.dir); ok && typ == FSType {
			if err := Unmount(m.dir, true); err != nil {
				if typ, ok, _ := MountType(m.dir); ok && typ == FSType {
					return err
				}
			}
		}
	}
	select {
	case <-m.done:
	case <-ctx.Done():
		return fmt.Errorf("%s: files still open: %w", m.dir, ctx.Err())
	}
	return m.f.Close()
}

// Wait waits until serving ends, then closes the file system.
func (m *Mount) Wait() error {
	<-m.done
	return m.f.Close()
}

// invalidate drops the kernel's cached names that the new listing changed
// or removed (and new names, in case a negative entry is cached).
func (m *Mount) invalidate(old, s *snapshot) {
	select {
	case <-m.done:
		return
	default:
	}
	root := m.f.root.EmbeddedInode()
	for p, od := range old.dirs {
		nd := s.dirs[p]
		var changed []string
		for name, oc := range od.entries {
			if nd == nil || !sameChild(oc, nd.entries[name]) {
				changed = append(changed, name)
			}
		}
		if nd != nil {
			for name := range nd.entries {
				if _, ok := od.entries[name]; !ok {
					changed = append(changed, name)
				}
			}
		}
		if len(changed) == 0 {
			continue
		}
		in := lookupPath(root, p)
		if in == nil {
			continue
		}
		for _, name := range changed {
			if errno := in.NotifyEntry(name); errno != 0 && errno != syscall.ENOENT {
				m.f.log.Debug("cannot invalidate a cached name", "dir", p, "name", name, "err", errno)
			}
		}
	}
}

func sameChild(a, b dirChild) bool {
	switch {
	case a.dir != nil:
		return b.dir != nil && a.dir.ino == b.dir.ino
	case a.obj != nil:
		return b.obj == a.obj
	}
	return false
}

// lookupPath returns the inode the kernel knows at p, or nil.
func lookupPath(root *gofs.Inode, p string) *gofs.Inode {
	in := root
	if p == "" {
		return in
	}
	for _, name := range strings.Split(p, "/") {
		if in = in.GetChild(name); in == nil {
			return nil
		}
	}
	return in
}

// Unmount unmounts the snapfs mount at dir: lazily (detached now, gone
// once its last open file closes) or not, in which case it fails while
// files are open. It refuses a directory that is not a snapfs mount.
func Unmount(dir string, lazy bool) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	fstype, ok, err := MountType(abs)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s: not mounted", abs)
	}
	if fstype != FSType {
		return fmt.Errorf("%s: not a snapfs mount (type %s)", abs, fstype)
	}
	flags := 0
	if lazy {
		flags = unix.MNT_DETACH
	}
	// A mount is busy for a moment after it appears (go-fuse polls a
	// file in it while it starts) and while a command leaves it: retry a
	// busy answer for about a second.
	delay := 10 * time.Millisecond
	for try := 0; ; try++ {
		err = unix.Unmount(abs, flags)
		if errors.Is(err, unix.EPERM) {
			err = fusermountU(abs, lazy)
		}
		if !errors.Is(err, unix.EBUSY) || try == 6 {
			break
		}
		time.Sleep(delay)
		delay *= 2
	}
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("%s: busy: files are open (unmount lazily to detach it now)", abs)
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", abs, err)
	}
	return nil
}

// fusermountU unmounts with fusermount3 (or fusermount), for users.
func fusermountU(dir string, lazy bool) error {
	bin, err := exec.LookPath("fusermount3")
	if err != nil {
		if bin, err = exec.LookPath("fusermount"); err != nil {
			return errors.New("fusermount3 not found")
		}
	}
	args := []string{"-u"}
	if lazy {
		args = append(args, "-z")
	}
	out, err := exec.Command(bin, append(args, "--", dir)...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if strings.Contains(msg, "busy") {
			return unix.EBUSY
		}
		return fmt.Errorf("%s: %v: %s", filepath.Base(bin), err, msg)
	}
	return nil
}

// MountType returns the file system type of the mount at dir (an absolute,
// clean path) from /proc/self/mountinfo; ok is false when dir is not a
// mount point.
func MountType(dir string) (fstype string, ok bool, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || unescapeMountinfo(fields[4]) != dir {
			continue
		}
		for i := 6; i < len(fields)-1; i++ {
			if fields[i] == "-" {
				fstype, ok = fields[i+1], true // the last one listed is on top
				break
			}
		}
	}
	return fstype, ok, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for a space...) of
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
