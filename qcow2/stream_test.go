package qcow2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// memSink collects a streamed image and checks the sink protocol: no body
// bytes after the head, the head exactly once.
type memSink struct {
	t         *testing.T
	body      bytes.Buffer
	head      []byte
	headCalls int
	failAfter int64 // fail Write once the body would exceed this many bytes; 0: never
}

func (m *memSink) Write(p []byte) (int, error) {
	if m.headCalls > 0 {
		m.t.Errorf("Write after WriteHead")
	}
	if m.failAfter > 0 && int64(m.body.Len()+len(p)) > m.failAfter {
		return 0, errors.New("sink full")
	}
	return m.body.Write(p)
}

func (m *memSink) WriteHead(p []byte) error {
	m.headCalls++
	m.head = append([]byte(nil), p...)
	return nil
}

// image returns the assembled image.
func (m *memSink) image() []byte { return append(append([]byte(nil), m.head...), m.body.Bytes()...) }

// stSource is a raw test source: size bytes, with data (random or
// compressible text) in ranges and zeros elsewhere.
type stSource struct {
	size     int64
	ranges   [][2]int64
	textual  bool // compressible content instead of random
	holeJunk bool // as a HoleSeeker whose holes hold junk (which must not be read)
}

// bytes returns the raw content.
func (s stSource) bytes(seed uint64) []byte {
	b := make([]byte, s.size)
	r := rand.New(rand.NewPCG(seed, 11))
	words := []string{"snapfs ", "qcow2 ", "cluster ", "refcount ", "bucket ", "\n"}
	for _, rg := range s.ranges {
		p := b[rg[0]:rg[1]]
		if s.textual {
			var sb strings.Builder
			for sb.Len() < len(p) {
				sb.WriteString(words[r.IntN(len(words))])
			}
			copy(p, sb.String())
		} else {
			for i := range p {
				p[i] = byte(r.Uint32()) | 1
			}
		}
	}
	return b
}

// holeReader serves raw from a position; its holes (outside ranges) read
// as junk, so a writer that reads them instead of seeking produces a wrong
// image.
type holeReader struct {
	raw    []byte
	ranges [][2]int64
	pos    int64
}

func (h *holeReader) Read(p []byte) (int, error) {
	if h.pos >= int64(len(h.raw)) {
		return 0, io.EOF
	}
	n := copy(p, h.raw[h.pos:])
	for i := range n {
		if !h.inData(h.pos + int64(i)) {
			p[i] = 0xAA
		}
	}
	h.pos += int64(n)
	return n, nil
}

// inData reports whether off is in a 64 KiB cluster that holds data: the
// writer reads whole clusters, and the holes it must skip are the clusters
// with no data.
func (h *holeReader) inData(off int64) bool {
	const cm = 64<<10 - 1
	for _, r := range h.ranges {
		if off >= r[0]&^cm && off < (r[1]+cm)&^cm {
			return true
		}
	}
	return false
}

func (h *holeReader) Seek(off int64, whence int) (int64, error) {
	if whence != io.SeekStart {
		return 0, errors.New("only SeekStart")
	}
	h.pos = off
	return off, nil
}

func (h *holeReader) NextData(off int64) (int64, int64, error) {
	for _, r := range h.ranges {
		s, e := r[0]&^4095, min((r[1]+4095)&^4095, int64(len(h.raw)))
		if e > off {
			return max(s, off), e, nil
		}
	}
	return int64(len(h.raw)), int64(len(h.raw)), nil
}

