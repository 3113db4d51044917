package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"golang.org/x/sys/unix"

	"github.com/snapfs/snapfs/fs"
	"github.com/snapfs/snapfs/tests/harness"
	"github.com/snapfs/snapfs/tests/images"
)

// fuseImages are the corpus images the FUSE tests mount from MinIO, with
// the sub-prefix each goes to: plain v2 and v3, compressed (zstd, and zlib
// with 512-byte clusters), a backing chain, extended L2 over a backing
// file, a size that is no multiple of the cluster, zero clusters.
var fuseImages = map[string]string{
	"v3-64k": "", "v2-64k": "", "zstd-64k": "compressed/", "zlib-v2-512": "compressed/",
	"chain": "chain/", "extl2-backed": "chain/", "odd-size": "", "zero": "deep/er/",
}

// fuseNeed skips the test when FUSE cannot be mounted here.
func fuseNeed(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	if os.Geteuid() != 0 {
		if _, err := exec.LookPath("fusermount3"); err != nil {
			t.Skip("not root and no fusermount3")
		}
	}
}

// fuseMountType returns the file system type mounted at dir (per
// /proc/self/mountinfo), or "" when nothing is.
func fuseMountType(dir string) string {
	typ, _, _ := fs.MountType(dir)
	return typ
}

// fuseCleanup makes sure nothing stays mounted on dir when the test ends.
func fuseCleanup(t *testing.T, dir string) {
	t.Cleanup(func() {
		if fuseMountType(dir) != "" {
			exec.Command("fusermount3", "-u", "-z", dir).Run()
			if fuseMountType(dir) != "" {
				syscall.Unmount(dir, syscall.MNT_DETACH)
			}
		}
	})
}

// fuseProc is a `snapfs mount` in the foreground, run directly (not
// through the runner: the tests signal it).
type fuseProc struct {
	cmd    *exec.Cmd
	dir    string
	stderr *lockedBuffer
	done   chan struct{}
	state  *os.ProcessState
}

// fuseMount starts `snapfs [args...]` (a mount command in the
// foreground), waits until dir is mounted, and registers the cleanup:
// lazy unmount, then the process group killed.
func fuseMount(t *testing.T, env []string, dir string, args ...string) *fuseProc {
	t.Helper()
	p := fuseStart(t, env, dir, args...)
	p.waitMounted(t)
	return p
}

