package fs

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
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
//
// The mapping is read by a child process (mmapProbe): a page fault on a
// FUSE file is not a system call, so the Go runtime cannot stop the
// faulting thread for a garbage collection, and when the same process
// serves the fault, the collection waits for the server that waits for
// it. That deadlock hung this test once (a GC in bufpool.Get while the
// test thread faulted on the mapping).
func TestDirectIO(t *testing.T) {
	dir, mnt := mountTop(t)
	p := mnt + "/top.raw"
	ref := rawOf(t, dir, "sub/top.qcow2")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), mmapProbeEnv+"="+p)
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("mmap probe: %v: %s%s", err, out, stderr)
	}
	var res mmapResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("mmap probe printed %q: %v", out, err)
	}
	if res.Fail != "" {
		t.Fatal("mmap probe:", res.Fail)
	}
	if res.ReadSHA != sha(ref) {
		t.Fatal("content differs from qemu-img convert")
	}
	if res.Err != "" {
		t.Skipf("mmap of a direct-I/O FUSE file: %s (kernels before 6.6 refuse it); the page cache was not checked", res.Err)
	}
	if res.Pages != (len(ref)+os.Getpagesize()-1)/os.Getpagesize() {
		t.Fatalf("mmap probe saw %d pages, want %d", res.Pages, (len(ref)+os.Getpagesize()-1)/os.Getpagesize())
	}
	if res.Resident != 0 {
		t.Errorf("%d of %d pages of %s are in the page cache after a read", res.Resident, res.Pages, p)
	}
	if res.SHA != sha(ref) {
		t.Error("mmap reads other bytes than qemu-img convert")
	}
}

// mmapProbeEnv, when set to a file's path, makes the test binary run
// mmapProbe on it instead of its tests.
const mmapProbeEnv = "SNAPFS_TEST_MMAP_PROBE"

// mmapResult is what mmapProbe prints: the sha256 of the file as read(2)
// returned it, the file's pages, how many of them were in the page cache
// after that read, and the sha256 of a mapping of the file; or why it
// could not be mapped (Err) or probed (Fail).
type mmapResult struct {
	ReadSHA         string
	Pages, Resident int
	SHA, Err, Fail  string
}

func TestMain(m *testing.M) {
	if p := os.Getenv(mmapProbeEnv); p != "" {
		res := mmapProbe(p)
		b, _ := json.Marshal(res)
		os.Stdout.Write(b)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mmapProbe reads the file at p whole, then maps it through the same
// descriptor (the kernel drops a FUSE file's cached pages when it is
// opened again), counts its pages in the page cache (mincore, before the
// mapping itself faults pages in) and hashes the mapping.
func mmapProbe(p string) mmapResult {
	var res mmapResult
	f, err := os.Open(p)
	if err != nil {
		res.Fail = err.Error()
		return res
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil || len(b) == 0 {
		res.Fail = fmt.Sprintf("read: %d bytes, %v", len(b), err)
		return res
	}
	res.ReadSHA = sha(b)
	m, err := unix.Mmap(int(f.Fd()), 0, len(b), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		res.Fail = "mincore: " + e.Error()
		return res
	}
	res.Pages = len(vec)
	for _, v := range vec {
		res.Resident += int(v & 1)
	}
	res.SHA = sha(m)
	return res
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
