//go:build linux

package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nbdImagesVersion keys the image cache: bump it whenever what the
// generator writes changes, so stale images are never measured.
const nbdImagesVersion = "v1"

// nbdImage is one benchmark disk: a QCOW2 file uploaded as an object, and
// the raw file it was made from (what qemu-nbd serves locally for the
// warm comparison).
type nbdImage struct {
	name  string // ext4, ext4-zlib, random
	key   string // object key in the bench bucket
	qcow2 string // local QCOW2 (the uploaded object)
	raw   string // local raw disk with the same content
	virt  int64  // virtual disk size
	obj   int64  // object size
	alloc int64  // bytes of the virtual disk that hold data
}

func (img *nbdImage) describe() string {
	return fmt.Sprintf("%d MiB virtual, %d MiB of it allocated (%.0f%%), %d MiB object",
		img.virt>>20, img.alloc>>20, 100*float64(img.alloc)/float64(img.virt), img.obj>>20)
}

// allocatedBytes sums the data extents of qemu-img map.
func allocatedBytes(tb testing.TB, qcow2 string) int64 {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-img", "map", "--output=json", qcow2).Output()
	if err != nil {
		tb.Fatalf("qemu-img map %s: %v", qcow2, err)
	}
	var extents []struct {
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		tb.Fatalf("qemu-img map %s: %v", qcow2, err)
	}
	var n int64
	for _, e := range extents {
		if e.Data {
			n += e.Length
		}
	}
	return n
}

// nbdImages returns the three benchmark images, generating them on first
// use into a cache directory under os.TempDir keyed by nbdImagesVersion and
// the mode (regeneration takes minutes on 2 cores). A lock file keeps two
// concurrent benchmark runs from generating into the same directory.
func nbdImages(tb testing.TB, p nbdParams) []*nbdImage {
	tb.Helper()
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("snapfs-bench-nbd-%s-%s", nbdImagesVersion, p.mode))
	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		tb.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		tb.Fatal(err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	imgs := []*nbdImage{
		{name: "ext4", key: "ext4.qcow2", qcow2: filepath.Join(dir, "ext4.qcow2"), raw: filepath.Join(dir, "ext4.raw"), virt: p.ext4Size},
		{name: "ext4-zlib", key: "ext4-zlib.qcow2", qcow2: filepath.Join(dir, "ext4-zlib.qcow2"), raw: filepath.Join(dir, "ext4.raw"), virt: p.ext4Size},
		{name: "random", key: "random.qcow2", qcow2: filepath.Join(dir, "random.qcow2"), raw: filepath.Join(dir, "random.raw"), virt: p.randSize},
	}
	marker := filepath.Join(dir, "complete")
	if _, err := os.Stat(marker); err != nil {
		start := time.Now()
		fmt.Printf("generating benchmark images into %s (cached for later runs)...\n", dir)
		if err := os.RemoveAll(dir); err != nil {
			tb.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			tb.Fatal(err)
		}
		generateNBDImages(tb, p, dir, imgs)
		if err := os.WriteFile(marker, []byte(time.Now().Format(time.RFC3339)+"\n"), 0o644); err != nil {
			tb.Fatal(err)
		}
		fmt.Printf("images generated in %s\n", time.Since(start).Round(time.Second))
	}
	for _, img := range imgs {
		fi, err := os.Stat(img.qcow2)
		if err != nil {
			tb.Fatal(err)
		}
		img.obj = fi.Size()
		img.alloc = allocatedBytes(tb, img.qcow2)
	}
	return imgs
}

func generateNBDImages(tb testing.TB, p nbdParams, dir string, imgs []*nbdImage) {
	tb.Helper()
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		tb.Fatal("mkfs.ext4 not installed (apt-get install e2fsprogs)")
	}
	tree := filepath.Join(dir, "tree")
	writeTree(tb, tree, p.filesBytes, p.maxFile)
	ext4Raw := imgs[0].raw
	// mkfs.ext4 -d copies the tree into the new file system without
	// mounting it. A fixed UUID and hash seed keep the metadata the same
	// from one generation to the next.
	tool(tb, 30*time.Minute, "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "snapfs-bench",
		"-U", "5eb0c8f5-0000-4000-8000-000000000001", "-E", "hash_seed=5eb0c8f5-0000-4000-8000-000000000002",
		"-d", tree, ext4Raw, fmt.Sprintf("%dk", p.ext4Size>>10))
	if err := os.RemoveAll(tree); err != nil {
		tb.Fatal(err)
	}
	tool(tb, 30*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", ext4Raw, imgs[0].qcow2)
	tool(tb, 30*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zlib", ext4Raw, imgs[1].qcow2)
	benchDisk(tb, imgs[2].raw, p.randSize)
	tool(tb, 30*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", imgs[2].raw, imgs[2].qcow2)
}

// tool runs a command with a deadline and fails tb when it fails.
func tool(tb testing.TB, timeout time.Duration, name string, args ...string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// writeTree fills dir with about total bytes of files: many small ones
// (1-64 KiB), some medium (64 KiB-4 MiB), a few large (up to maxFile), in
// nested directories. Each 4 KiB block is either random bytes or text
// lines drawn from a small vocabulary, half and half, so a 64 KiB QCOW2
// cluster of file data compresses to a bit over half its size.
func writeTree(tb testing.TB, dir string, total, maxFile int64) {
	tb.Helper()
	rng := rand.New(rand.NewPCG(7, 11))
	src := rand.NewChaCha8([32]byte{7})
	text := textCorpus(rng)
	const blk = 4 << 10
	rnd := make([]byte, blk)
	var written int64
	for i := 0; written < total; i++ {
		var size int64
		switch r := rng.IntN(10); {
		case r < 6:
			size = 1<<10 + rng.Int64N(63<<10)
		case r < 9:
			size = 64<<10 + rng.Int64N(4<<20-64<<10)
		default:
			size = 4<<20 + rng.Int64N(max(maxFile-4<<20, 1))
		}
		size = min(size, total-written)
		path := filepath.Join(dir, fmt.Sprintf("d%02d", i%16), fmt.Sprintf("s%02d", (i/16)%8), fmt.Sprintf("f%05d.dat", i))
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			tb.Fatal(err)
		}
		f, err := os.Create(path)
		if err != nil {
			tb.Fatal(err)
		}
		w := bufio.NewWriterSize(f, 1<<20)
		for left := size; left > 0; left -= blk {
			n := min(left, blk)
			if rng.IntN(2) == 0 {
				_, _ = src.Read(rnd)
				_, _ = w.Write(rnd[:n])
			} else {
				o := rng.IntN(len(text) - blk)
				_, _ = w.Write(text[o : o+int(n)])
			}
		}
		if err := w.Flush(); err != nil {
			tb.Fatal(err)
		}
		if err := f.Close(); err != nil {
			tb.Fatal(err)
		}
		written += size
	}
}

// textCorpus returns 1 MiB of numbered lines of words from a small
// vocabulary: text that zlib shrinks about threefold.
func textCorpus(rng *rand.Rand) []byte {
	words := strings.Fields(`the a of to and in is it that for on with as was at by be this from or
		disk image cluster table offset object store range request block sector header snapshot
		backing refcount compressed extent cache reader server client export latency stall`)
	var sb strings.Builder
	for n := 0; sb.Len() < 1<<20; n++ {
		fmt.Fprintf(&sb, "%07d:", n)
		for k := 6 + rng.IntN(8); k > 0; k-- {
			sb.WriteByte(' ')
			sb.WriteString(words[rng.IntN(len(words))])
		}
		sb.WriteString(".\n")
	}
	return []byte(sb.String())
}
