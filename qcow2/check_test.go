package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapfs/snapfs/objstore"
)

// ckQemuResult is `qemu-img check --output=json` (fields absent when 0).
type ckQemuResult struct {
	ImageEndOffset     int64 `json:"image-end-offset"`
	TotalClusters      int64 `json:"total-clusters"`
	CheckErrors        int64 `json:"check-errors"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	FragmentedClusters int64 `json:"fragmented-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
	Corruptions        int64 `json:"corruptions"`
	Leaks              int64 `json:"leaks"`
}

func ckQemuCheck(t *testing.T, path string) ckQemuResult {
	t.Helper()
	out, stderr, code := wtRun(t, "check", "--output=json", "-f", "qcow2", path)
	var r ckQemuResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("qemu-img check (exit %d): %v\n%s%s", code, err, out, stderr)
	}
	return r
}

// ckRunTool runs a qemu tool (qemu-img or qemu-io) and fails the test if it
// fails.
func ckRunTool(t *testing.T, tool string, args ...string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Skipf("%s not found in PATH: install qemu-utils to run the QCOW2 check tests", tool)
	}
	out, err := exec.Command(tool, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", tool, args, err, out)
	}
}

// ckCheck opens path through a directory store and checks it.
func ckCheck(t *testing.T, path string) *CheckReport {
	t.Helper()
	st, err := objstore.NewFileStore(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	im, err := Open(ctx, st, filepath.Base(path), nil)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer im.Close()
	rep, err := im.Check(ctx)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	return rep
}

func ckLog(t *testing.T, rep *CheckReport) {
	t.Helper()
	for _, p := range rep.Errors {
		t.Logf("error %s host=%#x guest=%#x: %s", p.Kind, p.HostOffset, p.GuestOffset, p.Message)
	}
	for _, p := range rep.Leaks {
		t.Logf("leak: %s", p.Message)
	}
	for _, p := range rep.Warnings {
		t.Logf("warning %s: %s", p.Kind, p.Message)
	}
}

// ckAgree compares the counts of a report with qemu-img check's.
func ckAgree(t *testing.T, rep *CheckReport, q ckQemuResult) {
	t.Helper()
	got := ckQemuResult{
		ImageEndOffset:     rep.ImageEndOffset,
		TotalClusters:      rep.CheckedClusters,
		AllocatedClusters:  rep.AllocatedClusters,
		FragmentedClusters: rep.FragmentedClusters,
		CompressedClusters: rep.CompressedClusters,
		Corruptions:        int64(len(rep.Errors)),
		Leaks:              int64(len(rep.Leaks)),
	}
	q.CheckErrors = 0
	if got != q {
		ckLog(t, rep)
		t.Errorf("Check counts %+v\nqemu-img check %+v", got, q)
	}
}

// ckPattern is a raw file of size bytes with data in some clusters,
// repetitive enough to compress.
func ckPattern(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "src.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for off := int64(0); off < size; off += 65536 {
		if r.IntN(3) == 0 {
			continue
		}
		b := bytes.Repeat([]byte{byte(off >> 16), 'a', 'b', byte(r.IntN(256))}, 65536/4)
		if r.IntN(4) == 0 {
			for i := range b[:4096] {
				b[i] = byte(r.Uint32())
			}
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// ckBuilders make the clean test images, with qemu-img and qemu-io or with
// Write, from a raw source src, into path.
var ckBuilders = map[string]func(t *testing.T, src, path string){
	"plain": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
		ckRunTool(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 10M 64k", "-c", "write -P 3 5M 200k",
			"-c", "write -P 4 1M 64k", "-c", "write -z 20M 128k", "-c", "write -P 5 63M 1M", path)
	},
	"v2": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10,cluster_size=4096", src, path)
	},
	"zlib": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zlib", src, path)
	},
	"zstd": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, path)
	},
	// Compressed clusters mixed with plain ones written afterwards.
	"zlib-mixed": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, path)
		ckRunTool(t, "qemu-io", "-c", "write -P 9 1M 100k", "-c", "write -z 3M 64k", path)
	},
	"snapshot": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, path)
		ckRunTool(t, "qemu-img", "snapshot", "-c", "first", path)
		ckRunTool(t, "qemu-io", "-c", "write -P 0x33 0 2M", "-c", "write -P 0x44 7M 64k", path)
		ckRunTool(t, "qemu-img", "snapshot", "-c", "second", path)
		ckRunTool(t, "qemu-io", "-c", "write -P 0x55 1M 64k", path)
	},
	"extended-l2": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", path, "32M")
		ckRunTool(t, "qemu-io", "-c", "write -P 1 4k 4k", "-c", "write -z 64k 4k", "-c", "write -P 2 1M 300k",
			"-c", "write -z 2M 128k", "-c", "write -P 3 30M 8k", path)
	},
	"bitmap": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
		ckRunTool(t, "qemu-img", "bitmap", "--add", path, "b0")
		ckRunTool(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 7 8M 64k", path)
	},
	"refcount-1": func(t *testing.T, src, path string) {
		ckRunTool(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "refcount_bits=1,cluster_size=512", src, path)
	},
	"write":        ckWriter(WriteOptions{}),
	"write-512-v2": ckWriter(WriteOptions{ClusterSize: 512, Compat: "0.10"}),
	"write-2M-rc4": ckWriter(WriteOptions{ClusterSize: 2 << 20, RefcountBits: 4}),
}

