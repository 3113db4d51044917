package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/objstore"
)

// TestRealImage serves a QCOW2 image through the lazy disk.Disk from a
// file:// bucket and reads it back with real clients.
func TestRealImage(t *testing.T) {
	t.Parallel()
	need(t, "qemu-img", "nbdcopy", "nbdinfo")
	dir := t.TempDir()
	const size = 24<<20 + 512*3

	// Random data in some ranges, zeros (holes in the QCOW2) elsewhere.
	raw := make([]byte, size)
	rng := rand.New(rand.NewPCG(51, 52))
	for _, r := range [][2]int{{0, 300 << 10}, {1 << 20, 5 << 20}, {9<<20 + 4096, 9<<20 + 70000}, {20 << 20, size}} {
		for i := r[0]; i < r[1]; i++ {
			raw[i] = byte(rng.Uint32())
		}
	}
	rawPath := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	bucket := filepath.Join(dir, "bucket")
	os.Mkdir(bucket, 0o755)
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", rawPath, filepath.Join(bucket, "img.qcow2"))
	run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", rawPath, filepath.Join(bucket, "compressed.qcow2"))

	st, err := objstore.NewFileStore(bucket)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var exports []Export
	for _, key := range []string{"img.qcow2", "compressed.qcow2"} {
		d, err := disk.Open(ctx, st, key, nil, disk.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		exports = append(exports, Export{Name: strings.TrimSuffix(key, ".qcow2"), Device: d})
	}
	s := &Server{Exports: ExportList(exports...), Logger: testLogger(t)}
	addr := serve(t, s)

	for _, name := range []string{"img", "compressed"} {
		uri := "nbd://" + addr + "/" + name
		out := filepath.Join(dir, name+".out")
		run(t, "nbdcopy", uri, out)
		if got, _ := os.ReadFile(out); !bytes.Equal(got, raw) {
			t.Errorf("%s: nbdcopy content differs", name)
		}
		if o := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", rawPath, uri); !strings.Contains(o, "identical") {
			t.Errorf("%s: qemu-img compare: %s", name, o)
		}
	}

	// nbdinfo --map reports the image's unallocated clusters as holes,
	// as qemu-img map of the file does.
	var m []struct {
		Off  int64 `json:"offset"`
		Len  int64 `json:"length"`
		Type int   `json:"type"`
	}
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--map", "--json", "nbd://"+addr+"/img")), &m); err != nil {
		t.Fatal(err)
	}
	var q []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", filepath.Join(bucket, "img.qcow2"))), &q); err != nil {
		t.Fatal(err)
	}
	var holes, qholes int64
	for _, e := range m {
		if e.Type&stateHole != 0 {
			holes += e.Len
		}
	}
	for _, e := range q {
		if !e.Data {
			qholes += e.Length
		}
	}
	if holes != qholes || holes == 0 {
		t.Errorf("nbdinfo --map: %d bytes of holes, qemu-img map: %d", holes, qholes)
	}

	// Concurrent random reads with simple and structured replies.
	for _, structured := range []bool{false, true} {
		c := dialClient(t, addr, clientOpts{name: "compressed", structured: structured})
		var reqs [100][2]uint64
		for i := range reqs {
			off := rng.Uint64N(size - 200000)
			n := rng.Uint64N(200000)
			reqs[i] = [2]uint64{off, off + n}
			c.send(cmdRead, 0, uint64(i), off, uint32(n), nil)
		}
		for range reqs {
			r, err := c.next()
			if err != nil {
				t.Fatal(err)
			}
			q := reqs[r.handle]
			expectRead(t, r, raw[q[0]:q[1]], q[0])
		}
		c.disconnect()
	}
}
