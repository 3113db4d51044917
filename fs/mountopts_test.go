package fs

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReadPathOptions checks the read path a mount asks the kernel for:
// max_read of MaxRead, and the readahead window of ReadAheadKB on the
// mount's backing device.
func TestReadPathOptions(t *testing.T) {
	needFUSE(t)
	dir := testTree(t)
	f, err := New(context.Background(), fileStore(t, dir), "sub/top.qcow2", Options{ListTTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	_, mnt := mountFS(t, f)
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
