package qcow2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"testing"
)

// Images made by qemu-img/qemu-io, read back and compared with
// `qemu-img convert -O raw` and `qemu-img map`.

func TestQemuVersionsAndClusterSizes(t *testing.T) {
	needQemu(t)
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cs := range []string{"512", "4k", "64k", "2M"} {
			t.Run(fmt.Sprintf("compat=%s/cluster=%s", compat, cs), func(t *testing.T) {
				dir := t.TempDir()
				size := "8M"
				if cs == "2M" {
					size = "20M"
				}
				run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat="+compat+",cluster_size="+cs, "img.qcow2", size)
				qio(t, dir, "img.qcow2", "qcow2",
					"write -P 0x11 0 64k",
					"write -P 0x22 1000k 1536",
					"write -P 0x33 3M 1M",
					"write -P 0x44 7680k 100k",
					"write -z 3200k 4k",
				)
				im := checkAgainstQemu(t, dir, "img.qcow2")
				in, err := im.Info(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if in.Compat != compat || in.Servable != true || in.AllocatedBytes == 0 {
					t.Fatalf("Info = %+v", in)
				}
			})
		}
	}
}

func TestQemuCompressed(t *testing.T) {
	needQemu(t)
	for _, ctype := range []string{"zlib", "zstd"} {
		for _, cs := range []string{"512", "4k", "64k", "2M"} {
			t.Run(ctype+"/"+cs, func(t *testing.T) {
				dir := t.TempDir()
				writeRaw(t, dir+"/src.raw", 6<<20+12345, 7)
				run(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type="+ctype+",cluster_size="+cs, "src.raw", "img.qcow2")
				im := checkAgainstQemu(t, dir, "img.qcow2")
				in, err := im.Info(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if in.CompressionType != ctype {
					t.Fatalf("CompressionType = %q", in.CompressionType)
				}
				ext, err := im.Map(context.Background(), 0, im.Size())
				if err != nil {
					t.Fatal(err)
				}
				var comp int
				for _, e := range ext {
					if e.Kind == Compressed {
						comp++
					}
				}
				if comp == 0 {
					t.Fatal("no compressed extents in the image")
				}
			})
		}
	}
}

// Compressed clusters that cross host cluster boundaries: with 512-byte
// clusters almost every compressed cluster does.
func TestQemuCompressedCrossesHostClusters(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	text := make([]byte, 0, 1<<20)
	for i := 0; len(text) < 1<<20; i++ {
		text = fmt.Appendf(text, "line %d of a compressible text for snapfs\n", i*i%977)
	}
	if err := os.WriteFile(dir+"/src.raw", text[:1<<20], 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw", "img.qcow2")
	im := checkAgainstQemu(t, dir, "img.qcow2")
	crossing := 0
	for g := int64(0); g < im.Size(); g += im.ClusterSize() {
		m, err := im.lookup(context.Background(), g)
		if err != nil {
			t.Fatal(err)
		}
		if m.kind == Compressed && m.host/im.ClusterSize() != (m.host+m.clen-1)/im.ClusterSize() {
			crossing++
		}
	}
	if crossing == 0 {
		t.Fatal("no compressed cluster crosses a host cluster boundary; the test proves nothing")
	}
}

func TestQemuZeroClusters(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=64k", "img.qcow2", "4M")
	qio(t, dir, "img.qcow2", "qcow2",
		"write -P 0xaa 0 2M",
		"write -z 256k 128k",   // zero flag over allocated data: keeps the stale offset
		"write -z -u 1M 192k",  // zero flag, cluster deallocated
		"write -z 3M 64k",      // zero flag on an unallocated cluster
		"write -P 0xbb 2M 64k", // data after the zero runs
	)
	im := checkAgainstQemu(t, dir, "img.qcow2")
	e, _, err := im.entryAt(context.Background(), 256<<10)
	if err != nil {
		t.Fatal(err)
	}
	if !e.hasHost || e.zero != 1 || e.alloc != 0 {
		t.Fatalf("entry at 256k = %+v, want a zero cluster keeping its host offset (test premise)", e)
	}
	buf := make([]byte, 128<<10)
	if _, err := im.ReadAt(buf, 256<<10); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		if b != 0 {
			t.Fatalf("byte %d of a zero cluster with a stale offset reads %#x", 256<<10+i, b)
		}
	}
}

func TestQemuExtendedL2(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
	qio(t, dir, "base.qcow2", "qcow2", "write -P 0x55 0 4M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M")
	qio(t, dir, "top.qcow2", "qcow2",
		"write -P 0x66 2k 2k",
		"write -z 8k 4k",
		"write -P 0x77 70k 6k",
		"write -P 0x88 131k 1k", // partial subcluster: copy-on-write from the backing file
		"write -z -u 200k 2k",
		"write -P 0x99 1M 64k",
		"write -z 2M 64k",
	)
	im := checkAgainstQemu(t, dir, "top.qcow2")
	e, _, err := im.entryAt(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if e.alloc == 0 || e.zero == 0 || ^(e.alloc|e.zero) == 0 {
		t.Fatalf("entry of cluster 0 = %+v: want allocated, zero and unallocated subclusters (test premise)", e)
	}
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !in.ExtendedL2 || in.Backing == nil || in.AllocatedBytes != 2<<10+6<<10+2<<10+64<<10 {
		t.Fatalf("Info: ExtendedL2 %v, Backing %v, AllocatedBytes %d", in.ExtendedL2, in.Backing != nil, in.AllocatedBytes)
	}
}

func TestQemuPreallocMetadata(t *testing.T) {
	needQemu(t)
	for _, compat := range []string{"0.10", "1.1"} {
		t.Run(compat, func(t *testing.T) {
			dir := t.TempDir()
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata,compat="+compat, "img.qcow2", "8M")
			qio(t, dir, "img.qcow2", "qcow2", "write -P 0x12 1M 100k")
			checkAgainstQemu(t, dir, "img.qcow2")
		})
	}
}

func TestQemuInternalSnapshot(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 0x01 0 1M")
	run(t, dir, "qemu-img", "snapshot", "-c", "snap1", "img.qcow2")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 0x02 512k 1M", "write -z 0 64k")
	run(t, dir, "qemu-img", "snapshot", "-c", "second-snapshot", "img.qcow2")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 0x03 3M 64k")
	im := checkAgainstQemu(t, dir, "img.qcow2")
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Snapshots) != 2 || in.Snapshots[0].Name != "snap1" || in.Snapshots[0].ID != "1" ||
		in.Snapshots[1].Name != "second-snapshot" || in.Snapshots[1].DiskSize != 4<<20 || in.Snapshots[1].Date.IsZero() {
		t.Fatalf("Snapshots = %+v", in.Snapshots)
	}
}

func TestQemuBackingChain(t *testing.T) {
	needQemu(t)
	root := t.TempDir()
	dir := root + "/vm"
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
	qio(t, dir, "base.qcow2", "qcow2", "write -P 0x01 0 4M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "4M")
	qio(t, dir, "mid.qcow2", "qcow2", "write -P 0x02 1M 1M", "write -z 3M 64k")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M")
	qio(t, dir, "top.qcow2", "qcow2", "write -P 0x03 1536k 64k", "write -P 0x04 100k 4k")

	want, wantBytes := rawSHA(t, dir, "top.qcow2")
	_ = want
	st := newDirStore(root)
	im, err := Open(context.Background(), st, "vm/top.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if got := readAll(t, im, 1<<20); !bytes.Equal(got, wantBytes) {
		t.Fatalf("content differs at %d", firstDiff(got, wantBytes))
	}
	ext, err := im.Map(context.Background(), 0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	depths := map[int]bool{}
	for _, e := range ext {
		depths[e.Depth] = true
		if e.Kind == Data && !strings.HasSuffix(e.File, []string{"top.qcow2", "mid.qcow2", "base.qcow2"}[e.Depth]) {
			t.Fatalf("extent %+v: file does not match its depth", e)
		}
	}
	if !depths[0] || !depths[1] || !depths[2] {
		t.Fatalf("Map depths %v, want 0, 1 and 2", depths)
	}
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if in.BackingFile != "mid.qcow2" || in.BackingFormat != "qcow2" || in.FullBackingFile != st.URL("vm/mid.qcow2") ||
		in.Backing == nil || in.Backing.Backing == nil || in.Backing.Backing.URL != st.URL("vm/base.qcow2") || in.Backing.Backing.Backing != nil {
		t.Fatalf("Info chain wrong: %+v", in)
	}
	// qemu-img agrees with the same directory as working directory.
	checkAgainstQemu(t, dir, "top.qcow2")

	// Depth limit.
	_, err = Open(context.Background(), st, "vm/top.qcow2", &Options{MaxChainDepth: 1})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "deeper than 1") {
		t.Fatalf("Open with MaxChainDepth 1: %v", err)
	}
}

func TestQemuShortAndRawBacking(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	writeRaw(t, dir+"/base.raw", 1<<20+1536, 5) // not cluster aligned
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "4M")
	qio(t, dir, "top.qcow2", "qcow2", "write -P 0x03 64k 64k", "write -P 0x04 2M 4k")
	checkAgainstQemu(t, dir, "top.qcow2")

	// Not even sector aligned: qemu-img map rounds the raw file up to a
	// sector, so compare the contents only.
	writeRaw(t, dir+"/odd.raw", 1<<20+777, 5)
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", "topodd.qcow2", "4M")
	qio(t, dir, "topodd.qcow2", "qcow2", "write -P 0x03 64k 64k")
	checkContentAgainstQemu(t, dir, "topodd.qcow2")

	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "short.qcow2", "1M")
	qio(t, dir, "short.qcow2", "qcow2", "write -P 0x05 0 1M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "short.qcow2", "-F", "qcow2", "top2.qcow2", "3M")
	qio(t, dir, "top2.qcow2", "qcow2", "write -P 0x06 512k 1M")
	im := checkAgainstQemu(t, dir, "top2.qcow2")
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if in.Backing == nil || in.Backing.VirtualSize != 1<<20 {
		t.Fatalf("backing info %+v", in.Backing)
	}
}

func TestQemuExternalDataFile(t *testing.T) {
	needQemu(t)
	for _, raw := range []string{"off", "on"} {
		t.Run("data_file_raw="+raw, func(t *testing.T) {
			dir := t.TempDir()
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw="+raw, "img.qcow2", "4M")
			qio(t, dir, "img.qcow2", "qcow2", "write -P 0x21 0 64k", "write -P 0x22 1M 200k", "write -z 1088k 64k")
			im := checkAgainstQemu(t, dir, "img.qcow2")
			ext, err := im.Map(context.Background(), 0, 64<<10)
			if err != nil {
				t.Fatal(err)
			}
			if len(ext) != 1 || ext[0].Kind != Data || !strings.HasSuffix(ext[0].File, "/data.raw") {
				t.Fatalf("Map of the first cluster = %+v, want data in data.raw", ext)
			}
			in, err := im.Info(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if in.DataFile != "data.raw" || in.DataFileRaw != (raw == "on") {
				t.Fatalf("Info DataFile %q raw %v", in.DataFile, in.DataFileRaw)
			}
		})
	}
}

func TestQemuLUKSRefused(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	runFlaky(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=x",
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "img.qcow2", "4M")
	st := newDirStore(dir)
	_, err := Open(context.Background(), st, "img.qcow2", nil)
	if !errors.Is(err, ErrUnsupported) || err.Error() != st.URL("img.qcow2")+": cannot be served: encrypted with LUKS" {
		t.Fatalf("Open LUKS image: %v", err)
	}
	in, err := Inspect(context.Background(), st, "img.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if in.Servable || in.Reason != "encrypted with LUKS" || in.VirtualSize != 4<<20 {
		t.Fatalf("Inspect: %+v", in)
	}
}

func TestQemuBitmaps(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M")
	run(t, dir, "qemu-img", "bitmap", "--add", "-g", "128k", "img.qcow2", "bm0")
	run(t, dir, "qemu-img", "bitmap", "--add", "--disable", "img.qcow2", "second")
	qio(t, dir, "img.qcow2", "qcow2", "write -P 0x31 0 64k")
	im := checkAgainstQemu(t, dir, "img.qcow2")
	in, err := im.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Bitmaps) != 2 || in.Bitmaps[0].Name != "bm0" || in.Bitmaps[0].Granularity != 128<<10 ||
		fmt.Sprint(in.Bitmaps[0].Flags) != "[auto]" || in.Bitmaps[1].Name != "second" || len(in.Bitmaps[1].Flags) != 0 {
		t.Fatalf("Bitmaps = %+v", in.Bitmaps)
	}
}

// Without a backing format extension the backing file's format is probed.
func TestQemuBackingFormatProbe(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
	qio(t, dir, "base.qcow2", "qcow2", "write -P 0x41 0 1M")
	writeRaw(t, dir+"/base.raw", 2<<20, 9)
	for _, base := range []string{"base.qcow2", "base.raw"} {
		format := strings.TrimPrefix(path.Ext(base), ".")
		run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", format, "top.qcow2", "2M")
		qio(t, dir, "top.qcow2", "qcow2", "write -P 0x42 512k 64k")
		f := loadImg(t, dir+"/top.qcow2")
		off, _ := f.ext(extBackingFmt)
		f.put32(off-8, 0x12345678) // an unknown extension type, ignored
		f.save("probe.qcow2")
		st := newDirStore(dir)
		im, err := Open(context.Background(), st, "probe.qcow2", nil)
		if err != nil {
			t.Fatal(err)
		}
		in, err := im.Info(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if in.BackingFormat != "" || in.Backing == nil || in.Backing.Format != format {
			t.Fatalf("%s: BackingFormat %q, backing %+v", base, in.BackingFormat, in.Backing)
		}
		_, want := rawSHA(t, dir, "top.qcow2")
		if got := readAll(t, im, 1<<20); !bytes.Equal(got, want) {
			t.Fatalf("%s: content differs at %d", base, firstDiff(got, want))
		}
		im.Close()
	}
}

// A chain of 16 backing files opens with the default limit; 17 do not.
func TestQemuChainDepthLimit(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "l0.qcow2", "2M")
	qio(t, dir, "l0.qcow2", "qcow2", "write -P 1 0 4k")
	for i := 1; i <= 17; i++ {
		run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", fmt.Sprintf("l%d.qcow2", i-1), "-F", "qcow2", fmt.Sprintf("l%d.qcow2", i), "2M")
		qio(t, dir, fmt.Sprintf("l%d.qcow2", i), "qcow2", fmt.Sprintf("write -P %d %dk 4k", i+1, 64*i))
	}
	im := checkAgainstQemu(t, dir, "l16.qcow2")
	ext, err := im.Map(context.Background(), 0, 4096)
	if err != nil || len(ext) != 1 || ext[0].Depth != 16 {
		t.Fatalf("Map of the base's data: %+v, %v", ext, err)
	}
	_, err = Open(context.Background(), newDirStore(dir), "l17.qcow2", nil)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "backing chain deeper than 16") {
		t.Fatalf("17 backing files: %v", err)
	}
}
