package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snapfs/snapfs/tests/images"
)

// memBound is the most memory (max RSS) one run may use on a hostile image.
const memBound = 200 << 20

// TestRefused runs info, map, cat and check on every image to refuse
// (encrypted corpus images, malformed headers, hostile backing setups,
// QEMU's non-QCOW2 samples): each must fail with the expected reason, in
// bounded time and memory, without a crash.
func TestRefused(t *testing.T) {
	t.Parallel()
	dir, corpus, malformed := imageSet(t)
	var refused []images.Image
	for _, im := range append(append([]images.Image{}, corpus...), malformed...) {
		if im.Expect == images.Refuse {
			refused = append(refused, im)
		}
	}
	if len(refused) < 30 {
		t.Errorf("only %d images to refuse", len(refused))
	}
	for _, im := range refused {
		t.Run(im.Name, func(t *testing.T) {
			t.Parallel()
			url := fileURL(filepath.Join(dir, im.Key))
			run := func(args ...string) *result {
				t.Helper()
				res := runCLI(t, cliRun{args: args, timeout: 30 * time.Second})
				if res.maxRSS > memBound {
					t.Errorf("used %d MiB (bound %d MiB):\n%s", res.maxRSS>>20, memBound>>20, res)
				}
				return res
			}
			// failsWith: exit 1, and the error names the object and the reason.
			failsWith := func(res *result, want int) {
				t.Helper()
				if res.code != want {
					t.Errorf("exit %d, want %d:\n%s", res.code, want, res)
					return
				}
				checkError(t, res, im.Key, im.Reason)
			}

			res := run("info", "--json", url)
			switch im.Stage {
			case images.StageHeader:
				failsWith(res, 1)
			case images.StageOpen, images.StageRead:
				if res.code != 0 {
					t.Errorf("info exits %d, want 0 with the image described:\n%s", res.code, res)
					break
				}
				var info map[string]any
				if err := json.Unmarshal(res.stdout, &info); err != nil {
					t.Fatalf("info --json: %v\n%s", err, res.stdout)
				}
				servable, ok := info["servable"].(bool)
				reason, _ := info["reason"].(string)
				switch {
				case !ok:
					t.Errorf("info: servable = %v, want a bool", info["servable"])
				case im.Stage == images.StageOpen && servable:
					t.Errorf("info: servable true for an image to refuse at open")
				case im.Stage == images.StageOpen && !strings.Contains(reason, im.Reason):
					t.Errorf("info: reason %q does not contain %q", reason, im.Reason)
				}
			}

			res = run("map", "--json", url)
			failsWith(res, 1)
			if res.code != 0 && len(res.stdout) > 0 && im.Stage != images.StageRead {
				t.Errorf("map printed extents of an image it refuses:\n%s", tail(string(res.stdout), 500))
			}

			out := filepath.Join(t.TempDir(), "out.raw")
			res = run("cat", url, "-o", out)
			failsWith(res, 1)
			res = run("cat", url)
			failsWith(res, 1)

			// check: 1 when it cannot open the image, 2 for corruption
			// found in metadata it could open.
			res = run("check", url)
			if im.Stage == images.StageRead {
				if res.code != 2 {
					t.Errorf("check exits %d, want 2 (corruption):\n%s", res.code, res)
				}
			} else {
				failsWith(res, 1)
			}
		})
	}
}

// checkError checks that a failed run says `snapfs: <url>...: <reason>`
// on stderr: it names the object and the reason.
func checkError(t *testing.T, res *result, key, reason string) {
	t.Helper()
	line := lastLine(res.stderr)
	if !strings.HasPrefix(line, "snapfs: ") {
		t.Errorf("the error does not start with \"snapfs: \":\n%s", res)
	}
	if !strings.Contains(res.stderr, key) {
		t.Errorf("the error does not name the object %s:\n%s", key, res)
	}
	if !strings.Contains(res.stderr, reason) {
		t.Errorf("the error does not contain %q:\n%s", reason, res)
	}
}

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return lines[len(lines)-1]
}
