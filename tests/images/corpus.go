package images

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// Corpus makes, in dir, the well-formed images every suite uses and returns
// them in a fixed order. Most are to be served; LUKS and AES-encrypted ones
// are to be refused. Virtual sizes stay at or under ~72 MiB.
func Corpus(t testing.TB, dir string) []Image {
	t.Helper()
	b := newBuilder(t, dir)
	var out []Image
	add := func(im Image) {
		if im.Expect == "" {
			im.Expect = Serve
		}
		if im.Key == "" {
			im.Key = im.Files[0]
		}
		out = append(out, im)
	}
	serve := func(name string, fs ...string) { add(Image{Name: name, Files: fs}) }

	// Version 2 (compat=0.10), 64 KiB clusters; zero writes over data,
	// which v2 cannot flag and QEMU stores some other way.
	b.create("v2-64k.qcow2", "32M", "compat=0.10")
	b.io("qcow2", "v2-64k.qcow2", append(scatter(32<<20, 40, 1),
		"write -z 1M 128k", "write -z 8M 64k")...)
	serve("v2-64k", "v2-64k.qcow2")

	// Version 3 with each cluster size; refcount widths vary too.
	b.create("v3-512.qcow2", "4M", "cluster_size=512")
	b.io("qcow2", "v3-512.qcow2", scatter(4<<20, 60, 2)...)
	serve("v3-512", "v3-512.qcow2")

	b.create("v3-4k.qcow2", "16M", "cluster_size=4k,refcount_bits=1")
	b.io("qcow2", "v3-4k.qcow2", scatter(16<<20, 50, 3)...)
	serve("v3-4k", "v3-4k.qcow2")

	b.create("v3-64k.qcow2", "64M", "")
	b.io("qcow2", "v3-64k.qcow2", scatter(64<<20, 60, 4)...)
	b.run("qemu-img", "bitmap", "--add", "-g", "64k", "v3-64k.qcow2", "snapfs-bitmap0")
	serve("v3-64k", "v3-64k.qcow2")

	b.create("v3-2m.qcow2", "64M", "cluster_size=2M,refcount_bits=64")
	b.io("qcow2", "v3-2m.qcow2", scatter(64<<20, 30, 5)...)
	serve("v3-2m", "v3-2m.qcow2")

	// A virtual size that is not a multiple of the cluster size.
	const odd = 5<<20 + 1536
	b.create("odd-size.qcow2", fmt.Sprint(odd), "")
	b.io("qcow2", "odd-size.qcow2", scatter(odd, 20, 6)...)
	serve("odd-size", "odd-size.qcow2")

	// Compressed clusters (zlib and zstd, v2 and v3, small and default
	// clusters), then overwritten in places by uncompressed writes and
	// zero writes so that compressed, normal and zero clusters mix.
	for _, c := range []struct {
		name, opts string
		size       int64 // smaller for small clusters: QEMU compresses those slowly
	}{
		{"zlib-64k", "compression_type=zlib", 24 << 20},
		{"zstd-64k", "compression_type=zstd", 24 << 20},
		{"zstd-4k", "compression_type=zstd,cluster_size=4k", 6 << 20},
		{"zlib-v2-512", "compat=0.10,cluster_size=512", 1 << 20},
	} {
		f, src := c.name+".qcow2", c.name+".raw"
		b.rawSource(src, c.size, uint64(c.size))
		b.run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", c.opts, src, f)
		os.Remove(b.path(src))
		// Uncompressed and zero writes over compressed clusters, at
		// 1/8, 2/8, ... of the size.
		e := c.size / 8
		b.io("qcow2", f,
			fmt.Sprintf("write -P 0x5a %d 4k", e),
			fmt.Sprintf("write -P 0x5b %d 1k", 2*e+512),
			fmt.Sprintf("write -P 0x5c %d 192k", 3*e),
			fmt.Sprintf("write -z %d 128k", 5*e),
			fmt.Sprintf("write -z %d 1536", 6*e+1024))
		serve(c.name, f)
	}

	// Extended L2 entries: subcluster-sized writes, subcluster zero writes
	// and zero writes over allocated subclusters.
	b.create("extl2.qcow2", "8M", "extended_l2=on,cluster_size=64k")
	b.io("qcow2", "extl2.qcow2",
		"write -P 0x11 0 64k",
		"write -z 4k 2k",
		"write -P 0x22 130k 2k",
		"write -P 0x33 200k 512",
		"write -P 0x34 262k 3k",
		"write -z 300k 4k",
		"write -P 0x35 1M 256k",
		"write -z 1028k 6k",
		"write -P 0x36 2050k 2k",
		"write -P 0x37 4M 2k", "write -P 0x38 4100k 2k", "write -P 0x39 4160k 2k",
		"write -P 0x3a 8190k 2k",
	)
	serve("extl2", "extl2.qcow2")

	// Extended L2 over a backing file: unallocated subclusters read through
	// to the base, per 1 KiB subcluster.
	b.create("extl2-base.qcow2", "8M", "")
	b.io("qcow2", "extl2-base.qcow2", "write -P 0x41 0 4M", "write -P 0x42 6M 1M")
	b.create("extl2-top.qcow2", "8M", "extended_l2=on,cluster_size=32k", "-b", "extl2-base.qcow2", "-F", "qcow2")
	b.io("qcow2", "extl2-top.qcow2",
		"write -P 0x51 1k 1k", "write -P 0x52 5k 2k", "write -P 0x53 40k 1k",
		"write -z 100k 3k", "write -P 0x54 1M 512", "write -z 6M 32k", "write -P 0x55 6200k 1k",
		"write -P 0x56 5M 1k")
	serve("extl2-backed", "extl2-top.qcow2", "extl2-base.qcow2")

	// Zero clusters: a zero write over allocated data keeps the host offset
	// (stale offset with the zero flag), one with -u frees it, one lands on
	// unallocated space, one is not cluster-aligned.
	b.create("zero.qcow2", "16M", "")
	b.io("qcow2", "zero.qcow2",
		"write -P 0x61 0 2M",
		"write -z 64k 128k",
		"write -z -u 512k 64k",
		"write -z 3M 128k",
		"write -z 1028k 8k",
		"write -P 0x62 8M 1M",
		"write -z 8M 1M",
		"write -P 0x63 8256k 4k",
	)
	serve("zero", "zero.qcow2")

	// Metadata preallocation: every cluster is allocated, few written.
	b.create("prealloc.qcow2", "16M", "preallocation=metadata")
	b.io("qcow2", "prealloc.qcow2", scatter(16<<20, 20, 8)...)
	serve("prealloc", "prealloc.qcow2")

	// Internal snapshots with writes after them: snapfs reads the active
	// state, and info lists the snapshots.
	b.create("snapshot.qcow2", "16M", "")
	b.io("qcow2", "snapshot.qcow2", scatter(16<<20, 20, 9)...)
	b.run("qemu-img", "snapshot", "-c", "snap-one", "snapshot.qcow2")
	b.io("qcow2", "snapshot.qcow2", "write -P 0x71 0 1M", "write -z 2M 1M", "write -P 0x72 10M 64k")
	b.run("qemu-img", "snapshot", "-c", "snap-two", "snapshot.qcow2")
	b.io("qcow2", "snapshot.qcow2", "write -P 0x73 512k 1M", "write -z -u 10M 64k")
	// qemu-img leaves the VM clock at 0; give the first snapshot one, as
	// a savevm would (vm_clock_nsec is at byte 24 of a table entry).
	b.edit("snapshot.qcow2", func(f []byte) []byte {
		putU64(f, int(getU64(f, offSnapshotsOff))+24, 1234*1e9+567890123)
		return f
	})
	serve("snapshot", "snapshot.qcow2")

	// A 3-level backing chain with relative names, made from dir; sizes
	// grow up the chain, so the top reads zeros past a shorter base.
	b.create("chain-base.qcow2", "16M", "compat=0.10")
	b.io("qcow2", "chain-base.qcow2", append(scatter(16<<20, 30, 10), "write -P 0x81 0 4M")...)
	b.create("chain-mid.qcow2", "24M", "", "-b", "chain-base.qcow2", "-F", "qcow2")
	b.io("qcow2", "chain-mid.qcow2", append(scatter(24<<20, 20, 11), "write -z 1M 64k", "write -P 0x82 18M 64k")...)
	b.create("chain-top.qcow2", "32M", "cluster_size=16k", "-b", "chain-mid.qcow2", "-F", "qcow2")
	b.io("qcow2", "chain-top.qcow2", append(scatter(32<<20, 20, 12), "write -z 2M 64k", "write -P 0x83 1040k 4k", "write -P 0x84 30M 64k")...)
	serve("chain", "chain-top.qcow2", "chain-mid.qcow2", "chain-base.qcow2")

	// External data files, with and without data_file_raw.
	b.create("datafile.qcow2", "16M", "data_file=datafile.data")
	b.io("qcow2", "datafile.qcow2", append(scatter(16<<20, 30, 13), "write -z 1M 64k")...)
	serve("datafile", "datafile.qcow2", "datafile.data")

	b.create("datafile-raw.qcow2", "8M", "data_file=datafile-raw.data,data_file_raw=on")
	b.io("qcow2", "datafile-raw.qcow2", scatter(8<<20, 20, 14)...)
	serve("datafile-raw", "datafile-raw.qcow2", "datafile-raw.data")

	// The dirty bit (incompatible bit 0) on a v3 image with lazy refcounts:
	// QEMU still reads it, so snapfs serves it and reports dirty-flag.
	b.create("dirty.qcow2", "16M", "lazy_refcounts=on")
	b.io("qcow2", "dirty.qcow2", scatter(16<<20, 20, 15)...)
	b.patch("dirty.qcow2", func(h []byte) { putU64(h, offIncompat, getU64(h, offIncompat)|1) })
	serve("dirty", "dirty.qcow2")

	// Refcount damage that reads fine but that check must report: a leaked
	// cluster (refcount 1, no reference; exit 3), and an L2 table whose
	// cluster has refcount 0 though referenced (corruption; exit 2).
	b.create("leak.qcow2", "16M", "")
	b.io("qcow2", "leak.qcow2", scatter(16<<20, 20, 16)...)
	b.edit("leak.qcow2", func(f []byte) []byte {
		n := len(f) / 65536 // the first cluster past the end
		f = append(f, make([]byte, 65536)...)
		putU16(f, refcountEntry(f, n), 1)
		return f
	})
	add(Image{Name: "leak", Files: files("leak.qcow2"), Check: 3})

	b.create("refcount-zero.qcow2", "16M", "")
	b.io("qcow2", "refcount-zero.qcow2", scatter(16<<20, 20, 17)...)
	b.edit("refcount-zero.qcow2", func(f []byte) []byte {
		l2 := getU64(f, int(getU64(f, offL1Offset))) &^ (1 << 63) // L1[0]
		putU16(f, refcountEntry(f, int(l2/65536)), 0)
		return f
	})
	add(Image{Name: "refcount-zero", Files: files("refcount-zero.qcow2"), Check: 2})

	// Guest content that nobody on the team wrote: QEMU's sample images of
	// other formats, converted to QCOW2.
	for _, s := range []struct {
		name, sample, opts string
		slice              int64 // keep the first bytes only (0: all); vhdx only
		compress           bool
	}{
		{"from-parallels-v1", "parallels-v1", "compat=0.10", 0, false},
		{"from-cloop", "simple-pattern.cloop", "cluster_size=4k", 0, false},
		{"from-vhdx", "iotest-dynamic-1G.vhdx", "", 72 << 20, false},
		{"from-grub-mbr", "grub_mbr.raw", "", 0, false},
		{"from-dmg", "simple-dmg.dmg", "compression_type=zstd", 0, true},
	} {
		tmp := b.unpackSample(s.sample, filepath.Join(t.TempDir(), s.sample))
		src := tmp
		if s.slice > 0 {
			src = fmt.Sprintf(`json:{"driver":"raw","offset":0,"size":%d,"file":{"driver":"vhdx","file":{"driver":"file","filename":%q}}}`, s.slice, tmp)
		}
		args := []string{"convert", "-O", "qcow2"}
		if s.compress {
			args = append(args, "-c")
		}
		if s.opts != "" {
			args = append(args, "-o", s.opts)
		}
		b.run("qemu-img", append(args, src, s.name+".qcow2")...)
		os.Remove(tmp)
		serve(s.name, s.name+".qcow2")
	}

	// Encrypted images: valid, refused.
	b.runFlaky("qemu-img", "create", "-q", "-f", "qcow2",
		"--object", "secret,id=sec0,data=snapfs-test",
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
		"luks.qcow2", "4M")
	add(Image{Name: "luks", Files: files("luks.qcow2"), Expect: Refuse, Reason: reason(t, "luks"), Stage: StageOpen})
	b.run("qemu-img", "create", "-q", "-f", "qcow2",
		"--object", "secret,id=sec0,data=snapfs-test",
		"-o", "compat=0.10,encrypt.format=aes,encrypt.key-secret=sec0",
		"aes.qcow2", "4M")
	add(Image{Name: "aes", Files: files("aes.qcow2"), Expect: Refuse, Reason: reason(t, "aes"), Stage: StageOpen})

	return out
}

