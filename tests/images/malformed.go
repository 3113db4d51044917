package images

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// unknownFeatureName is the name the feature-name table gives to the
// unknown incompatible bit 9 of the incompat-bit-9 image.
const unknownFeatureName = "snapfs-test-frobnication"

// Malformed makes, in dir, byte-patched copies of a good image and hostile
// backing setups, plus QEMU's non-QCOW2 sample images (see NonQCOW2). Every
// one is to be refused, with Reasons[Name] in the error. File names start
// with "mal-" or "sample-", so dir may be shared with Corpus.
func Malformed(t testing.TB, dir string) []Image {
	t.Helper()
	b := newBuilder(t, dir)
	var out []Image
	refuse := func(name, stage string, fs ...string) {
		out = append(out, Image{Name: name, Files: fs, Key: fs[0], Expect: Refuse, Reason: reason(t, name), Stage: stage})
	}

	// The good image the patches start from: v3, 64 KiB clusters, 16 MiB,
	// no backing file; its header extensions are QEMU's feature-name table.
	const base = "mal-base.qcow2"
	b.create(base, "16M", "")
	b.io("qcow2", base, scatter(16<<20, 20, 21)...)
	defer os.Remove(b.path(base))

	patched := func(name, stage string, fn func(h []byte)) {
		f := "mal-" + name + ".qcow2"
		b.copyFile(base, f)
		b.patch(f, fn)
		refuse(name, stage, f)
	}
	patched("bad-magic", StageHeader, func(h []byte) { copy(h[offMagic:], "QFI\x00") })
	patched("version-4", StageOpen, func(h []byte) { putU32(h, offVersion, 4) })
	patched("cluster-bits-8", StageHeader, func(h []byte) { putU32(h, offClusterBits, 8) })
	patched("cluster-bits-22", StageOpen, func(h []byte) { putU32(h, offClusterBits, 22) })
	// 4 GiB needs 8 L1 entries with 64 KiB clusters; the table has 1.
	patched("l1-too-small", StageHeader, func(h []byte) { putU64(h, offSize, 4<<30) })
	patched("l1-past-eof", StageHeader, func(h []byte) { putU64(h, offL1Offset, 1<<40) })
	patched("l1-huge", StageHeader, func(h []byte) { putU32(h, offL1Size, 0x7fffffff) })
	patched("refcount-order-7", StageHeader, func(h []byte) { putU32(h, offRefcountOrder, 7) })
	patched("snapshots-huge", StageHeader, func(h []byte) {
		putU32(h, offNbSnapshots, 0xffffffff)
		putU64(h, offSnapshotsOff, 0x10000)
	})
	patched("backing-name-huge", StageHeader, func(h []byte) {
		putU64(h, offBackingOffset, 0x1000)
		putU32(h, offBackingSize, 0xffffffff)
	})
	patched("ext-overrun", StageHeader, func(h []byte) {
		exts := extensions(h)
		if len(exts) == 0 {
			t.Fatal("images: base image has no header extension to patch")
		}
		// The length field of the first extension: its data would run
		// past the end of the 64 KiB header cluster.
		putU32(h, exts[0].off-4, 0x10000)
	})
	patched("incompat-bit-9", StageOpen, func(h []byte) {
		putU64(h, offIncompat, getU64(h, offIncompat)|1<<9)
		// Rename the feature table's entry for compatible bit 0 (lazy
		// refcounts) into one for incompatible bit 9.
		for _, e := range extensions(h) {
			if e.typ != extFeatureTable {
				continue
			}
			for o := e.off; o+48 <= e.off+e.size; o += 48 {
				if h[o] == 1 && h[o+1] == 0 {
					entry := make([]byte, 48)
					entry[0], entry[1] = 0, 9
					copy(entry[2:], unknownFeatureName)
					copy(h[o:], entry)
					return
				}
			}
		}
		t.Fatal("images: no feature-name table entry to rename")
	})
	// An L1 entry pointing to an L2 table past the end of the object: the
	// header is fine, reading guest offset 0 is not.
	patched("l2-past-eof", StageRead, func(h []byte) {
		l1 := int(getU64(h, offL1Offset))
		if l1+8 > len(h) {
			t.Fatalf("images: L1 table at %#x is not in the first MiB", l1)
		}
		putU64(h, l1, 1<<63|1<<40)
	})

	// Truncated and empty objects.
	{
		h, err := os.ReadFile(b.path(base))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(b.path("mal-truncated-header.qcow2"), h[:50], 0o644); err != nil {
			t.Fatal(err)
		}
		refuse("truncated-header", StageHeader, "mal-truncated-header.qcow2")
		if err := os.WriteFile(b.path("mal-empty-object.qcow2"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		refuse("empty-object", StageHeader, "mal-empty-object.qcow2")
	}

	// Unsafe backing file names, written over a placeholder name.
	const placeholder = "mal-placeholder-backing-name-long-enough-for-each-replacement.qcow2"
	b.create(placeholder, "16M", "")
	defer os.Remove(b.path(placeholder))
	for _, c := range []struct{ name, backing string }{
		{"backing-absolute", "/etc/passwd"},
		{"backing-dotdot", "../escape.qcow2"},
		{"backing-json", `json:{"driver":"raw"}`},
		{"backing-http", "http://example.com/x"},
	} {
		f := "mal-" + c.name + ".qcow2"
		b.create(f, "16M", "", "-b", placeholder, "-F", "qcow2")
		b.io("qcow2", f, "write -P 0x91 0 64k")
		b.patch(f, func(h []byte) {
			off, size := int(getU64(h, offBackingOffset)), int(getU32(h, offBackingSize))
			if size != len(placeholder) || len(c.backing) > size {
				t.Fatalf("images: unexpected backing name size %d", size)
			}
			clear(h[off : off+size])
			copy(h[off:], c.backing)
			putU32(h, offBackingSize, uint32(len(c.backing)))
		})
		refuse(c.name, StageOpen, f)
	}

	// A backing loop a -> b -> a, and an image that is its own backing file.
	b.create("mal-loop-a.qcow2", "16M", "")
	b.io("qcow2", "mal-loop-a.qcow2", "write -P 0x92 0 64k")
	b.create("mal-loop-b.qcow2", "16M", "", "-b", "mal-loop-a.qcow2", "-F", "qcow2")
	b.run("qemu-img", "rebase", "-u", "-b", "mal-loop-b.qcow2", "-F", "qcow2", "mal-loop-a.qcow2")
	refuse("backing-loop", StageOpen, "mal-loop-a.qcow2", "mal-loop-b.qcow2")

	b.create("mal-self.qcow2", "16M", "")
	b.run("qemu-img", "rebase", "-u", "-b", "mal-self.qcow2", "-F", "qcow2", "mal-self.qcow2")
	refuse("backing-self", StageOpen, "mal-self.qcow2")

	// A backing file that does not exist.
	b.create("mal-missing-backing.qcow2", "16M", "")
	b.create("mal-orphan.qcow2", "16M", "", "-b", "mal-missing-backing.qcow2", "-F", "qcow2")
	b.io("qcow2", "mal-orphan.qcow2", "write -P 0x93 64k 64k")
	if err := os.Remove(b.path("mal-missing-backing.qcow2")); err != nil {
		t.Fatal(err)
	}
	refuse("backing-missing", StageOpen, "mal-orphan.qcow2")

	return append(out, NonQCOW2(t, dir)...)
}

// NonQCOW2 unpacks every sample image in QEMU's sample_images (VHD, VHDX,
// VMDK, Parallels, DMG, cloop, Bochs, raw) into dir as "sample-NAME",
// unchanged, to be refused as not QCOW2.
func NonQCOW2(t testing.TB, dir string) []Image {
	t.Helper()
	b := newBuilder(t, dir)
	names, err := filepath.Glob(filepath.Join(samplesDir(), "*.bz2"))
	if err != nil || len(names) == 0 {
		t.Fatalf("images: no QEMU sample images in %s (set SNAPFS_QEMU_SAMPLES)", samplesDir())
	}
	sort.Strings(names)
	var out []Image
	for _, n := range names {
		sample := strings.TrimSuffix(filepath.Base(n), ".bz2")
		f := "sample-" + sample
		b.unpackSample(sample, b.path(f))
		out = append(out, Image{Name: f, Files: files(f), Key: f, Expect: Refuse,
			Reason: reason(t, "sample-not-qcow2"), Stage: StageHeader})
	}
	return out
}
