package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapfs/snapfs/tests/images"
)

// TestCatFullDisk: a write that fails with ENOSPC (/dev/full answers every
// write that way) ends cat with exit 1 and an error that says so, never a
// hang, a panic or a silent success.
func TestCatFullDisk(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("skipped: no /dev/full on this machine")
	}
	dir := t.TempDir()
	images.Large(t, dir, "vm.qcow2", 8<<20, 3)
	res := snapfs(t, "cat", filepath.Join(dir, "vm.qcow2"), "-o", "/dev/full")
	if res.code != 1 || !strings.Contains(res.stderr, "no space left on device") {
		t.Fatalf("cat -o /dev/full: want exit 1 and \"no space left on device\":\n%s", res)
	}
}