// rawSource writes a raw file with content that compresses to varied
// degrees: text-like runs, pseudo-random (incompressible) clusters,
// patterns and holes.
func (b *builder) rawSource(name string, size int64, seed uint64) {
	b.t.Helper()
	f, err := os.Create(b.path(name))
	if err != nil {
		b.t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		b.t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, seed^0x5eed))
	const chunk = 64 << 10
	for off := int64(0); off < size; off += chunk {
		var buf []byte
		switch (off / chunk) % 7 {
		case 0, 3: // text-like
			var s []byte
			for len(s) < chunk {
				s = fmt.Appendf(s, "snapfs sector %d word %d %x\n", off+int64(len(s)), r.IntN(1000), r.Uint32())
			}
			buf = s[:chunk]
		case 1: // incompressible
			buf = make([]byte, chunk)
			for i := range buf {
				buf[i] = byte(r.Uint32())
			}
		case 2, 5: // hole
			continue
		default: // pattern with a little noise
			buf = bytes64k(byte(off/chunk) | 1)
			for i := 0; i < 64; i++ {
				buf[r.IntN(chunk)] = byte(r.Uint32())
			}
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			b.t.Fatal(err)
		}
	}
}

func bytes64k(c byte) []byte {
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = c
	}
	return buf
}

// Large makes dir/name, a v3 image of size bytes (a multiple of 4 MiB)
// whose every cluster holds data: 4 MiB runs of patterns that depend on
// seed, so two images of different seeds differ in every run. It is for
// tests that must read a lot (faults during a long read).
func Large(t testing.TB, dir, name string, size int64, seed int64) Image {
	t.Helper()
	b := newBuilder(t, dir)
	b.create(name, fmt.Sprint(size), "")
	var cmds []string
	for off := int64(0); off < size; off += 4 << 20 {
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 4M", pat(seed, off>>22), off))
	}
	b.io("qcow2", name, cmds...)
	return Image{Name: name, Files: files(name), Key: name, Expect: Serve}
}
