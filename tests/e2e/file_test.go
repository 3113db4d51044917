package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/snapfs/snapfs/tests/images"
)

// compressedImages are the corpus images that hold compressed clusters;
// the others must have none.
var compressedImages = map[string]bool{
	"zlib-64k": true, "zstd-64k": true, "zstd-4k": true, "zlib-v2-512": true, "from-dmg": true,
}

// TestFileCorpus holds every servable corpus image, read from a local
// directory, to qemu-img: cat (relative plain path, file:// URL, -o FILE
// with holes), map, info and check.
func TestFileCorpus(t *testing.T) {
	t.Parallel()
	dir, corpus, _ := imageSet(t)
	n := 0
	for _, im := range corpus {
		if im.Expect != images.Serve {
			continue
		}
		n++
		t.Run(im.Name, func(t *testing.T) {
			t.Parallel()
			ref := reference(t, dir, im.Key)
			abs := filepath.Join(dir, im.Key)
			url := fileURL(abs)

			// cat to stdout, by a path relative to the working directory.
			sum, n, res := catSHA(t, cliRun{args: []string{"cat", im.Key}, dir: dir})
			checkCat(t, res, sum, n, ref)

			// cat to stdout, by file:// URL.
			sum, n, res = catSHA(t, cliRun{args: []string{"cat", url}})
			checkCat(t, res, sum, n, ref)

			// cat -o FILE: same bytes, and holes where the image has none.
			checkCatToFile(t, url, ref)

			// map --json against qemu-img map.
			res = snapfs(t, "map", "--json", url)
			if res.code != 0 {
				t.Fatalf("map failed:\n%s", res)
			}
			checkMap(t, im, res.stdout, ref)

			// info --json against qemu-img info (flag after the URL).
			res = snapfs(t, "info", url, "--json")
			if res.code != 0 {
				t.Fatalf("info failed:\n%s", res)
			}
			checkInfo(t, dir, im, abs, res.stdout, ref)

			// check: clean, leaks or corruption as qemu-img check says,
			// with the same counts.
			if ref.check != im.Check {
				t.Fatalf("qemu-img check exits %d, the image was made for %d", ref.check, im.Check)
			}
			res = snapfs(t, "check", abs) // an absolute plain path
			if res.code != ref.check {
				t.Errorf("check exits %d, qemu-img check %d:\n%s\nstdout:\n%s", res.code, ref.check, res, res.stdout)
			}
			res = snapfs(t, "check", "--json", url)
			if res.code != ref.check {
				t.Errorf("check --json exits %d, qemu-img check %d:\n%s", res.code, ref.check, res)
			}
			checkCheck(t, res.stdout, ref.checkJS)
		})
	}
	if n < 20 {
		t.Errorf("only %d servable corpus images", n)
	}
}

func checkCat(t *testing.T, res *result, sum string, n int64, ref *qemuRef) {
	t.Helper()
	if res.code != 0 {
		t.Errorf("cat failed:\n%s", res)
		return
	}
	if n != ref.size {
		t.Errorf("snapfs %s: wrote %d bytes, virtual size is %d", strings.Join(res.args, " "), n, ref.size)
	}
	if sum != ref.sha256 {
		t.Errorf("snapfs %s: sha256 %s, qemu-img convert -O raw gives %s", strings.Join(res.args, " "), sum, ref.sha256)
	}
}

// checkCatToFile runs cat -o FILE and checks the file's content and that
// it is sparse: its allocated blocks may not exceed what qemu-img map
// calls data (plus what may be either) by more than rounding.
func checkCatToFile(t *testing.T, url string, ref *qemuRef) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	res := snapfs(t, "cat", url, "-o", out)
	if res.code != 0 {
		t.Errorf("cat -o failed:\n%s", res)
		return
	}
	if len(res.stdout) != 0 {
		t.Errorf("cat -o wrote %d bytes to stdout", len(res.stdout))
	}
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != ref.size {
		t.Errorf("cat -o: file is %d bytes, virtual size is %d", fi.Size(), ref.size)
	}
	if sum := sha256File(t, out); sum != ref.sha256 {
		t.Errorf("cat -o: sha256 %s, qemu-img convert -O raw gives %s", sum, ref.sha256)
	}
	segs := qemuSegments(ref.mapping)
	bound := dataBytes(segs, isData, -1) + dataBytes(segs, either, -1)
	bound += int64(len(segs))*8192 + 1<<20 // block rounding at each extent's ends, metadata
	st := fi.Sys().(*syscall.Stat_t)
	if used := st.Blocks * 512; used > bound {
		t.Errorf("cat -o: the file uses %d bytes of disk for %d bytes of data: holes were written out (bound %d)",
			used, dataBytes(segs, isData, -1), bound)
	}
}