func ckWriter(opts WriteOptions) func(t *testing.T, src, path string) {
	return func(t *testing.T, src, path string) {
		out, _ := wtWriteImage(t, src, opts)
		if err := os.Rename(out, path); err != nil {
			t.Fatal(err)
		}
	}
}

// ckImage builds the named clean image (all of them without names) in a
// temporary directory and returns their paths by name.
func ckImages(t *testing.T, names ...string) map[string]string {
	t.Helper()
	wtQemuImg(t)
	dir := t.TempDir()
	src := ckPattern(t, dir, 8<<20)
	if len(names) == 0 {
		for n := range ckBuilders {
			names = append(names, n)
		}
	}
	imgs := map[string]string{}
	for _, n := range names {
		imgs[n] = filepath.Join(dir, n+".qcow2")
		ckBuilders[n](t, src, imgs[n])
	}
	return imgs
}

func TestCheckCleanImages(t *testing.T) {
	for name, path := range ckImages(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			q := ckQemuCheck(t, path)
			if q.Corruptions != 0 || q.Leaks != 0 {
				t.Fatalf("qemu-img check does not find %s clean: %+v", name, q)
			}
			rep := ckCheck(t, path)
			if !rep.Clean() || rep.Corrupt() || len(rep.Warnings) != 0 {
				ckLog(t, rep)
				t.Errorf("Check: %d errors, %d leaks, %d warnings", len(rep.Errors), len(rep.Leaks), len(rep.Warnings))
			}
			ckAgree(t, rep, q)
		})
	}
}

// ckImage is an image file loaded for patching.
type ckImage struct {
	t    *testing.T
	path string
	b    []byte
	cs   int64
}

func ckLoad(t *testing.T, path string) *ckImage {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return &ckImage{t: t, path: path, b: b, cs: 1 << binary.BigEndian.Uint32(b[20:])}
}

func (m *ckImage) u64(off int64) uint64      { return binary.BigEndian.Uint64(m.b[off:]) }
func (m *ckImage) put64(off int64, v uint64) { binary.BigEndian.PutUint64(m.b[off:], v) }
func (m *ckImage) l1Entry(i int64) int64 {
	return int64(binary.BigEndian.Uint64(m.b[m.u64(40)+uint64(i)*8:]))
}
func (m *ckImage) l2Table(i int64) int64   { return m.l1Entry(i) & offsetMask }
func (m *ckImage) l2EntryAt(g int64) int64 { return m.l2Table(0) + g/m.cs*8 } // guest offsets in the first L2 table
func (m *ckImage) refcountAt(host int64) int64 {
	// 16-bit refcounts, the first refcount block.
	blk := int64(m.u64(int64(m.u64(48))))
	return blk + host/m.cs*2
}

func (m *ckImage) save() string {
	m.t.Helper()
	p := strings.TrimSuffix(m.path, ".qcow2") + "-patched.qcow2"
	if err := os.WriteFile(p, m.b, 0o644); err != nil {
		m.t.Fatal(err)
	}
	return p
}