// streamImage writes src with opts and returns the image's path, the raw
// source's path and the stats.
func streamImage(t *testing.T, src stSource, opts StreamOptions) (img, raw string, st StreamStats, data []byte) {
	t.Helper()
	data = src.bytes(uint64(src.size))
	dir := t.TempDir()
	raw = filepath.Join(dir, "src.raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	var r io.Reader = struct{ io.Reader }{bytes.NewReader(data)} // a plain stream
	if src.holeJunk {
		r = &holeReader{raw: data, ranges: src.ranges}
	}
	sink := &memSink{t: t}
	st, err := WriteStream(context.Background(), sink, r, src.size, opts)
	if err != nil {
		t.Fatalf("WriteStream: %v", err)
	}
	if sink.headCalls != 1 {
		t.Fatalf("WriteHead called %d times", sink.headCalls)
	}
	hs := max(ceilDiv(opts.HeadSize, st.ClusterSize)*st.ClusterSize, st.ClusterSize)
	if sink.body.Len() > 0 && int64(len(sink.head)) != hs {
		t.Fatalf("head of %d bytes with a body; want the %d-byte head", len(sink.head), hs)
	}
	im := sink.image()
	if int64(len(im)) != st.ImageSize || st.ImageSize%st.ClusterSize != 0 {
		t.Fatalf("image of %d bytes, stats say %d", len(im), st.ImageSize)
	}
	img = filepath.Join(dir, "out.qcow2")
	if err := os.WriteFile(img, im, 0o644); err != nil {
		t.Fatal(err)
	}
	return img, raw, st, data
}

// judge checks img with qemu-img (check clean, compare identical to raw,
// info) and reads it back with this package.
func judge(t *testing.T, img, raw string, data []byte, st StreamStats, version int, ctype string) {
	t.Helper()
	out, stderr, code := wtRun(t, "check", "--output=json", "-f", "qcow2", img)
	if code != 0 {
		t.Fatalf("qemu-img check: exit %d\n%s%s", code, out, stderr)
	}
	var chk map[string]any
	if err := json.Unmarshal([]byte(out), &chk); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"leaks", "corruptions", "check-errors"} {
		if v, ok := chk[k]; ok && v.(float64) != 0 {
			t.Fatalf("qemu-img check: %s = %v\n%s", k, v, out)
		}
	}
	if out, stderr, code := wtRun(t, "compare", "-f", "raw", "-F", "qcow2", raw, img); code != 0 {
		t.Fatalf("qemu-img compare: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = wtRun(t, "info", "--output=json", "-f", "qcow2", img)
	if code != 0 {
		t.Fatalf("qemu-img info: %s", stderr)
	}
	var info struct {
		VirtualSize    int64 `json:"virtual-size"`
		ClusterSize    int64 `json:"cluster-size"`
		FormatSpecific struct {
			Data struct {
				Compat          string `json:"compat"`
				CompressionType string `json:"compression-type"`
				RefcountBits    int    `json:"refcount-bits"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	vsize := ceilDiv(int64(len(data)), 512) * 512
	if info.VirtualSize != vsize || st.VirtualSize != vsize {
		t.Errorf("virtual size: qemu-img %d, stats %d, want %d", info.VirtualSize, st.VirtualSize, vsize)
	}
	if info.ClusterSize != st.ClusterSize {
		t.Errorf("cluster size: qemu-img %d, stats %d", info.ClusterSize, st.ClusterSize)
	}
	wantCompat := map[int]string{2: "0.10", 3: "1.1"}[version]
	if info.FormatSpecific.Data.Compat != wantCompat {
		t.Errorf("compat %q, want %q", info.FormatSpecific.Data.Compat, wantCompat)
	}
	if version == 3 {
		want := "zlib"
		if ctype == "zstd" {
			want = "zstd"
		}
		if info.FormatSpecific.Data.CompressionType != want {
			t.Errorf("compression type %q, want %q", info.FormatSpecific.Data.CompressionType, want)
		}
	}
	padded := append(append([]byte(nil), data...), make([]byte, vsize-int64(len(data)))...)
	if sha256.Sum256(padded) != st.RawSHA256 {
		t.Errorf("RawSHA256 is not the sha256 of the raw content")
	}
	// Read it back with this package.
	dir, key := filepath.Split(img)
	im, err := Open(context.Background(), newDirStore(dir), key, nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer im.Close()
	got := readAll(t, im, 1<<20)
	if !bytes.Equal(got, padded) {
		t.Fatalf("read back differs from the source at %d", firstDiff(got, padded))
	}
}

func TestWriteStreamQemu(t *testing.T) {
	wtQemuImg(t)
	const M = 1 << 20
	cases := []struct {
		name string
		src  stSource
		opts StreamOptions
		// Expected allocated clusters, -1: do not check.
		alloc int64
	}{
		{"empty", stSource{size: 0}, StreamOptions{}, 0},
		{"no-data", stSource{size: 3 * M}, StreamOptions{}, 0},
		{"random", stSource{size: 3 * M, ranges: [][2]int64{{0, 3 * M}}}, StreamOptions{HeadSize: M}, 48},
		{"both-ends", stSource{size: 20 * M, ranges: [][2]int64{{0, 1000}, {20*M - 70000, 20 * M}}}, StreamOptions{}, 3},
		{"unaligned", stSource{size: 5*M + 777, ranges: [][2]int64{{M, M + 10}, {5 * M, 5*M + 777}}}, StreamOptions{HeadSize: 64 << 10}, 2},
		{"c512", stSource{size: 2*M + 100, ranges: [][2]int64{{1000, 300000}, {2 * M, 2*M + 100}}}, StreamOptions{WriteOptions: WriteOptions{ClusterSize: 512}}, -1},
		// 20480 data clusters, 320 L2 tables, 5 L1 clusters, ~82 refcount blocks in two refcount table clusters.
		{"c512-many", stSource{size: 10 * M, ranges: [][2]int64{{0, 10 * M}}}, StreamOptions{WriteOptions: WriteOptions{ClusterSize: 512}}, 20480},
		{"c2m", stSource{size: 9 * M, ranges: [][2]int64{{0, 10}, {5 * M, 5*M + 1}}}, StreamOptions{WriteOptions: WriteOptions{ClusterSize: 2 << 20}}, 2},
		{"v2", stSource{size: 4 * M, ranges: [][2]int64{{M, 2 * M}}}, StreamOptions{WriteOptions: WriteOptions{Compat: "0.10"}}, 16},
		{"holes-skipped", stSource{size: 6 * M, ranges: [][2]int64{{5000, 9000}, {3 * M, 3*M + 200000}}, holeJunk: true}, StreamOptions{}, -1},
		{"zlib", stSource{size: 4 * M, ranges: [][2]int64{{0, 3 * M}}, textual: true}, StreamOptions{Compression: "zlib"}, 48},
		{"zstd", stSource{size: 4 * M, ranges: [][2]int64{{0, 3 * M}}, textual: true}, StreamOptions{Compression: "zstd", Jobs: 3}, 48},
		{"zlib-v2-512", stSource{size: M, ranges: [][2]int64{{0, M / 2}}, textual: true}, StreamOptions{WriteOptions: WriteOptions{Compat: "0.10", ClusterSize: 512}, Compression: "zlib"}, 1024},
		{"zstd-mixed", stSource{size: 2 * M, ranges: [][2]int64{{0, M}}, textual: true}, StreamOptions{Compression: "zstd", WriteOptions: WriteOptions{ClusterSize: 4096}}, -1},
		{"zlib-random", stSource{size: M, ranges: [][2]int64{{0, M}}}, StreamOptions{Compression: "zlib"}, 16},
		{"zlib-refcount1", stSource{size: M, ranges: [][2]int64{{0, M}}, textual: true}, StreamOptions{Compression: "zlib", WriteOptions: WriteOptions{RefcountBits: 1, ClusterSize: 4096}}, 256},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img, raw, st, data := streamImage(t, c.src, c.opts)
			version := 3
			if c.opts.Compat == "0.10" {
				version = 2
			}
			judge(t, img, raw, data, st, version, c.opts.Compression)
			if c.alloc >= 0 && st.AllocatedClusters != c.alloc {
				t.Errorf("allocated %d clusters, want %d", st.AllocatedClusters, c.alloc)
			}
			switch c.opts.Compression {
			case "zlib", "zstd":
				if strings.Contains(c.name, "refcount1") {
					// 1-bit refcounts: no host cluster is shared, no gain.
				} else if strings.Contains(c.name, "random") {
					if st.CompressedClusters != 0 {
						t.Errorf("%d random clusters stored compressed", st.CompressedClusters)
					}
				} else {
					if st.CompressedClusters == 0 {
						t.Errorf("no cluster compressed")
					}
					var stored int64
					for _, r := range c.src.ranges {
						stored += r[1] - r[0]
					}
					if st.ImageSize >= stored {
						t.Errorf("compressed image of %d bytes is not smaller than the %d data bytes", st.ImageSize, stored)
					}
				}
			default:
				if st.CompressedClusters != 0 {
					t.Errorf("%d clusters compressed without compression", st.CompressedClusters)
				}
			}
		})
	}
}

// TestWriteStreamZlibQemuWindow: QEMU inflates with a 4 KiB window, so a
// cluster whose matches lie further back than 4 KiB must still decompress
// in qemu-img (it would fail with a 32 KiB window).
func TestWriteStreamZlibQemuWindow(t *testing.T) {
	wtQemuImg(t)
	// 64 KiB clusters made of one random 16 KiB block repeated: a 32 KiB
	// window would refer 16 KiB back.
	r := rand.New(rand.NewPCG(5, 5))
	block := make([]byte, 16<<10)
	for i := range block {
		block[i] = byte(r.Uint32())
	}
	data := bytes.Repeat(block, 16) // 256 KiB
	dir := t.TempDir()
	raw := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sink := &memSink{t: t}
	st, err := WriteStream(context.Background(), sink, bytes.NewReader(data), int64(len(data)), StreamOptions{Compression: "zlib"})
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "out.qcow2")
	if err := os.WriteFile(img, sink.image(), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, stderr, code := wtRun(t, "compare", "-f", "raw", "-F", "qcow2", raw, img); code != 0 {
		t.Fatalf("qemu-img compare: exit %d\n%s%s", code, out, stderr)
	}
	t.Logf("%d of %d clusters compressed", st.CompressedClusters, st.AllocatedClusters)
}

func TestWriteStreamErrors(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		opts StreamOptions
		want string
	}{
		{StreamOptions{Compression: "lz4"}, "compression"},
		{StreamOptions{Compression: "zstd", WriteOptions: WriteOptions{Compat: "0.10"}}, "zstd"},
		{StreamOptions{WriteOptions: WriteOptions{ClusterSize: 1000}}, "cluster size"},
		{StreamOptions{WriteOptions: WriteOptions{ClusterSize: 4 << 20}}, "cluster size"},
	} {
		if err := c.opts.Validate(0); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: Validate: %v, want an error about %q", c.opts, err, c.want)
		}
		sink := &memSink{t: t}
		_, err := WriteStream(ctx, sink, bytes.NewReader(nil), 0, c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one about %q", c.opts, err, c.want)
		}
		if sink.headCalls != 0 {
			t.Errorf("%+v: WriteHead called on error", c.opts)
		}
	}

	// A source shorter than its size.
	sink := &memSink{t: t}
	_, err := WriteStream(ctx, sink, bytes.NewReader(make([]byte, 100)), 1<<20, StreamOptions{})
	if err == nil || !errors.Is(err, io.ErrUnexpectedEOF) || sink.headCalls != 0 {
		t.Errorf("short source: %v (head calls %d)", err, sink.headCalls)
	}

	// A stream longer than its size.
	sink = &memSink{t: t}
	_, err = WriteStream(ctx, sink, bytes.NewReader(make([]byte, 1<<20+1)), 1<<20, StreamOptions{})
	if err == nil || !strings.Contains(err.Error(), "more than its size") || sink.headCalls != 0 {
		t.Errorf("long source: %v (head calls %d)", err, sink.headCalls)
	}

	// A source that is not what was hashed before (changed since): no
	// head, so the image is never completed; the right hash completes it.
	data := bytes.Repeat([]byte{7}, 1<<20)
	right := sha256.Sum256(data)
	wrong := sha256.Sum256(data[1:])
	sink = &memSink{t: t}
	_, err = WriteStream(ctx, sink, bytes.NewReader(data), 1<<20, StreamOptions{ExpectSHA256: wrong[:]})
	if !errors.Is(err, ErrSourceChanged) || sink.headCalls != 0 {
		t.Errorf("changed source: %v (head calls %d)", err, sink.headCalls)
	}
	sink = &memSink{t: t}
	if st, err := WriteStream(ctx, sink, bytes.NewReader(data), 1<<20, StreamOptions{ExpectSHA256: right[:]}); err != nil || sink.headCalls != 1 || st.RawSHA256 != right {
		t.Errorf("unchanged source: %v (head calls %d)", err, sink.headCalls)
	}

	// A failing source.
	sink = &memSink{t: t}
	boom := errors.New("device gone")
	_, err = WriteStream(ctx, sink, io.MultiReader(bytes.NewReader(bytes.Repeat([]byte{1}, 3<<20)), iotestErr{boom}), 8<<20, StreamOptions{})
	if !errors.Is(err, boom) || sink.headCalls != 0 {
		t.Errorf("failing source: %v (head calls %d)", err, sink.headCalls)
	}

	// A failing sink.
	sink = &memSink{t: t, failAfter: 1 << 20}
	_, err = WriteStream(ctx, sink, bytes.NewReader(bytes.Repeat([]byte{1}, 8<<20)), 8<<20, StreamOptions{})
	if err == nil || !strings.Contains(err.Error(), "sink full") || sink.headCalls != 0 {
		t.Errorf("failing sink: %v (head calls %d)", err, sink.headCalls)
	}

	// Cancelled while the source blocks.
	cctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() {
		pw.Write(bytes.Repeat([]byte{1}, 2<<20))
		cancel()
	}()
	sink = &memSink{t: t}
	_, err = WriteStream(cctx, sink, pr, 8<<20, StreamOptions{})
	if !errors.Is(err, context.Canceled) || sink.headCalls != 0 {
		t.Errorf("cancelled: %v (head calls %d)", err, sink.headCalls)
	}
}

type iotestErr struct{ err error }

func (e iotestErr) Read([]byte) (int, error) { return 0, e.err }

var _ = fmt.Sprint