func checkMap(t *testing.T, im images.Image, out []byte, ref *qemuRef) {
	t.Helper()
	var m []mapEntry
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("map --json is not a JSON array of extents: %v\n%s", err, tail(string(out), 2000))
	}
	s := snapfsSegments(m)
	if err := checkCoverage(s, ref.size); err != nil {
		t.Errorf("map: %v", err)
	}
	q := qemuSegments(ref.mapping)
	if err := checkCoverage(q, ref.size); err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	if diffs := compareMaps(q, s); len(diffs) > 0 {
		t.Errorf("map disagrees with qemu-img map:\n  %s", strings.Join(diffs, "\n  "))
	}
	var compressed int64
	for _, e := range m {
		if e.Compressed == nil {
			t.Errorf("map: extent at %d has no \"compressed\" key", e.Start)
			break
		}
		if *e.Compressed {
			compressed += e.Length
			if !e.Data {
				t.Errorf("map: extent at %d is compressed but not data", e.Start)
			}
		}
	}
	if compressedImages[im.Name] != (compressed > 0) {
		t.Errorf("map: %d compressed bytes; image made with compressed clusters: %v", compressed, compressedImages[im.Name])
	}
}

// checkInfo compares info --json with qemu-img info --output=json.
func checkInfo(t *testing.T, dir string, im images.Image, abs string, out []byte, ref *qemuRef) {
	t.Helper()
	var info map[string]any
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("info --json: %v\n%s", err, tail(string(out), 2000))
	}
	compareInfo(t, "", info, ref.info)

	// snapfs's own keys.
	if v, _ := info["servable"].(bool); !v {
		t.Errorf("info: servable = %v (reason %v) for an image to serve", info["servable"], info["reason"])
	}
	if u, _ := info["url"].(string); !strings.HasSuffix(u, "/"+im.Key) {
		t.Errorf("info: url %q does not name %s", u, im.Key)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := info["object-size"].(float64); int64(v) != fi.Size() {
		t.Errorf("info: object-size %v, the file is %d bytes", info["object-size"], fi.Size())
	}
	if v, _ := info["etag"].(string); v == "" {
		t.Errorf("info: no etag")
	}
	if v, _ := info["last-modified"].(string); v == "" {
		t.Errorf("info: no last-modified")
	}
	var qemuAlloc int64
	for _, e := range ref.mapping {
		if e.Data && e.Depth == 0 {
			qemuAlloc += e.Length
		}
	}
	if v, ok := info["allocated-bytes"].(float64); !ok || int64(v) != qemuAlloc {
		t.Errorf("info: allocated-bytes %v, qemu-img map shows %d bytes of data in the top layer", info["allocated-bytes"], qemuAlloc)
	}

	// The backing chain, layer by layer.
	layer, key := info, im.Key
	for depth := 1; ; depth++ {
		bf, _ := jsonPath(layer, "backing-filename")
		name, _ := bf.(string)
		bi, hasImage := jsonPath(layer, "backing-image")
		if name == "" {
			if hasImage && bi != nil {
				t.Errorf("info: %s has no backing file but a backing-image", key)
			}
			break
		}
		next, ok := bi.(map[string]any)
		if !ok {
			t.Errorf("info: %s has backing file %q but no backing-image", key, name)
			break
		}
		var q map[string]any
		if err := json.Unmarshal(qemuImg(t, dir, "info", "-f", "qcow2", "--output=json", name), &q); err != nil {
			t.Fatal(err)
		}
		compareInfo(t, fmt.Sprintf("backing-image (depth %d) ", depth), next, q)
		layer, key = next, name
	}
}

