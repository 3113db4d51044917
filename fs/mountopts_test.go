package fs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mountTop mounts the test tree's image sub/top.qcow2 alone; it returns the
// tree's directory and the mount point.
func mountTop(t *testing.T) (dir, mnt string) {
	needFUSE(t)
	dir = testTree(t)
	f, err := New(context.Background(), fileStore(t, dir), "sub/top.qcow2", Options{ListTTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	_, mnt = mountFS(t, f)
	return dir, mnt
}

// TestReadPathOptions checks the read path a mount asks the kernel for:
// max_read of MaxRead, and the readahead window of ReadAheadKB on the
// mount's backing device.
func TestReadPathOptions(t *testing.T) {
	_, mnt := mountTop(t)
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 10 || unescapeMountinfo(fields[4]) != mnt {
			continue
		}
		found = true
		if want := fmt.Sprintf("max_read=%d", MaxRead); !strings.Contains(line, want) {
			t.Errorf("mount options of %s lack %s: %s", mnt, want, line)
		}
	}
	if !found {
		t.Fatalf("%s not in mountinfo", mnt)
	}
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		t.Fatal(err)
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	got, err := os.ReadFile(p)
	if err != nil {
		t.Skipf("no bdi file for the mount: %v", err)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(got))); n != ReadAheadKB {
		t.Errorf("%s = %s, want %d", p, strings.TrimSpace(string(got)), ReadAheadKB)
	}
}

// TestDirectIO: files are opened for direct I/O, so reading one leaves
// none of it in the kernel's page cache (the device's memory tier is the
// only cache), and mmap, where the kernel allows it (6.6), still reads the
// same bytes.
func TestDirectIO(t *testing.T) {
	dir, mnt := mountTop(t)
	p := mnt + "/top.raw"
	ref := rawOf(t, dir, "sub/top.qcow2")
	if got := readAll(t, p); sha(got) != sha(ref) {
		t.Fatal("content differs from qemu-img convert")
	}
	fd, err := unix.Open(p, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	m, err := unix.Mmap(fd, 0, len(ref), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Skipf("mmap of a direct-I/O FUSE file: %v (kernels before 6.6 refuse it); the page cache was not checked", err)
	}
	defer unix.Munmap(m)
	// Residency first, before the mapping itself faults pages in.
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal("mincore:", e)
	}
	resident := 0
	for _, v := range vec {
		resident += int(v & 1)
	}
	if resident != 0 {
		t.Errorf("%d of %d pages of %s are in the page cache after a read", resident, len(vec), p)
	}
	if sha(m) != sha(ref) {
		t.Error("mmap reads other bytes than qemu-img convert")
	}
}

// TestConcurrentAsyncReads: io_uring reads of a direct-I/O file reach the
// device together. Without async direct I/O (CAP_ASYNC_DIO) the kernel
// ran them one at a time: fio at QD32 made 72 IOPS through a 10 ms store.
func TestConcurrentAsyncReads(t *testing.T) {
	needFUSE(t)
	needTools(t)
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("fio not installed")
	}
	dir := t.TempDir()
	makeImage(t, dir, "img.qcow2", "", "256M", "write -P 7 0 256M")
	st := &slowStore{Store: fileStore(t, dir), delay: 10 * time.Millisecond}
	f, err := New(context.Background(), st, "img.qcow2", Options{ListTTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	_, mnt := mountFS(t, f)
	st.maxSeen.Store(0)
	out, err := exec.Command("fio", "--name=r", "--filename="+mnt+"/img.raw", "--rw=randread", "--bs=4k",
		"--ioengine=io_uring", "--iodepth=16", "--direct=0", "--norandommap", "--runtime=2", "--time_based").CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "io_uring") && strings.Contains(string(out), "not supported") {
			t.Skipf("fio has no io_uring here: %s", out)
		}
		t.Fatalf("fio: %v\n%s", err, out)
	}
	if m := st.maxSeen.Load(); m < 4 {
		t.Fatalf("at most %d store reads at once under fio io_uring QD16, want at least 4\n%s", m, out)
	}
}
