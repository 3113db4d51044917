package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
)

// What qemu-img says about an image: the references snapfs is held to.
type qemuRef struct {
	sha256  string     // of `qemu-img convert -O raw`
	size    int64      // virtual size
	mapping []mapEntry // `qemu-img map --output=json`
	info    map[string]any
	check   int // exit code of `qemu-img check`
	checkJS map[string]any
}

var (
	refMu    sync.Mutex
	refCache = map[string]*qemuRef{}
)

// reference computes (once per image) what qemu-img says about dir/key.
func reference(t *testing.T, dir, key string) *qemuRef {
	t.Helper()
	path := filepath.Join(dir, key)
	refMu.Lock()
	ref := refCache[path]
	refMu.Unlock()
	if ref != nil {
		return ref
	}
	ref = &qemuRef{}
	raw := filepath.Join(t.TempDir(), "ref.raw")
	qemuImg(t, dir, "convert", "-f", "qcow2", "-O", "raw", key, raw)
	ref.sha256 = sha256File(t, raw)
	fi, err := os.Stat(raw)
	if err != nil {
		t.Fatal(err)
	}
	ref.size = fi.Size()
	os.Remove(raw)
	if err := json.Unmarshal(qemuImg(t, dir, "map", "-f", "qcow2", "--output=json", key), &ref.mapping); err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	if err := json.Unmarshal(qemuImg(t, dir, "info", "-f", "qcow2", "--output=json", key), &ref.info); err != nil {
		t.Fatalf("qemu-img info: %v", err)
	}
	cmd := exec.Command("qemu-img", "check", "-f", "qcow2", "--output=json", key)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatal(err)
		}
		ref.check = ee.ExitCode()
	}
	if err := json.Unmarshal(out, &ref.checkJS); err != nil {
		t.Fatalf("qemu-img check --output=json: %v\n%s", err, out)
	}
	refMu.Lock()
	refCache[path] = ref
	refMu.Unlock()
	return ref
}

func qemuImg(t *testing.T, dir string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("qemu-img", args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.Bytes()
}

// mapEntry is one entry of `qemu-img map --output=json`, and of
// `snapfs map --json`, which adds "compressed".
type mapEntry struct {
	Start      int64  `json:"start"`
	Length     int64  `json:"length"`
	Depth      int    `json:"depth"`
	Present    bool   `json:"present"`
	Zero       bool   `json:"zero"`
	Data       bool   `json:"data"`
	Offset     *int64 `json:"offset,omitempty"`
	Compressed *bool  `json:"compressed,omitempty"`
}

// What a byte range reads as, for comparing maps.
type class int

const (
	readsZero class = iota // unallocated, or zero
	isData                 // stored data
	either                 // QEMU: data whose host range is a hole in the file (reads as zero)
)

func (c class) String() string { return [...]string{"zero", "data", "data-or-zero"}[c] }

// segment is a run of bytes with one class; depth and offset only matter
// for isData.
type segment struct {
	start, length int64
	class         class
	depth         int
	offset        int64 // host offset, -1 if not given
	present       bool  // allocated (data or zero flag) in some layer
}

// qemuSegments normalizes qemu-img's map: data:true and zero:false is
// data; data:false is zero; data:true and zero:true (allocated, but a hole
// in the file under it, as with preallocation=metadata) may be either,
// since snapfs does not look for holes in objects.
func qemuSegments(m []mapEntry) []segment {
	var out []segment
	for _, e := range m {
		s := segment{start: e.Start, length: e.Length, class: readsZero, depth: e.Depth, offset: -1, present: e.Present}
		switch {
		case e.Data && e.Zero:
			s.class = either
		case e.Data:
			s.class = isData
			if e.Offset != nil {
				s.offset = *e.Offset
			}
		}
		out = append(out, s)
	}
	return out
}

// snapfsSegments normalizes snapfs's map: data:true is data, the rest
// reads as zero.
func snapfsSegments(m []mapEntry) []segment {
	var out []segment
	for _, e := range m {
		s := segment{start: e.Start, length: e.Length, class: readsZero, depth: e.Depth, offset: -1, present: e.Present}
		if e.Data {
			s.class = isData
			if e.Offset != nil {
				s.offset = *e.Offset
			}
		}
		out = append(out, s)
	}
	return out
}

// checkCoverage checks that segments cover [0, size) without gaps or
// overlaps.
func checkCoverage(segs []segment, size int64) error {
	sort.Slice(segs, func(i, j int) bool { return segs[i].start < segs[j].start })
	var pos int64
	for _, s := range segs {
		if s.start != pos {
			return fmt.Errorf("extent at %d, want one at %d (gap or overlap)", s.start, pos)
		}
		if s.length <= 0 {
			return fmt.Errorf("extent at %d has length %d", s.start, s.length)
		}
		pos += s.length
	}
	if pos != size {
		return fmt.Errorf("extents end at %d, virtual size is %d", pos, size)
	}
	return nil
}

// compareMaps compares snapfs's map with qemu's byte range by byte range:
// what qemu calls data must be data in snapfs, at the same depth and (when
// both give one) the same host offset; what qemu calls zero must not be
// data in snapfs; both must agree on what is present (allocated, or
// flagged zero, in some layer). It returns at most a few differences.
func compareMaps(q, s []segment) []string {
	var diffs []string
	i, j := 0, 0
	for i < len(q) && j < len(s) && len(diffs) < 8 {
		a, b := q[i], s[j]
		lo := max(a.start, b.start)
		hi := min(a.start+a.length, b.start+b.length)
		if lo < hi {
			switch {
			case a.class == isData && b.class != isData:
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu says data (depth %d), snapfs says %v", lo, hi, a.depth, b.class))
			case a.class == readsZero && b.class == isData:
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu says it reads as zero, snapfs says data (depth %d)", lo, hi, b.depth))
			case a.class == isData && a.depth != b.depth:
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu says data at depth %d, snapfs at depth %d", lo, hi, a.depth, b.depth))
			case a.present != b.present:
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu says present=%v, snapfs %v", lo, hi, a.present, b.present))
			case a.class == isData && a.offset >= 0 && b.offset >= 0 && a.offset+(lo-a.start) != b.offset+(lo-b.start):
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu maps it to host offset %d, snapfs to %d", lo, hi, a.offset+(lo-a.start), b.offset+(lo-b.start)))
			}
		}
		if a.start+a.length <= b.start+b.length {
			i++
		} else {
			j++
		}
	}
	return diffs
}

// dataBytes sums the lengths of the segments of class c (at depth d, or
// any depth if d < 0).
func dataBytes(segs []segment, c class, d int) int64 {
	var n int64
	for _, s := range segs {
		if s.class == c && (d < 0 || s.depth == d) {
			n += s.length
		}
	}
	return n
}

// jsonPath digs into decoded JSON: jsonPath(v, "format-specific", "data", "compat").
func jsonPath(v any, keys ...string) (any, bool) {
	for _, k := range keys {
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false
		}
		if v, ok = m[k]; !ok {
			return nil, false
		}
	}
	return v, true
}
