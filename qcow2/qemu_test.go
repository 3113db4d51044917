package qcow2

import (
	"context"
	"fmt"
	"os"
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
