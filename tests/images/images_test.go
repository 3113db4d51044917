package images

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestImagesAgreeWithQEMU checks the images themselves against QEMU: every
// image to be served passes `qemu-img check` and converts to raw, and every
// image refused at the header is refused by `qemu-img info` too.
func TestImagesAgreeWithQEMU(t *testing.T) {
	dir := t.TempDir()
	if keep := os.Getenv("SNAPFS_IMAGES_KEEP"); keep != "" {
		dir = keep // leave the images there, to look at by hand
	}
	start := time.Now()
	corpus := Corpus(t, dir)
	t.Logf("Corpus: %d images in %v", len(corpus), time.Since(start))
	start = time.Now()
	mal := Malformed(t, dir)
	t.Logf("Malformed: %d images in %v", len(mal), time.Since(start))
	names := map[string]bool{}
	for _, im := range append(corpus, mal...) {
		if names[im.Name] {
			t.Errorf("duplicate image name %q", im.Name)
		}
		names[im.Name] = true
		if im.Expect == Refuse && im.Reason == "" {
			t.Errorf("%s: refused without a reason", im.Name)
		}
		qemu := func(args ...string) (string, error) {
			cmd := exec.Command("qemu-img", args...)
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		raw := filepath.Join(t.TempDir(), im.Name+".raw")
		switch {
		case im.Expect == Serve:
			out, err := qemu("check", im.Key)
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != im.Check {
				t.Errorf("%s: qemu-img check exits %d, want %d:\n%s", im.Name, code, im.Check, out)
			}
			if out, err := qemu("convert", "-O", "raw", im.Key, raw); err != nil {
				t.Errorf("%s: qemu-img convert: %v\n%s", im.Name, err, out)
			}
		case im.Name == "l1-past-eof" || im.Name == "l2-past-eof":
			// QEMU reads past the end of a file as zeros, so it
			// accepts these; an object store answers 416.
		case im.Stage == StageHeader && !strings.HasPrefix(im.Name, "sample-"):
			if out, err := qemu("info", "-f", "qcow2", im.Key); err == nil {
				t.Errorf("%s: qemu-img info accepts it:\n%s", im.Name, out)
			} else {
				t.Logf("%s: qemu says %s", im.Name, strings.TrimSpace(out))
			}
		case im.Stage == StageRead:
			if out, err := qemu("convert", "-O", "raw", im.Key, raw); err == nil {
				t.Errorf("%s: qemu-img convert accepts it:\n%s", im.Name, out)
			} else {
				t.Logf("%s: qemu says %s", im.Name, strings.TrimSpace(out))
			}
		}
	}
}