func fuseStart(t *testing.T, env []string, dir string, args ...string) *fuseProc {
	t.Helper()
	fuseCleanup(t, dir)
	cmd := exec.Command(snapfsBin, args...)
	cmd.Env = append(cleanEnv(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p := &fuseProc{cmd: cmd, dir: dir, stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		cmd.Wait()
		p.state = cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
		if s := p.stderr.String(); strings.Contains(s, "panic:") || strings.Contains(s, "goroutine ") {
			t.Errorf("snapfs crashed:\n%s", s)
		}
	})
	return p
}

// waitMounted waits (30 s at most) until the mount is there.
func (p *fuseProc) waitMounted(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for fuseMountType(p.dir) != "fuse.snapfs" {
		select {
		case <-p.done:
			t.Fatalf("snapfs %s exited (%v) before mounting:\n%s", strings.Join(p.cmd.Args[1:], " "), p.state, p.stderr)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not mounted after 30s:\n%s", p.dir, p.stderr)
		}
	}
	fuseDeadline(t, 30*time.Second, "stat of the new mount", func() { os.Stat(p.dir) })
}

// logged reports whether the log has a line holding every one of subs,
// waiting a few seconds for it (stderr reaches the test through a pipe).
func (p *fuseProc) logged(subs ...string) bool {
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, line := range strings.Split(p.stderr.String(), "\n") {
			ok := true
			for _, s := range subs {
				ok = ok && strings.Contains(line, s)
			}
			if ok {
				return true
			}
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wait waits (d at most) for the process to exit and returns its exit code.
func (p *fuseProc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.state.ExitCode()
	case <-time.After(d):
		t.Fatalf("snapfs did not exit within %v:\n%s", d, p.stderr)
	}
	return -1
}

// fuseDeadline runs fn, failing the test if it takes longer than d: a
// hung mount must fail the test, not block it.
func fuseDeadline(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: no answer within %v (hung mount?)", what, d)
	}
}

// fuseSHA hashes a file with a deadline.
func fuseSHA(t *testing.T, path string) string {
	t.Helper()
	var sum string
	fuseDeadline(t, 2*time.Minute, "reading "+path, func() { sum = sha256File(t, path) })
	return sum
}

// fuseRaw returns qemu-img convert -O raw of dir/key, as bytes.
func fuseRaw(t *testing.T, dir, key string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ref.raw")
	qemuImg(t, dir, "convert", "-f", "qcow2", "-O", "raw", key, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fuseDataRanges are the ranges qemu-img map calls data (and not zero),
// merged; mixed reports whether some range may read either way
// (data:true, zero:true), where holes cannot be compared.
func fuseDataRanges(m []mapEntry) (data [][2]int64, mixed bool) {
	for _, s := range qemuSegments(m) {
		switch s.class {
		case either:
			mixed = true
		case isData:
			if k := len(data) - 1; k >= 0 && data[k][1] == s.start {
				data[k][1] += s.length
				continue
			}
			data = append(data, [2]int64{s.start, s.start + s.length})
		}
	}
	return data, mixed
}

func fuseSum(r [][2]int64) int64 {
	var n int64
	for _, x := range r {
		n += x[1] - x[0]
	}
	return n
}

// fuseSeekMap walks a file with lseek SEEK_DATA / SEEK_HOLE.
func fuseSeekMap(t *testing.T, path string, size int64) [][2]int64 {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var out [][2]int64
	fuseDeadline(t, time.Minute, "lseek loop on "+path, func() {
		for off := int64(0); off < size; {
			d, err := unix.Seek(fd, off, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				break
			}
			if err != nil {
				t.Errorf("SEEK_DATA %d: %v", off, err)
				return
			}
			h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
			if err != nil || h <= d {
				t.Errorf("SEEK_HOLE %d: %d, %v", d, h, err)
				return
			}
			out = append(out, [2]int64{d, h})
			off = h
		}
	})
	return out
}

func fuseXattr(t *testing.T, path, name string) string {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := unix.Getxattr(path, name, buf)
	if err != nil {
		t.Errorf("getxattr %s %s: %v", path, name, err)
		return ""
	}
	return string(buf[:n])
}

// TestFUSE mounts a MinIO prefix of corpus images and holds every file to
// qemu-img: content by sha256 (cat, dd with several block sizes, unaligned
// reads, 8 concurrent readers), size, mtime, st_blocks, xattrs,
// SEEK_DATA/SEEK_HOLE (a Go lseek loop and qemu-img map on the raw file),
// cp --sparse=always; the errors file and the objects left out (or shown
// with --raw-objects); a single image URL; the listing refreshed every
// --list-ttl, with an open file pinned to its version.
func TestFUSE(t *testing.T) {
	t.Parallel()
	fuseNeed(t)
	dir, corpus, _ := imageSet(t)
	m := harness.StartMinIO(t)
	const bucket, prefix = "fuse", "snaps/"
	m.MakeBucket(t, bucket)
	type served struct {
		im   images.Image
		key  string // in the bucket
		path string // in the mount
	}
	var all []served
	for name, sub := range fuseImages {
		im := byName(t, corpus, name)
		for _, f := range im.Files {
			m.Upload(t, bucket, prefix+sub+f, filepath.Join(dir, f))
		}
		all = append(all, served{im: im, key: prefix + sub + im.Key, path: sub + strings.TrimSuffix(im.Key, ".qcow2") + ".raw"})
	}
	slices.SortFunc(all, func(a, b served) int { return strings.Compare(a.key, b.key) })
	m.Upload(t, bucket, prefix+"luks.qcow2", filepath.Join(dir, "luks.qcow2"))
	readme := filepath.Join(t.TempDir(), "README.txt")
	if err := os.WriteFile(readme, []byte("snapshots of the build VMs\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	m.Upload(t, bucket, prefix+"README.txt", readme)
	env := m.Env()
	client := m.Client(t)

	mnt := t.TempDir()
	p := fuseMount(t, env, mnt, "mount", "--uid", "4321", "--gid", "8765", "s3://"+bucket+"/"+prefix, mnt)

	t.Run("listing", func(t *testing.T) {
		ents, err := os.ReadDir(mnt)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		want := []string{".snapfs-errors", "chain", "compressed", "deep", "odd-size.raw", "v2-64k.raw", "v3-64k.raw"}
		if !slices.Equal(names, want) {
			t.Errorf("the root lists %q, want %q", names, want)
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(mnt, "deep/er"), &st); err != nil || st.Mode != unix.S_IFDIR|0o555 || st.Uid != 4321 || st.Gid != 8765 {
			t.Errorf("deep/er: mode %o owner %d:%d (%v)", st.Mode, st.Uid, st.Gid, err)
		}
		errs, err := os.ReadFile(filepath.Join(mnt, ".snapfs-errors"))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(errs)), "\n")
		if len(lines) != 1 || !strings.HasPrefix(lines[0], "s3://"+bucket+"/"+prefix+"luks.qcow2: ") || !strings.Contains(lines[0], images.Reasons["luks"]) {
			t.Errorf(".snapfs-errors is %q; want one line naming luks.qcow2 with %q", errs, images.Reasons["luks"])
		}
		for _, n := range []string{"README.txt", "README.txt.raw", "luks.raw"} {
			if _, err := os.Stat(filepath.Join(mnt, n)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s: %v, want it left out", n, err)
			}
		}
		if !p.logged(prefix+"README.txt", "not a QCOW2") || !p.logged(prefix+"luks.qcow2", images.Reasons["luks"]) || strings.Count(p.stderr.String(), prefix+"README.txt") != 1 {
			t.Errorf("the log must name README.txt (once, as not QCOW2) and luks.qcow2 with the reason:\n%s", p.stderr)
		}
	})

	for _, s := range all {
		t.Run(s.im.Name, func(t *testing.T) {
			t.Parallel()
			ref := reference(t, dir, s.im.Key)
			path := filepath.Join(mnt, s.path)
			if got := fuseSHA(t, path); got != ref.sha256 {
				t.Fatalf("sha256 %s, qemu-img convert -O raw gives %s", got, ref.sha256)
			}

			// Attributes.
			var st unix.Stat_t
			if err := unix.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			obj, err := client.StatObject(context.Background(), bucket, s.key, minio.StatObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			data, either := fuseDataRanges(ref.mapping)
			alloc := fuseSum(data)
			if st.Size != ref.size || st.Mode != unix.S_IFREG|0o444 || st.Uid != 4321 || st.Gid != 8765 {
				t.Errorf("stat: size %d mode %o owner %d:%d; want %d, 100444, 4321:8765", st.Size, st.Mode, st.Uid, st.Gid, ref.size)
			}
			if mt := time.Unix(st.Mtim.Sec, st.Mtim.Nsec); !mt.Equal(obj.LastModified) {
				t.Errorf("mtime %v, Last-Modified %v", mt, obj.LastModified)
			}
			if !either && st.Blocks != (alloc+511)/512 {
				t.Errorf("st_blocks %d, want %d (%d bytes of data per qemu-img map)", st.Blocks, (alloc+511)/512, alloc)
			}
			for name, want := range map[string]string{
				"user.snapfs.source":       "s3://" + bucket + "/" + s.key,
				"user.snapfs.etag":         strings.Trim(obj.ETag, `"`),
				"user.snapfs.format":       "qcow2",
				"user.snapfs.virtual_size": strconv.FormatInt(ref.size, 10),
			} {
				if got := fuseXattr(t, path, name); got != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
			n, _ := strconv.ParseInt(fuseXattr(t, path, "user.snapfs.allocated"), 10, 64)
			if (n+511)/512 != st.Blocks || (!either && n != alloc) {
				t.Errorf("user.snapfs.allocated = %d; st_blocks %d, qemu-img map data %d", n, st.Blocks, alloc)
			}

			// Holes: the lseek loop and qemu-img map of the raw file agree
			// with qemu-img map of the image.
			if !either {
				if got := fuseSeekMap(t, path, ref.size); !slices.Equal(got, data) {
					t.Errorf("SEEK_DATA/SEEK_HOLE: %v\nqemu-img map:      %v", got, data)
				}
				var rawMap []mapEntry
				fuseDeadline(t, time.Minute, "qemu-img map", func() {
					if err := json.Unmarshal(qemuImg(t, mnt, "map", "-f", "raw", "--output=json", s.path), &rawMap); err != nil {
						t.Error(err)
					}
				})
				if got, _ := fuseDataRanges(rawMap); !slices.Equal(got, data) {
					t.Errorf("qemu-img map -f raw of the mounted file: %v\nqemu-img map of the image:  %v\nsnapfs:\n%s", got, data, p.stderr)
				}
			}
			// cp --sparse=always: same bytes, no more blocks than the
			// allocation.
			cp := filepath.Join(t.TempDir(), "copy.raw")
			fuseDeadline(t, 2*time.Minute, "cp --sparse=always", func() {
				if out, err := exec.Command("cp", "--sparse=always", path, cp).CombinedOutput(); err != nil {
					t.Errorf("cp: %v\n%s", err, out)
				}
			})
			var cst unix.Stat_t
			if err := unix.Stat(cp, &cst); err != nil {
				t.Fatal(err)
			}
			if sha256File(t, cp) != ref.sha256 || cst.Size != ref.size {
				t.Error("the sparse copy differs")
			}
			if !either && cst.Blocks*512 > (alloc+4095)/4096*4096+int64(len(data))*4096 {
				t.Errorf("the sparse copy takes %d bytes (du), the image allocates %d", cst.Blocks*512, alloc)
			}

			raw := fuseRaw(t, dir, s.im.Key)
			// dd with 4 KiB, 1 MiB and odd block sizes.
			for _, bs := range []string{"4k", "1M", "12345", "777"} {
				if s.im.Name != "v3-64k" && s.im.Name != "zstd-64k" && bs == "777" {
					continue // slow; two images are enough
				}
				hw := newHashWriter()
				fuseDeadline(t, 2*time.Minute, "dd bs="+bs, func() {
					var errb bytes.Buffer
					cmd := exec.Command("dd", "if="+path, "bs="+bs, "status=none")
					cmd.Stdout, cmd.Stderr = hw, &errb
					if err := cmd.Run(); err != nil {
						t.Errorf("dd bs=%s: %v %s", bs, err, errb.String())
					}
				})
				if hw.sum() != ref.sha256 || hw.n != ref.size {
					t.Errorf("dd bs=%s: %d bytes, sha256 %s", bs, hw.n, hw.sum())
				}
			}
			fuseUnaligned(t, path, raw)
			fuseConcurrent(t, path, ref.sha256)
		})
	}

	t.Run("raw-objects", func(t *testing.T) {
		t.Parallel()
		mnt2 := t.TempDir()
		fuseMount(t, env, mnt2, "mount", "--raw-objects", "s3://"+bucket+"/"+prefix, mnt2)
		b, err := os.ReadFile(filepath.Join(mnt2, "README.txt"))
		if err != nil || string(b) != "snapshots of the build VMs\n" {
			t.Errorf("README.txt with --raw-objects: %q, %v", b, err)
		}
		if got := fuseXattr(t, filepath.Join(mnt2, "README.txt"), "user.snapfs.format"); got != "raw" {
			t.Errorf("format %q", got)
		}
		// Images are still images.
		if _, err := os.Stat(filepath.Join(mnt2, "chain/chain-base.raw")); err != nil {
			t.Error(err)
		}
	})

	t.Run("single", func(t *testing.T) {
		t.Parallel()
		mnt3 := t.TempDir()
		s := all[slices.IndexFunc(all, func(s served) bool { return s.im.Name == "chain" })]
		fuseMount(t, env, mnt3, "mount", "s3://"+bucket+"/"+s.key, mnt3)
		ents, err := os.ReadDir(mnt3)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != 2 || ents[0].Name() != ".snapfs-errors" || ents[1].Name() != "chain-top.raw" {
			t.Errorf("single image mount lists %v", ents)
		}
		if got := fuseSHA(t, filepath.Join(mnt3, "chain-top.raw")); got != reference(t, dir, s.im.Key).sha256 {
			t.Error("wrong content")
		}
	})

	// A pre-signed URL: the signature shows nowhere (xattr, mount table,
	// log).
	t.Run("presigned", func(t *testing.T) {
		t.Parallel()
		s := all[slices.IndexFunc(all, func(s served) bool { return s.im.Name == "zstd-64k" })]
		u := m.PresignGet(t, bucket, s.key, time.Hour)
		sig := signature(t, u)
		mnt4 := t.TempDir()
		p4 := fuseMount(t, nil, mnt4, "--log-level", "debug", "mount", u, mnt4)
		path := filepath.Join(mnt4, "zstd-64k.raw")
		if got := fuseSHA(t, path); got != reference(t, dir, s.im.Key).sha256 {
			t.Error("wrong content")
		}
		src := fuseXattr(t, path, "user.snapfs.source")
		if !strings.HasSuffix(src, "/"+s.key) || strings.Contains(src, "X-Amz-") || strings.Contains(src, sig) {
			t.Errorf("user.snapfs.source = %q", src)
		}
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		if strings.Contains(string(mi), sig) || strings.Contains(string(mi), "X-Amz-") {
			t.Error("the mount table shows the signature")
		}
		if strings.Contains(p4.stderr.String(), sig) {
			t.Errorf("the log shows the signature:\n%s", p4.stderr)
		}
	})

	t.Run("refresh", func(t *testing.T) {
		t.Parallel()
		fuseRefresh(t, m, bucket, dir, corpus)
	})
}

// fuseUnaligned compares reads at odd offsets and lengths with raw.
func fuseUnaligned(t *testing.T, path string, raw []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := int64(len(raw))
	r := rand.New(rand.NewPCG(uint64(size), 3))
	fuseDeadline(t, 2*time.Minute, "unaligned reads", func() {
		for i := range 100 {
			off := r.Int64N(size)
			n := 1 + r.Int64N(3<<20)
			if i%8 == 0 {
				off = size - 1 - r.Int64N(min(size, 100000))
			}
			buf := make([]byte, n)
			k, err := f.ReadAt(buf, off)
			want := raw[off:min(off+n, size)]
			if k != len(want) || !bytes.Equal(buf[:k], want) || (err != nil && err != io.EOF) {
				t.Errorf("ReadAt(off %d, len %d): %d bytes, %v; want %d matching bytes", off, n, k, err, len(want))
				return
			}
		}
	})
}

// fuseConcurrent reads the whole file from 8 readers at once, each with
// its own block size and opening.
func fuseConcurrent(t *testing.T, path, want string) {
	t.Helper()
	var wg sync.WaitGroup
	sums := make([]string, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.Open(path)
			if err != nil {
				sums[i] = err.Error()
				return
			}
			defer f.Close()
			hw := newHashWriter()
			buf := make([]byte, 4096*(i+1)+i*511)
			if _, err := io.CopyBuffer(hw, struct{ io.Reader }{f}, buf); err != nil {
				sums[i] = err.Error()
				return
			}
			sums[i] = hw.sum()
		}()
	}
	fuseDeadline(t, 3*time.Minute, "8 concurrent readers", wg.Wait)
	for i, s := range sums {
		if s != want {
			t.Errorf("reader %d: %s, want %s", i, s, want)
		}
	}
}

// fuseRefresh: with --list-ttl 1s, objects added to and removed from the
// bucket show up and go away; a file open on a replaced object keeps its
// version, and fails with EIO (and a log line naming the object) where
// that version is needed and gone.
func fuseRefresh(t *testing.T, m *harness.MinIO, bucket, dir string, corpus []images.Image) {
	const prefix = "live/"
	v3 := byName(t, corpus, "v3-64k")
	z := byName(t, corpus, "zstd-64k")
	m.Upload(t, bucket, prefix+"a.qcow2", filepath.Join(dir, v3.Key))
	mnt := t.TempDir()
	p := fuseMount(t, m.Env(), mnt, "mount", "--list-ttl", "1s", "s3://"+bucket+"/"+prefix, mnt)
	a := filepath.Join(mnt, "a.raw")
	// A data range of a.qcow2 far from the start, which the reads below
	// do not bring into the page cache.
	v3ref := reference(t, dir, v3.Key)
	data, _ := fuseDataRanges(v3ref.mapping)
	far := data[len(data)-1]
	if far[0] < 16<<20 {
		t.Fatalf("no data past 16 MiB in %s: %v", v3.Key, data)
	}
	old, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	head := make([]byte, 1<<20)
	if _, err := old.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	// Drop the pages read above but the first MiB, so that reading the
	// old version again needs the object.
	unix.Fadvise(int(old.Fd()), 1<<20, 0, unix.FADV_DONTNEED)

	appears := func(name string, want bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			_, err := os.Stat(filepath.Join(mnt, name))
			if (err == nil) == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: present=%v 20s after the change (%v):\n%s", name, !want, err, p.stderr)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	m.Upload(t, bucket, prefix+"sub/new.qcow2", filepath.Join(dir, z.Key))
	appears("sub/new.raw", true)
	if got := fuseSHA(t, filepath.Join(mnt, "sub/new.raw")); got != reference(t, dir, z.Key).sha256 {
		t.Error("sub/new.raw: wrong content")
	}
	if err := m.Client(t).RemoveObject(context.Background(), bucket, prefix+"sub/new.qcow2", minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	appears("sub/new.raw", false)
	appears("sub", false)

	// Replace a.qcow2 by another image of another size.
	m.Upload(t, bucket, prefix+"a.qcow2", filepath.Join(dir, z.Key))
	zref := reference(t, dir, z.Key)
	deadline := time.Now().Add(20 * time.Second)
	for {
		fi, err := os.Stat(a)
		if err == nil && fi.Size() == zref.size {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a.raw does not show the new version after 20s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := fuseSHA(t, a); got != zref.sha256 {
		t.Error("a.raw: the new version reads wrong")
	}
	// The old handle keeps its version: its size, and the cached pages...
	if fi, err := old.Stat(); err != nil || fi.Size() != v3ref.size {
		t.Errorf("the open file's size changed: %v", err)
	}
	buf := make([]byte, 1<<20)
	if _, err := old.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, head) {
		t.Errorf("the open file's cached content: %v", err)
	}
	// ...and fails clearly where it needs the gone version.
	fuseDeadline(t, time.Minute, "read of a replaced version", func() {
		_, err = old.ReadAt(buf[:min(int64(len(buf)), far[1]-far[0])], far[0])
	})
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("reading the replaced version: %v, want EIO", err)
	}
	if !p.logged(prefix+"a.qcow2", "read failed", "object changed since it was opened") {
		t.Errorf("no log line naming the replaced object:\n%s", p.stderr)
	}
}

// TestFUSEFaults: MinIO stopped during a read gives the reader EIO and a
// log line naming the object, quickly; once MinIO is back the same file
// reads right. Every step has a deadline.
func TestFUSEFaults(t *testing.T) {
	t.Parallel()
	fuseNeed(t)
	dir := t.TempDir()
	images.Large(t, dir, "large.qcow2", 128<<20, 3)
	raw := fuseRaw(t, dir, "large.qcow2")
	m := harness.StartMinIO(t)
	const bucket, key = "fuse-faults", "vm/large.qcow2"
	m.MakeBucket(t, bucket)
	m.Upload(t, bucket, key, filepath.Join(dir, "large.qcow2"))
	mnt := t.TempDir()
	p := fuseMount(t, m.Env(), mnt, "--retries", "2", "mount", "s3://"+bucket+"/vm/", mnt)
	path := filepath.Join(mnt, "large.raw")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	fuseDeadline(t, time.Minute, "first read", func() { _, err = f.ReadAt(buf, 0) })
	if err != nil || !bytes.Equal(buf, raw[:len(buf)]) {
		t.Fatalf("first read: %v", err)
	}

	m.Stop()
	start := time.Now()
	fuseDeadline(t, time.Minute, "read with MinIO stopped", func() { _, err = f.ReadAt(buf, 96<<20) })
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("read with MinIO stopped: %v, want EIO", err)
	}
	t.Logf("EIO after %v", time.Since(start).Round(time.Millisecond))
	if !p.logged(key, "read failed") {
		t.Errorf("no log line naming %s:\n%s", key, p.stderr)
	}
	// The mount itself still answers.
	fuseDeadline(t, 30*time.Second, "stat with MinIO stopped", func() { _, err = os.Stat(path) })
	if err != nil {
		t.Errorf("stat with MinIO stopped: %v", err)
	}

	m.Start(t)
	fuseDeadline(t, time.Minute, "read once MinIO is back", func() { _, err = f.ReadAt(buf, 96<<20) })
	if err != nil || !bytes.Equal(buf, raw[96<<20:96<<20+len(buf)]) {
		t.Errorf("read once MinIO is back: %v", err)
	}
	if got := fuseSHA(t, path); got != sha256Bytes(raw) {
		t.Error("the whole file reads wrong after the fault")
	}
}

func sha256Bytes(b []byte) string {
	hw := newHashWriter()
	hw.Write(b)
	return hw.sum()
}

// TestFUSEUnmount: SIGTERM and SIGINT unmount cleanly (also with a reader
// active, which then ends, and no stale mount stays); `snapfs umount`
// refuses a busy mount, --lazy detaches it and the process exits once the
// last file closes; --daemon returns once the mount is ready.
func TestFUSEUnmount(t *testing.T) {
	t.Parallel()
	fuseNeed(t)
	dir := t.TempDir()
	images.Large(t, dir, "big.qcow2", 64<<20, 5)
	raw := fuseRaw(t, dir, "big.qcow2")
	src := fileURL(dir) + "/"

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String()+"-idle", func(t *testing.T) {
			t.Parallel()
			mnt := t.TempDir()
			p := fuseMount(t, nil, mnt, "mount", src, mnt)
			p.cmd.Process.Signal(sig)
			if code := p.wait(t, 15*time.Second); code != 0 {
				t.Errorf("exit %d after %v:\n%s", code, sig, p.stderr)
			}
			if typ := fuseMountType(mnt); typ != "" {
				t.Errorf("still mounted (%s) after %v", typ, sig)
			}
		})
	}

	t.Run("SIGTERM-reader", func(t *testing.T) {
		t.Parallel()
		mnt := t.TempDir()
		p := fuseMount(t, nil, mnt, "mount", src, mnt)
		f, err := os.Open(filepath.Join(mnt, "big.raw"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// A slow reader: 1 MiB every 50 ms.
		readerDone := make(chan error, 1)
		var got int64
		go func() {
			buf := make([]byte, 1<<20)
			for off := int64(0); ; off += int64(len(buf)) {
				n, err := f.ReadAt(buf, off)
				if n > 0 && !bytes.Equal(buf[:n], raw[off:off+int64(n)]) {
					readerDone <- fmt.Errorf("wrong bytes at %d", off)
					return
				}
				got += int64(n)
				if err != nil {
					readerDone <- err
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
		time.Sleep(300 * time.Millisecond)
		p.cmd.Process.Signal(syscall.SIGTERM)
		// Detached at once: no new opens, and out of the mount table.
		deadline := time.Now().Add(5 * time.Second)
		for fuseMountType(mnt) != "" && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if typ := fuseMountType(mnt); typ != "" {
			t.Errorf("still in mountinfo (%s) 5s after SIGTERM with a reader", typ)
		}
		// The process exits within its grace period even though the
		// reader goes on; the reader then ends (EOF if it was quick
		// enough, an error otherwise) without hanging.
		if code := p.wait(t, 20*time.Second); code != 0 {
			t.Errorf("exit %d:\n%s", code, p.stderr)
		}
		select {
		case err := <-readerDone:
			t.Logf("reader ended after %d bytes: %v", got, err)
			if err != nil && err != io.EOF && !errors.Is(err, syscall.ENOTCONN) && !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENODEV) {
				t.Errorf("reader: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("the reader hangs after snapfs exited")
		}
	})

	t.Run("umount", func(t *testing.T) {
		t.Parallel()
		mnt := t.TempDir()
		p := fuseMount(t, nil, mnt, "mount", src, mnt)
		f, err := os.Open(filepath.Join(mnt, "big.raw"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		res := snapfs(t, "umount", mnt)
		if res.code != 1 || !strings.Contains(res.stderr, "busy") {
			t.Errorf("umount of a busy mount: want exit 1 and \"busy\":\n%s", res)
		}
		if fuseMountType(mnt) != "fuse.snapfs" {
			t.Fatal("a refused umount unmounted")
		}
		res = snapfs(t, "umount", "--lazy", mnt)
		if res.code != 0 {
			t.Fatalf("umount --lazy:\n%s", res)
		}
		if fuseMountType(mnt) != "" {
			t.Error("still mounted after umount --lazy")
		}
		// The open file is served to its end...
		hw := newHashWriter()
		fuseDeadline(t, time.Minute, "reading the detached file", func() {
			if _, err := io.Copy(hw, f); err != nil {
				t.Error(err)
			}
		})
		if hw.sum() != sha256Bytes(raw) {
			t.Error("the detached file read wrong")
		}
		select {
		case <-p.done:
			t.Error("snapfs exited while a file was open on the detached mount")
		default:
		}
		// ...and the process exits once it is closed.
		f.Close()
		if code := p.wait(t, 15*time.Second); code != 0 {
			t.Errorf("exit %d:\n%s", code, p.stderr)
		}
		// An idle mount unmounts plainly; a directory that is no snapfs
		// mount is refused.
		mnt2 := t.TempDir()
		p2 := fuseMount(t, nil, mnt2, "mount", src, mnt2)
		if res := snapfs(t, "umount", mnt2); res.code != 0 {
			t.Errorf("umount:\n%s", res)
		}
		if code := p2.wait(t, 15*time.Second); code != 0 || fuseMountType(mnt2) != "" {
			t.Errorf("after umount: exit %d, mounted %q", code, fuseMountType(mnt2))
		}
		if res := snapfs(t, "umount", t.TempDir()); res.code != 1 || !strings.Contains(res.stderr, "not mounted") {
			t.Errorf("umount of a plain directory:\n%s", res)
		}
	})

	t.Run("daemon", func(t *testing.T) {
		t.Parallel()
		mnt := t.TempDir()
		fuseCleanup(t, mnt)
		logf := filepath.Join(t.TempDir(), "snapfs.log")
		start := time.Now()
		res := runCLI(t, cliRun{args: []string{"--log-level", "info", "mount", "--daemon", "--log-file", logf, src, mnt}, timeout: time.Minute})
		if res.code != 0 {
			t.Fatalf("mount --daemon:\n%s", res)
		}
		// Ready when it returns.
		if typ := fuseMountType(mnt); typ != "fuse.snapfs" {
			t.Fatalf("mount --daemon returned after %v with nothing mounted (%q)", time.Since(start), typ)
		}
		if got := fuseSHA(t, filepath.Join(mnt, "big.raw")); got != sha256Bytes(raw) {
			t.Error("wrong content through the daemon")
		}
		if res := snapfs(t, "umount", mnt); res.code != 0 {
			t.Fatalf("umount:\n%s", res)
		}
		deadline := time.Now().Add(15 * time.Second)
		for {
			b, _ := os.ReadFile(logf)
			if strings.Contains(string(b), "msg=unmounted") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the daemon did not log its end within 15s:\n%s", b)
			}
			time.Sleep(50 * time.Millisecond)
		}
		// A daemon that cannot mount fails in the foreground with the reason.
		res = runCLI(t, cliRun{args: []string{"mount", "--daemon", fileURL(filepath.Join(dir, "missing.qcow2")), mnt}, timeout: time.Minute})
		if res.code != 1 || !strings.Contains(res.stderr, "missing.qcow2") || !strings.Contains(res.stderr, "not found") {
			t.Errorf("mount --daemon of a missing object:\n%s", res)
		}
	})
}

// fuseHelperOnce builds cmd/mount.snapfs next to the CLI.
var (
	fuseHelperOnce sync.Once
	fuseHelperBin  string
	fuseHelperErr  error
)

func fuseHelper(t *testing.T) string {
	t.Helper()
	fuseHelperOnce.Do(func() {
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			fuseHelperErr = err
			return
		}
		bin := filepath.Join(workDir, "mount.snapfs")
		cmd := exec.Command("go", "build", "-o", bin, "./cmd/mount.snapfs")
		cmd.Dir = filepath.Dir(strings.TrimSpace(string(out)))
		if out, err := cmd.CombinedOutput(); err != nil {
			fuseHelperErr = fmt.Errorf("go build ./cmd/mount.snapfs: %v\n%s", err, out)
			return
		}
		fuseHelperBin = bin
	})
	if fuseHelperErr != nil {
		t.Fatal(fuseHelperErr)
	}
	return fuseHelperBin
}

// TestFUSEMountHelper: mount.snapfs turns mount(8)'s arguments into a
// daemon mount (checked with -f -v), and `mount -t fuse.snapfs` and an
// fstab line (mount -T) work with it installed as /sbin/mount.fuse.snapfs.
func TestFUSEMountHelper(t *testing.T) {
	t.Parallel()
	fuseNeed(t)
	helper := fuseHelper(t)
	dir := t.TempDir()
	images.Large(t, dir, "vm.qcow2", 8<<20, 7)
	raw := fuseRaw(t, dir, "vm.qcow2")
	src := fileURL(dir) + "/"
	env := append(cleanEnv(), "SNAPFS_PROGRAM="+snapfsBin)

	// -f -v: the command it would run.
	cmd := exec.Command(helper, src, "/mnt/x", "-f", "-v", "-o", "rw,allow_other,uid=10,gid=20,list_ttl=30,cache_size=1G,raw_objects,_netdev,noauto,x-systemd.automount,endpoint=http://127.0.0.1:9000,region=eu-west-1,retries=3,log_file=/tmp/l")
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	want := snapfsBin + " mount --daemon --allow-other --uid 10 --gid 20 --list-ttl 30s --cache-size 1G --raw-objects --endpoint http://127.0.0.1:9000 --region eu-west-1 --retries 3 --log-file /tmp/l -- " + src + " /mnt/x"
	if err != nil || !strings.Contains(string(out), want) {
		t.Errorf("mount.snapfs -f -v: %v\n%s\nwant the command %s", err, out, want)
	}
	cmd = exec.Command(helper, src, "/mnt/x", "-o", "bogus_option")
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "bogus_option") {
		t.Errorf("an unknown option: %v\n%s", err, out)
	}

	// The real thing, through mount(8).
	if _, err := exec.LookPath("mount"); err != nil {
		t.Skip("no mount(8)")
	}
	if os.Geteuid() != 0 {
		t.Skip("mount -t fuse.snapfs needs root here")
	}
	const installed = "/sbin/mount.fuse.snapfs"
	if target, err := os.Readlink(installed); err == nil && strings.Contains(target, "snapfs-e2e-") {
		os.Remove(installed) // left by a test run that was killed
	}
	if _, err := os.Lstat(installed); err == nil {
		t.Skipf("%s exists already: not replacing it", installed)
	}
	if err := os.Symlink(helper, installed); err != nil {
		t.Skipf("cannot install %s: %v", installed, err)
	}
	t.Cleanup(func() { os.Remove(installed) })

	check := func(mnt string) {
		t.Helper()
		if typ := fuseMountType(mnt); typ != "fuse.snapfs" {
			t.Fatalf("nothing mounted on %s (%q)", mnt, typ)
		}
		if got := fuseSHA(t, filepath.Join(mnt, "vm.raw")); got != sha256Bytes(raw) {
			t.Error("wrong content")
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(mnt, "vm.raw"), &st); err != nil || st.Uid != 77 {
			t.Errorf("uid=77 was not applied: uid %d (%v)", st.Uid, err)
		}
		// The kernel may hold the just-closed file a moment longer: umount
		// then says "target is busy". Retry that for a few seconds.
		for try := 0; ; try++ {
			out, err := exec.Command("umount", mnt).CombinedOutput()
			if err == nil {
				break
			}
			if !strings.Contains(string(out), "busy") || try == 20 {
				t.Errorf("umount: %v\n%s", err, out)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if fuseMountType(mnt) != "" {
			t.Error("still mounted after umount")
		}
	}
	logf := filepath.Join(t.TempDir(), "log")
	mnt := t.TempDir()
	fuseCleanup(t, mnt)
	c := exec.Command("mount", "-t", "fuse.snapfs", "-o", "uid=77,list_ttl=5,log_file="+logf, src, mnt)
	c.Env = env
	fuseDeadline(t, time.Minute, "mount -t fuse.snapfs", func() {
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("mount -t fuse.snapfs: %v\n%s", err, out)
		}
	})
	check(mnt)

	// An fstab line (an fstab of the test's own, with mount -T).
	mnt2 := t.TempDir()
	fuseCleanup(t, mnt2)
	fstab := filepath.Join(t.TempDir(), "fstab")
	line := fmt.Sprintf("%s %s fuse.snapfs ro,noauto,nofail,_netdev,uid=77,log_file=%s 0 0\n", src, mnt2, logf)
	if err := os.WriteFile(fstab, []byte("# test fstab\n"+line), 0o644); err != nil {
		t.Fatal(err)
	}
	c = exec.Command("mount", "-T", fstab, mnt2)
	c.Env = env
	fuseDeadline(t, time.Minute, "mount -T fstab", func() {
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("mount -T %s %s (%s): %v\n%s", fstab, mnt2, strings.TrimSpace(line), err, out)
		}
	})
	check(mnt2)
}
