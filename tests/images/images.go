// Package images makes the QCOW2 test images every snapfs suite uses, with
// QEMU's own tools (qemu-img and qemu-io), so that what snapfs reads was
// written by the reference implementation and not by the team.
//
// Corpus gives well-formed images (most to be served, a few to be refused),
// Malformed gives byte-patched and hostile ones (all to be refused), and
// NonQCOW2 gives QEMU's sample images of other formats, unchanged.
package images

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// What an image expects of snapfs.
const (
	Serve  = "serve"
	Refuse = "refuse"
)

// Image is one test image in the directory given to Corpus or Malformed.
type Image struct {
	Name string
	// Files are all the files the image needs (itself, its backing files,
	// its external data file), relative to the directory.
	Files []string
	// Key is the top image file name, relative to the directory.
	Key string
	// Expect is Serve or Refuse.
	Expect string
	// Reason is a substring expected in snapfs's error (or in the "reason"
	// of `info --json`) when the image is refused. See Reasons.
	Reason string
	// Stage says, for a refused image, where snapfs finds the problem:
	// StageHeader (info fails, exit 1), StageOpen (the header is valid, so
	// info describes it with "servable": false and the reason, while map
	// and cat fail) or StageRead (the header is valid and info may call it
	// servable; map or cat fail when they reach the bad metadata).
	Stage string
	// Check is the exit code `qemu-img check` (and so `snapfs check`)
	// gives: 0 clean, 2 corruption, 3 leaked clusters only.
	Check int
}

// Stages of a refused image.
const (
	StageHeader = "header"
	StageOpen   = "open"
	StageRead   = "read"
)

// Reasons maps a refused image's Name to the substring expected in the
// error. It is a table so that the wording can follow the reader's messages;
// every entry must still name the problem.
var Reasons = map[string]string{
	// Corpus: valid images that snapfs refuses.
	"luks": "encrypted with LUKS",
	"aes":  "encrypted with AES",

	// Malformed: byte-patched headers.
	"bad-magic":         "not a QCOW2",
	"version-4":         "unsupported QCOW2 version 4",
	"cluster-bits-8":    "cluster_bits 8",
	"cluster-bits-22":   "cluster size 2^22",
	"l1-too-small":      "does not cover the virtual size",
	"l1-past-eof":       "L1 table",
	"l1-huge":           "l1_size 2147483647",
	"refcount-order-7":  "refcount_order 7",
	"ext-overrun":       "header extension",
	"incompat-bit-9":    unknownFeatureName,
	"snapshots-huge":    "nb_snapshots 4294967295",
	"backing-name-huge": "backing file name too long",
	"backing-absolute":  "\"/etc/passwd\" is absolute",
	"backing-dotdot":    "\"../escape.qcow2\" escapes",
	"backing-json":      "is a json: pseudo-protocol",
	"backing-http":      "\"http://example.com/x\" looks like a protocol",
	"backing-loop":      "backing loop",
	"backing-self":      "backing loop",
	"backing-missing":   "not found",
	"sample-not-qcow2":  "not a QCOW2", // every NonQCOW2 image
	"truncated-header":  "truncated",
	"empty-object":      "not a QCOW2",
	"l2-past-eof":       "L2 table",
}

// reason returns the table entry for name, failing loudly on a typo.
func reason(t testing.TB, name string) string {
	r, ok := Reasons[name]
	if !ok {
		t.Fatalf("images: no entry in Reasons for %q", name)
	}
	return r
}

// builder runs QEMU's tools in one directory.
type builder struct {
	t   testing.TB
	dir string
}

func newBuilder(t testing.TB, dir string) *builder {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io", "bunzip2"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("images: %s is needed to make the test images (apt-get install qemu-utils qemu-block-extra bzip2): %v", tool, err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return &builder{t: t, dir: dir}
}

// run runs a command in the directory and returns its standard output.
func (b *builder) run(name string, args ...string) string {
	b.t.Helper()
	return b.runTries(1, name, args...)
}

// runFlaky is run for commands that may fail for reasons outside the test:
// qemu-img's LUKS key-slot calibration fails with "Unable to get accurate
// CPU usage" when the thread CPU clock reads 0 ms on a loaded machine.
func (b *builder) runFlaky(name string, args ...string) string {
	b.t.Helper()
	return b.runTries(5, name, args...)
}

// runTries runs a command in the image directory, up to tries times until
// it succeeds, and fails the test if it never does.
func (b *builder) runTries(tries int, name string, args ...string) string {
	b.t.Helper()
	for try := 1; ; try++ {
		out, err := b.try(name, args...)
		if err == nil {
			return out
		}
		if try >= tries {
			b.t.Fatalf("%v", err)
		}
	}
}

func (b *builder) try(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = b.dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	if os.Getenv("SNAPFS_IMAGES_TRACE") != "" {
		b.t.Logf("images: %v %s %s", time.Since(start).Round(time.Millisecond), name, strings.Join(args, " "))
	}
	if err != nil {
		return "", fmt.Errorf("images: %s %s (in %s): %v\n%s%s", name, strings.Join(args, " "), b.dir, err, out.String(), errb.String())
	}
	return out.String(), nil
}

// create runs `qemu-img create -f qcow2 [-o opts] file size`.
func (b *builder) create(file, size, opts string, extra ...string) {
	b.t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	args = append(args, extra...)
	args = append(args, file, size)
	b.run("qemu-img", args...)
}

// io runs qemu-io commands against a file, many per invocation.
func (b *builder) io(format, file string, cmds ...string) {
	b.t.Helper()
	for len(cmds) > 0 {
		n := min(len(cmds), 200)
		args := []string{"-f", format}
		for _, c := range cmds[:n] {
			args = append(args, "-c", c)
		}
		args = append(args, file)
		b.run("qemu-io", args...)
		cmds = cmds[n:]
	}
}

func (b *builder) path(file string) string { return filepath.Join(b.dir, file) }

// scatter returns n qemu-io writes of non-zero patterns spread over an
// image of size bytes: many offsets, lengths from 512 B to 192 KiB, some
// crossing cluster boundaries, plus the first and last sectors.
func scatter(size int64, n int, seed int64) []string {
	lens := []int64{512, 4096, 1536, 65536, 2048, 196608, 7680, 32768, 131072, 1024}
	var cmds []string
	for i := range int64(n) {
		off := ((i+1)*2654435761 + seed*7919*4096) % size
		off &^= 511
		l := lens[(i+seed)%int64(len(lens))]
		if off+l > size {
			l = size - off
		}
		if l <= 0 {
			continue
		}
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", pat(seed, i), off, l))
	}
	cmds = append(cmds,
		fmt.Sprintf("write -P 0x%02x 0 512", pat(seed, 1000)),
		fmt.Sprintf("write -P 0x%02x %d 512", pat(seed, 1001), size-512))
	return cmds
}

// pat is a pattern byte that is never zero.
func pat(seed, i int64) byte {
	return byte((seed*37+i*11)%254 + 1)
}

// files lists names, for Image.Files.
func files(names ...string) []string { return names }
