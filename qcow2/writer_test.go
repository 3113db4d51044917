package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// wtQemuImg returns the path of qemu-img, skipping the test when it is absent.
func wtQemuImg(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not found in PATH: install qemu-utils to run the QCOW2 interoperability tests")
	}
	return p
}

// wtRun runs qemu-img with args and returns its stdout, stderr and exit code.
func wtRun(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(wtQemuImg(t), args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("qemu-img %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

// wtSource describes a raw test source: its size and the byte ranges that
// hold random data (the rest is zeros).
type wtSource struct {
	size   int64
	ranges [][2]int64 // [start, end) of random bytes
}

// file writes the source as a sparse raw file and returns its path.
func (s wtSource) file(t *testing.T, seed uint64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "src.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(s.size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 7))
	for _, rg := range s.ranges {
		b := make([]byte, rg[1]-rg[0])
		for i := range b {
			b[i] = byte(r.Uint32()) | 1 // never zero, so every touched cluster holds data
		}
		if _, err := f.WriteAt(b, rg[0]); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// allocated reports whether cluster c (of size cs) holds data.
func (s wtSource) allocated(c, cs int64) bool {
	for _, rg := range s.ranges {
		if rg[0] < (c+1)*cs && rg[1] > c*cs {
			return true
		}
	}
	return false
}

// wtWriteImage writes src with opts into a temporary .qcow2 file.
func wtWriteImage(t *testing.T, src string, opts WriteOptions) (string, WriteStats) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "out.qcow2")
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	// Hide *os.File's Seek/WriteAt: Write must only need io.Writer.
	st, err := Write(struct{ io.Writer }{out}, in, fi.Size(), opts)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("Write: %v", err)
	}
	return path, st
}

type wtMapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
}

func TestWriteQemuInterop(t *testing.T) {
	wtQemuImg(t)
	const M = 1 << 20
	cases := []struct {
		name string
		src  wtSource
		opts WriteOptions
	}{
		{"empty", wtSource{size: 0}, WriteOptions{}},
		{"empty-v2", wtSource{size: 0}, WriteOptions{Compat: "0.10"}},
		{"zeros", wtSource{size: 8 * M}, WriteOptions{}},
		{"zeros-512", wtSource{size: 3 * M}, WriteOptions{ClusterSize: 512}},
		{"random", wtSource{size: 3 * M, ranges: [][2]int64{{0, 3 * M}}}, WriteOptions{}},
		{"random-v2", wtSource{size: 3 * M, ranges: [][2]int64{{0, 3 * M}}}, WriteOptions{Compat: "0.10"}},
		// 512-byte clusters: several L1 clusters, many refcount blocks.
		{"random-512", wtSource{size: 3 * M, ranges: [][2]int64{{0, 3 * M}}}, WriteOptions{ClusterSize: 512}},
		// 64-bit refcounts with 512-byte clusters: a refcount table of two clusters.
		{"random-512-rc64", wtSource{size: 3 * M, ranges: [][2]int64{{0, 3 * M}}}, WriteOptions{ClusterSize: 512, RefcountBits: 64}},
		{"random-2M", wtSource{size: 5 * M, ranges: [][2]int64{{0, 5 * M}}}, WriteOptions{ClusterSize: 2 * M}},
		{"sparse-ends", wtSource{size: 64 * M, ranges: [][2]int64{{0, 5000}, {64*M - 100, 64 * M}}}, WriteOptions{}},
		{"sparse-ends-v2", wtSource{size: 64 * M, ranges: [][2]int64{{0, 5000}, {64*M - 100, 64 * M}}}, WriteOptions{Compat: "0.10"}},
		{"sparse-ends-512", wtSource{size: 64 * M, ranges: [][2]int64{{0, 5000}, {64*M - 100, 64 * M}}}, WriteOptions{ClusterSize: 512}},
		{"sparse-ends-2M", wtSource{size: 64 * M, ranges: [][2]int64{{0, 5000}, {64*M - 100, 64 * M}}}, WriteOptions{ClusterSize: 2 * M}},
		{"sparse-middle", wtSource{size: 40 * M, ranges: [][2]int64{{7*M + 3, 7*M + 70000}, {20 * M, 21 * M}, {30*M - 1, 30*M + 1}}}, WriteOptions{}},
		// Sizes that are not a multiple of the cluster size, with data in the tail.
		{"tail-64K", wtSource{size: 3*M + 4096 + 512, ranges: [][2]int64{{3*M - 10, 3*M + 4096 + 512}}}, WriteOptions{}},
		{"tail-2M", wtSource{size: 5*M + 12345*512, ranges: [][2]int64{{5 * M, 5*M + 12345*512}}}, WriteOptions{ClusterSize: 2 * M, Compat: "0.10"}},
		{"tail-512", wtSource{size: 100*512 + 512, ranges: [][2]int64{{0, 1}, {100 * 512, 101 * 512}}}, WriteOptions{ClusterSize: 512}},
		// Not a multiple of 512: the virtual size is rounded up like QEMU does.
		{"odd-size", wtSource{size: 1000*1000 + 7, ranges: [][2]int64{{1000 * 1000, 1000*1000 + 7}}}, WriteOptions{}},
		// A table of one L2 cluster exactly full (8192 entries of 64 KiB = 512 MiB).
		{"l2-boundary", wtSource{size: 512*M + 65536, ranges: [][2]int64{{512*M - 1, 512*M + 1}}}, WriteOptions{}},
	}
	for _, rb := range []int{1, 2, 4, 8, 32} {
		cases = append(cases, struct {
			name string
			src  wtSource
			opts WriteOptions
		}{fmt.Sprintf("refcount-%d", rb), wtSource{size: 2 * M, ranges: [][2]int64{{0, 10000}, {M, 2 * M}}}, WriteOptions{ClusterSize: 4096, RefcountBits: rb}})
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := tc.src.file(t, uint64(i))
			img, st := wtWriteImage(t, src, tc.opts)
			cs := int64(tc.opts.ClusterSize)
			if cs == 0 {
				cs = 65536
			}
			compat := tc.opts.Compat
			if compat == "" {
				compat = "1.1"
			}
			vsize := (tc.src.size + 511) / 512 * 512
			var want int64
			for c := int64(0); c*cs < vsize; c++ {
				if tc.src.allocated(c, cs) {
					want++
				}
			}
			if st.VirtualSize != vsize || st.AllocatedClusters != want {
				t.Errorf("stats %+v, want virtual size %d, %d allocated clusters", st, vsize, want)
			}
			if fi, err := os.Stat(img); err != nil || fi.Size() != st.BytesWritten {
				t.Errorf("BytesWritten %d, file: %v %v", st.BytesWritten, fi, err)
			}

			out, stderr, code := wtRun(t, "check", "-f", "qcow2", img)
			if code != 0 || !strings.Contains(out, "No errors were found") {
				t.Errorf("qemu-img check: exit %d\n%s%s", code, out, stderr)
			}
			out, stderr, code = wtRun(t, "compare", "-f", "raw", "-F", "qcow2", src, img)
			if code != 0 || !strings.Contains(out, "Images are identical") {
				t.Errorf("qemu-img compare: exit %d\n%s%s", code, out, stderr)
			}

			out, stderr, code = wtRun(t, "info", "--output=json", "-f", "qcow2", img)
			var info struct {
				VirtualSize    int64 `json:"virtual-size"`
				ClusterSize    int64 `json:"cluster-size"`
				FormatSpecific struct {
					Data struct {
						Compat       string `json:"compat"`
						RefcountBits int    `json:"refcount-bits"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if code != 0 {
				t.Fatalf("qemu-img info: exit %d: %s", code, stderr)
			}
			if err := json.Unmarshal([]byte(out), &info); err != nil {
				t.Fatalf("qemu-img info: %v\n%s", err, out)
			}
			rb := tc.opts.RefcountBits
			if rb == 0 {
				rb = 16
			}
			if info.VirtualSize != vsize || info.ClusterSize != cs || info.FormatSpecific.Data.Compat != compat || info.FormatSpecific.Data.RefcountBits != rb {
				t.Errorf("qemu-img info: virtual size %d, cluster size %d, compat %q, refcount bits %d; want %d, %d, %q, %d",
					info.VirtualSize, info.ClusterSize, info.FormatSpecific.Data.Compat, info.FormatSpecific.Data.RefcountBits,
					vsize, cs, compat, rb)
			}

			out, stderr, code = wtRun(t, "map", "--output=json", "-f", "qcow2", img)
			if code != 0 {
				t.Fatalf("qemu-img map: exit %d: %s", code, stderr)
			}
			var m []wtMapEntry
			if err := json.Unmarshal([]byte(out), &m); err != nil {
				t.Fatalf("qemu-img map: %v\n%s", err, out)
			}
			var end int64
			for _, e := range m {
				if e.Start != end {
					t.Fatalf("qemu-img map: gap before %d", e.Start)
				}
				end = e.Start + e.Length
				// Every cluster the entry touches must agree with the source.
				for c := e.Start / cs; c*cs < end; c++ {
					if e.Data != tc.src.allocated(c, cs) {
						t.Errorf("qemu-img map: [%d,+%d) data=%v, but cluster %d allocated=%v", e.Start, e.Length, e.Data, c, !e.Data)
						break
					}
				}
			}
			if end != vsize {
				t.Errorf("qemu-img map covers %d bytes, want %d", end, vsize)
			}
		})
	}
}

func TestWriteOptionsRejected(t *testing.T) {
	for _, o := range []WriteOptions{
		{ClusterSize: 256},
		{ClusterSize: 4 << 20},
		{ClusterSize: 65535},
		{Compat: "1.0"},
		{RefcountBits: 3},
		{RefcountBits: 128},
		{Compat: "0.10", RefcountBits: 8},
	} {
		if _, err := Write(io.Discard, bytes.NewReader(nil), 0, o); err == nil {
			t.Errorf("Write with %+v: no error", o)
		}
	}
	if _, err := Write(io.Discard, bytes.NewReader(nil), -1, WriteOptions{}); err == nil {
		t.Error("Write with negative size: no error")
	}
	// 512-byte clusters cannot address 1 TiB within QEMU's 32 MiB L1 limit:
	// the error must come before reading the source.
	if _, err := Write(io.Discard, failingReaderAt{}, 1<<40, WriteOptions{ClusterSize: 512}); err == nil || !strings.Contains(err.Error(), "L1") {
		t.Errorf("Write 1 TiB with 512-byte clusters: %v, want an L1 size error", err)
	}
}

type failingReaderAt struct{}

func (failingReaderAt) ReadAt([]byte, int64) (int, error) { return 0, errors.New("must not be read") }

func TestWriteShortSource(t *testing.T) {
	src := bytes.NewReader(make([]byte, 100000))
	_, err := Write(io.Discard, src, 200000, WriteOptions{})
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Write past the end of the source: %v, want io.ErrUnexpectedEOF", err)
	}
}

// TestWriteLayout checks the layout without qemu-img: offsets in the
// header and the refcount of every cluster of the file.
func TestWriteLayout(t *testing.T) {
	data := make([]byte, 1<<20)
	for i := 300000; i < 400000; i++ {
		data[i] = byte(i)
	}
	data[len(data)-1] = 1
	for _, rb := range []int{1, 2, 4, 8, 16, 32, 64} {
		var out bytes.Buffer
		st, err := Write(&out, bytes.NewReader(data), int64(len(data)), WriteOptions{ClusterSize: 512, RefcountBits: rb})
		if err != nil {
			t.Fatal(err)
		}
		img := out.Bytes()
		if int64(len(img)) != st.BytesWritten || len(img)%512 != 0 {
			t.Fatalf("rb %d: %d bytes, stats %+v", rb, len(img), st)
		}
		// Every cluster has refcount 1 and the rest of the last block is 0.
		be := func(off int) uint64 {
			var v uint64
			for _, b := range img[off : off+8] {
				v = v<<8 | uint64(b)
			}
			return v
		}
		rtOff := int(be(48))
		rtClusters := int(be(56) >> 32)
		order := uint(be(96) >> 32)
		if 1<<order != rb {
			t.Fatalf("rb %d: refcount_order %d", rb, order)
		}
		per := int64(512 * 8 >> order)
		total := int64(len(img) / 512)
		for c := int64(0); c < ((total+per-1)/per)*per; c++ {
			blk := int(be(rtOff + int(c/per)*8))
			if blk == 0 || blk%512 != 0 || blk+512 > len(img) {
				t.Fatalf("rb %d: refcount block for cluster %d at %d", rb, c, blk)
			}
			got := getRefcount(img[blk:blk+512], order, c%per)
			want := uint64(0)
			if c < total {
				want = 1
			}
			if got != want {
				t.Fatalf("rb %d: cluster %d refcount %d, want %d", rb, c, got, want)
			}
		}
		if rtOff != 512 || rtClusters < 1 {
			t.Errorf("rb %d: refcount table at %d, %d clusters", rb, rtOff, rtClusters)
		}
	}
}

func TestRefcountPacking(t *testing.T) {
	for order := uint(0); order <= 6; order++ {
		block := make([]byte, 512)
		per := int64(512 * 8 >> order)
		maxv := uint64(1)<<(1<<order) - 1
		if order == 6 {
			maxv = ^uint64(0)
		}
		for i := int64(0); i < per; i++ {
			putRefcount(block, order, i, uint64(i*2654435761)&maxv)
		}
		for i := int64(0); i < per; i++ {
			if got := getRefcount(block, order, i); got != uint64(i*2654435761)&maxv {
				t.Fatalf("order %d entry %d: %d", order, i, got)
			}
		}
	}
	// Sub-byte entries fill a byte from its least significant bit.
	b := make([]byte, 1)
	putRefcount(b, 0, 0, 1)
	putRefcount(b, 0, 3, 1)
	if b[0] != 0x09 {
		t.Errorf("1-bit entries 0 and 3: %#x", b[0])
	}
	b[0] = 0
	putRefcount(b, 2, 1, 5)
	if b[0] != 0x50 {
		t.Errorf("4-bit entry 1 = 5: %#x", b[0])
	}
}

func TestRefcountSizes(t *testing.T) {
	for _, cb := range []uint{9, 12, 16, 21} {
		for order := uint(0); order <= 6; order++ {
			for _, other := range []int64{1, 2, 63, 64, 65, 4095, 4096, 4097, 1 << 20, 123456789} {
				blocks, table := refcountSizes(cb, order, other)
				cs := int64(1) << cb
				per := cs * 8 >> order
				total := other + blocks + table
				if blocks*per < total || (blocks-1)*per >= total || table*cs/8 < blocks || (table-1)*cs/8 >= blocks && table > 1 {
					t.Errorf("cb %d order %d other %d: %d blocks, %d table clusters", cb, order, other, blocks, table)
				}
			}
		}
	}
}