// ckPlain makes a 16 MiB image with data in guest clusters 0-15 and 64-65,
// 64 KiB clusters and 16-bit refcounts.
func ckPlain(t *testing.T) *ckImage {
	t.Helper()
	wtQemuImg(t)
	p := filepath.Join(t.TempDir(), "img.qcow2")
	ckRunTool(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	ckRunTool(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4M 128k", p)
	return ckLoad(t, p)
}

func ckHas(list []Problem, kind string, host, guest int64) bool {
	for _, p := range list {
		if p.Kind == kind && (host < 0 || p.HostOffset == host) && (guest < 0 || p.GuestOffset == guest) {
			return true
		}
	}
	return false
}

func TestCheckRefcountZeroForL2Table(t *testing.T) {
	m := ckPlain(t)
	l2 := m.l2Table(0)
	binary.BigEndian.PutUint16(m.b[m.refcountAt(l2):], 0)
	p := m.save()
	rep := ckCheck(t, p)
	if !rep.Corrupt() || !ckHas(rep.Errors, ProblemRefcount, l2, -1) {
		ckLog(t, rep)
		t.Fatalf("refcount 0 for the L2 table at %#x: no refcount error", l2)
	}
	// The L1 entry's copied flag no longer matches either, as qemu-img says.
	if !ckHas(rep.Errors, ProblemCopied, int64(m.u64(40)), 0) {
		ckLog(t, rep)
		t.Errorf("no copied-flag error for L1 entry 0")
	}
	ckAgree(t, rep, ckQemuCheck(t, p))
}

func TestCheckLeaks(t *testing.T) {
	t.Run("bumped", func(t *testing.T) {
		m := ckPlain(t)
		// Allocate one cluster past the end of the file with refcount 1: the
		// first refcount block covers it.
		end := int64(len(m.b))
		m.b = append(m.b, make([]byte, m.cs)...)
		binary.BigEndian.PutUint16(m.b[m.refcountAt(end):], 1)
		p := m.save()
		rep := ckCheck(t, p)
		if rep.Corrupt() || len(rep.Leaks) != 1 || rep.Leaks[0].HostOffset != end || rep.Leaks[0].Kind != ProblemLeak {
			ckLog(t, rep)
			t.Fatalf("appended cluster with refcount 1 at %#x: want exactly one leak there", end)
		}
		ckAgree(t, rep, ckQemuCheck(t, p))
	})
	t.Run("refcount-2", func(t *testing.T) {
		m := ckPlain(t)
		// A data cluster with refcount 2 and one reference: a leak, and its
		// copied flag now claims a refcount of 1 (an error for qemu-img too).
		host := m.u64(m.l2EntryAt(0)) & offsetMask
		binary.BigEndian.PutUint16(m.b[m.refcountAt(int64(host)):], 2)
		p := m.save()
		rep := ckCheck(t, p)
		if len(rep.Leaks) != 1 || rep.Leaks[0].HostOffset != int64(host) {
			ckLog(t, rep)
			t.Fatalf("refcount 2 for the cluster at %#x: want one leak", host)
		}
		if !ckHas(rep.Errors, ProblemCopied, m.l2EntryAt(0), 0) {
			ckLog(t, rep)
			t.Errorf("no copied-flag error")
		}
		ckAgree(t, rep, ckQemuCheck(t, p))
	})
}

func TestCheckL2ReservedBits(t *testing.T) {
	m := ckPlain(t)
	g := int64(5 * 65536)
	at := m.l2EntryAt(g)
	m.put64(at, m.u64(at)|1<<3)
	p := m.save()
	rep := ckCheck(t, p)
	if !ckHas(rep.Errors, ProblemL2, at, g) {
		ckLog(t, rep)
		t.Fatalf("reserved bits in the L2 entry for guest offset %#x: no error", g)
	}
	for _, e := range rep.Errors {
		if e.Kind == ProblemL2 && !strings.Contains(e.Message, "0x50000") {
			t.Errorf("message does not name the guest offset: %q", e.Message)
		}
	}
	if len(rep.Leaks) != 0 {
		ckLog(t, rep)
		t.Errorf("the cluster of the bad entry is reported leaked")
	}
	ckAgree(t, rep, ckQemuCheck(t, p))
}

func TestCheckL2PastEOF(t *testing.T) {
	for _, past := range []int64{0, 100} {
		m := ckPlain(t)
		g := int64(3 * 65536)
		at := m.l2EntryAt(g)
		old := int64(m.u64(at) & offsetMask)
		beyond := (int64(len(m.b))+m.cs-1)/m.cs*m.cs + past*m.cs
		m.put64(at, uint64(beyond)|flagCopied)
		p := m.save()
		rep := ckCheck(t, p)
		if !ckHas(rep.Errors, ProblemL2, at, g) {
			ckLog(t, rep)
			t.Fatalf("L2 entry for guest %#x pointing at %#x past the end: no error", g, beyond)
		}
		// The cluster it pointed to before is now leaked.
		if len(rep.Leaks) != 1 || rep.Leaks[0].HostOffset != old {
			ckLog(t, rep)
			t.Errorf("want the old cluster %#x leaked", old)
		}
		// qemu-img also reports the entry's copied flag, set for a cluster
		// without a refcount: a second corruption for the same entry, which
		// Check does not repeat. The other counts agree.
		q := ckQemuCheck(t, p)
		if q.Corruptions != 2 || len(rep.Errors) != 1 {
			ckLog(t, rep)
			t.Errorf("Check %d errors, qemu-img check %d corruptions; want 1 and 2", len(rep.Errors), q.Corruptions)
		}
		q.Corruptions = int64(len(rep.Errors))
		ckAgree(t, rep, q)
	}
}

func TestCheckSharedCluster(t *testing.T) {
	m := ckPlain(t)
	// Guest cluster 20 is unallocated: make it share guest cluster 2's host
	// cluster, whose refcount stays 1.
	a, b := m.l2EntryAt(2*65536), m.l2EntryAt(20*65536)
	if m.u64(b) != 0 {
		t.Fatal("guest cluster 20 is allocated")
	}
	m.put64(b, m.u64(a))
	host := int64(m.u64(a) & offsetMask)
	p := m.save()
	rep := ckCheck(t, p)
	if !ckHas(rep.Errors, ProblemRefcount, host, -1) || len(rep.Leaks) != 0 {
		ckLog(t, rep)
		t.Fatalf("two references to %#x with refcount 1: want one refcount error", host)
	}
	ckAgree(t, rep, ckQemuCheck(t, p))
}

func TestCheckBitmapClusters(t *testing.T) {
	imgs := ckImages(t, "bitmap")
	rep := ckCheck(t, imgs["bitmap"])
	if !rep.Clean() {
		ckLog(t, rep)
		t.Fatal("bitmap image not clean")
	}
	// Dropping the bitmap directory's refcount makes it an error.
	m := ckLoad(t, imgs["bitmap"])
	var dirOff int64
	for off := int64(112); off+8 <= m.cs; {
		typ, n := binary.BigEndian.Uint32(m.b[off:]), int64(binary.BigEndian.Uint32(m.b[off+4:]))
		if typ == 0 {
			break
		}
		if typ == extBitmaps {
			dirOff = int64(m.u64(off + 8 + 16))
		}
		off += 8 + (n+7)&^7
	}
	if dirOff == 0 {
		t.Fatal("no bitmaps extension")
	}
	binary.BigEndian.PutUint16(m.b[m.refcountAt(dirOff):], 0)
	p := m.save()
	rep = ckCheck(t, p)
	if !ckHas(rep.Errors, ProblemRefcount, dirOff, -1) {
		ckLog(t, rep)
		t.Fatalf("bitmap directory at %#x with refcount 0: no error", dirOff)
	}
	ckAgree(t, rep, ckQemuCheck(t, p))
}

func TestCheckClusterCap(t *testing.T) {
	m := ckPlain(t)
	old := maxCheckClusters
	maxCheckClusters = 4
	defer func() { maxCheckClusters = old }()
	rep := ckCheck(t, m.path)
	if !ckHas(rep.Warnings, ProblemLimit, -1, -1) || !rep.Clean() {
		ckLog(t, rep)
		t.Fatal("over the cluster cap: want a limit warning and no refcount problems")
	}
	if rep.AllocatedClusters != 18 {
		t.Errorf("allocated clusters %d, want 18", rep.AllocatedClusters)
	}
}

// TestCheckHostile overwrites metadata with random bytes: Check must report
// problems, never panic or fail.
func TestCheckHostile(t *testing.T) {
	imgs := ckImages(t, "plain", "snapshot", "extended-l2", "zlib", "bitmap")
	r := rand.New(rand.NewPCG(3, 4))
	for _, name := range []string{"plain", "snapshot", "extended-l2", "zlib", "bitmap"} {
		base := ckLoad(t, imgs[name])
		// Metadata lives in the first clusters of these images and in the
		// tables the header points to.
		targets := []int64{int64(base.u64(40)), int64(base.u64(48)), int64(base.u64(64)), base.l2Table(0)}
		for i := 0; i < 40; i++ {
			m := &ckImage{t: t, path: base.path, b: bytes.Clone(base.b), cs: base.cs}
			for n := r.IntN(20) + 1; n > 0; n-- {
				tgt := targets[r.IntN(len(targets))]
				if tgt <= 0 || tgt >= int64(len(m.b)) {
					continue
				}
				off := tgt + r.Int64N(min(m.cs, int64(len(m.b))-tgt))
				off &^= 7
				if off+8 > int64(len(m.b)) {
					continue
				}
				switch r.IntN(3) {
				case 0:
					m.put64(off, r.Uint64())
				case 1:
					m.put64(off, m.u64(off)^1<<r.IntN(64))
				default:
					m.put64(off, uint64(r.Int64N(int64(len(m.b))*2))&^511|1<<63)
				}
			}
			p := m.save()
			st, err := objstore.NewFileStore(filepath.Dir(p))
			if err != nil {
				t.Fatal(err)
			}
			im, err := Open(context.Background(), st, filepath.Base(p), nil)
			if err != nil {
				continue // the reader refuses it: nothing to check
			}
			if _, err := im.Check(context.Background()); err != nil {
				t.Errorf("%s #%d: Check: %v", name, i, err)
			}
			im.Close()
		}
	}
}

func TestCheckSubclusterBitmap(t *testing.T) {
	imgs := ckImages(t, "extended-l2")
	m := ckLoad(t, imgs["extended-l2"])
	// Guest cluster 8 (1 MiB, 128 KiB clusters) has data: mark subcluster 0
	// both allocated and zero.
	g := int64(1 << 20)
	at := m.l2Table(0) + g/m.cs*16
	if m.u64(at) == 0 {
		t.Fatal("guest cluster at 1 MiB is not allocated")
	}
	m.put64(at+8, m.u64(at+8)|1|1<<32)
	p := m.save()
	rep := ckCheck(t, p)
	if !ckHas(rep.Errors, ProblemL2, at, g) || len(rep.Leaks) != 0 {
		ckLog(t, rep)
		t.Fatalf("subcluster both allocated and zero at guest %#x: want one L2 error", g)
	}
	ckAgree(t, rep, ckQemuCheck(t, p))
}

func TestCheckCompressedPastEOF(t *testing.T) {
	imgs := ckImages(t, "zlib")
	m := ckLoad(t, imgs["zlib"])
	// Find the last compressed entry of the first L2 table and move its data
	// to start past the end of the file.
	var at int64 = -1
	for j := int64(0); j < m.cs/8; j++ {
		if e := m.u64(m.l2Table(0) + j*8); e&flagCompressed != 0 {
			at = m.l2Table(0) + j*8
		}
	}
	if at < 0 {
		t.Fatal("no compressed cluster")
	}
	x := uint(62 - (16 - 8))
	e := m.u64(at)
	e = e&^(1<<x-1) | uint64(len(m.b)+4096)
	m.put64(at, e)
	p := m.save()
	rep := ckCheck(t, p)
	if !ckHas(rep.Errors, ProblemL2, at, -1) {
		ckLog(t, rep)
		t.Fatal("compressed cluster past the end of the file: no error")
	}
}

func TestCheckSnapshotL1Refcount(t *testing.T) {
	imgs := ckImages(t, "snapshot")
	m := ckLoad(t, imgs["snapshot"])
	// The first snapshot's L1 table: its refcount dropped to 0 is an error.
	snapL1 := int64(m.u64(int64(m.u64(64))))
	binary.BigEndian.PutUint16(m.b[m.refcountAt(snapL1):], 0)
	p := m.save()
	rep := ckCheck(t, p)
	if !ckHas(rep.Errors, ProblemRefcount, snapL1, -1) {
		ckLog(t, rep)
		t.Fatalf("snapshot L1 table at %#x with refcount 0: no error", snapL1)
	}
	ckAgree(t, rep, ckQemuCheck(t, p))
}