// checkCheck compares check --json with qemu-img check --output=json.
func checkCheck(t *testing.T, out []byte, want map[string]any) {
	t.Helper()
	var got map[string]any
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("check --json: %v\n%s", err, tail(string(out), 2000))
	}
	for _, k := range []string{"check-errors", "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters", "image-end-offset", "leaks", "corruptions"} {
		w, ok := want[k]
		if !ok {
			w = float64(0) // qemu-img leaves out zero counts of some keys
		}
		if g, ok := got[k]; !ok || g != w {
			t.Errorf("check --json: %s = %v, qemu-img check says %v", k, got[k], w)
		}
	}
}

// compareInfo compares the keys snapfs's info shares with qemu-img's.
func compareInfo(t *testing.T, what string, got, want map[string]any) {
	t.Helper()
	same := func(keys ...string) {
		w, wok := jsonPath(want, keys...)
		g, gok := jsonPath(got, keys...)
		if !wok {
			// qemu-img leaves out keys without a value (backing file
			// of a base image, v3 fields of a v2 image); snapfs may
			// give them as null, "", false or leave them out.
			if gok && g != nil && g != "" && g != false {
				t.Errorf("info: %s%s = %v, qemu-img info has none", what, strings.Join(keys, "."), g)
			}
			return
		}
		if !gok || fmt.Sprint(g) != fmt.Sprint(w) {
			t.Errorf("info: %s%s = %v, qemu-img info says %v", what, strings.Join(keys, "."), g, w)
		}
	}
	for _, k := range []string{"virtual-size", "cluster-size", "format", "dirty-flag", "backing-filename", "backing-filename-format"} {
		same(k)
	}
	same("format-specific", "type")
	for _, k := range []string{"compat", "compression-type", "refcount-bits", "lazy-refcounts", "corrupt", "extended-l2", "data-file", "data-file-raw"} {
		same("format-specific", "data", k)
	}
	if w, ok := want["full-backing-filename"].(string); ok {
		if g, _ := got["full-backing-filename"].(string); !strings.HasSuffix(g, w) {
			t.Errorf("info: %sfull-backing-filename %q does not name qemu's %q", what, g, w)
		}
	}
	if f, _ := want["filename"].(string); f != "" {
		if g, _ := got["filename"].(string); !strings.HasSuffix(g, f) {
			t.Errorf("info: %sfilename %q does not name %q", what, g, f)
		}
	}

	// Snapshots: the keys qemu-img gives that snapfs mirrors.
	ws, _ := want["snapshots"].([]any)
	gs, _ := got["snapshots"].([]any)
	if len(gs) != len(ws) {
		t.Errorf("info: %s%d snapshots, qemu-img info lists %d", what, len(gs), len(ws))
	} else {
		for i := range ws {
			w, _ := ws[i].(map[string]any)
			g, _ := gs[i].(map[string]any)
			for _, k := range []string{"id", "name", "vm-state-size", "date-sec", "date-nsec"} {
				if fmt.Sprint(g[k]) != fmt.Sprint(w[k]) {
					t.Errorf("info: %ssnapshot %d %s = %v, qemu-img says %v", what, i, k, g[k], w[k])
				}
			}
			// qemu-img splits the VM clock in seconds and nanoseconds.
			sec, _ := w["vm-clock-sec"].(float64)
			nsec, _ := w["vm-clock-nsec"].(float64)
			if v, ok := g["vm-clock-nsec"].(float64); !ok || int64(v) != int64(sec)*1e9+int64(nsec) {
				t.Errorf("info: %ssnapshot %d vm-clock-nsec = %v, qemu-img says %vs %vns", what, i, g["vm-clock-nsec"], sec, nsec)
			}
		}
	}

	// Bitmaps: names and granularities.
	wb, _ := jsonPath(want, "format-specific", "data", "bitmaps")
	gb, _ := jsonPath(got, "format-specific", "data", "bitmaps")
	bitmaps := func(v any) string {
		var s []string
		list, _ := v.([]any)
		for _, b := range list {
			m, _ := b.(map[string]any)
			s = append(s, fmt.Sprintf("%v/%v", m["name"], m["granularity"]))
		}
		return strings.Join(s, ",")
	}
	if bitmaps(gb) != bitmaps(wb) {
		t.Errorf("info: %sbitmaps %s, qemu-img info says %s", what, bitmaps(gb), bitmaps(wb))
	}
}
